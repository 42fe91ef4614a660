//! Who is connected to this node: sessions by user, and the online local members of
//! each room. A plain struct so the routing rules are unit-tested without actors; the
//! [`crate::server::ChatServer`] actor owns one.

// foldhash, not SipHash: a room's fan-out looks up every member (keys are user ids,
// room names and session ids; the seed is random per process).
use foldhash::{HashMap, HashMapExt as _, HashSet};

/// Unique per node for the life of the process.
pub type SessionId = u64;

struct Entry<H> {
    uid: String,
    handle: H,
}

/// What a connect changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Arrival {
    /// The user's first connection on this node.
    pub first: bool,
    /// Rooms that had no member connected here before.
    pub occupied: Vec<String>,
}

/// What a disconnect changed.
#[derive(Debug, PartialEq, Eq)]
pub struct Departure {
    pub uid: String,
    /// The user has no other connection on this node.
    pub last: bool,
    /// The user's rooms (only filled when `last`).
    pub rooms: Vec<String>,
    /// Rooms that now have no member connected here.
    pub vacated: Vec<String>,
}

pub struct Registry<H> {
    sessions: HashMap<SessionId, Entry<H>>,
    users: HashMap<String, Vec<SessionId>>,
    /// room -> members with at least one connection here
    rooms: HashMap<String, HashSet<String>>,
    /// user with at least one connection here -> their rooms
    user_rooms: HashMap<String, HashSet<String>>,
}

impl<H> Default for Registry<H> {
    fn default() -> Self {
        Registry {
            sessions: HashMap::new(),
            users: HashMap::new(),
            rooms: HashMap::new(),
            user_rooms: HashMap::new(),
        }
    }
}

impl<H> Registry<H> {
    /// Adds a session.
    pub fn connect(&mut self, sid: SessionId, uid: &str, rooms: &[String], handle: H) -> Arrival {
        self.sessions.insert(
            sid,
            Entry {
                uid: uid.to_owned(),
                handle,
            },
        );
        let sids = self.users.entry(uid.to_owned()).or_default();
        sids.push(sid);
        let first = sids.len() == 1;
        let mut occupied = Vec::new();
        if first {
            for room in rooms {
                if self.add_member(uid, room) {
                    occupied.push(room.clone());
                }
            }
        }
        Arrival { first, occupied }
    }

    pub fn disconnect(&mut self, sid: SessionId) -> Option<Departure> {
        let entry = self.sessions.remove(&sid)?;
        self.shrink();
        let uid = entry.uid;
        let sids = self.users.get_mut(&uid)?;
        sids.retain(|s| *s != sid);
        if !sids.is_empty() {
            return Some(Departure {
                uid,
                last: false,
                rooms: Vec::new(),
                vacated: Vec::new(),
            });
        }
        self.users.remove(&uid);
        let rooms: Vec<String> = self
            .user_rooms
            .remove(&uid)
            .map(|r| r.into_iter().collect())
            .unwrap_or_default();
        let mut vacated = Vec::new();
        for room in &rooms {
            if self.drop_member(&uid, room) {
                vacated.push(room.clone());
            }
        }
        Some(Departure {
            uid,
            last: true,
            rooms,
            vacated,
        })
    }

    /// Hash maps keep their capacity when entries go: after a storm of connections has
    /// gone, give the memory back (amortised: only when a map is mostly empty).
    fn shrink(&mut self) {
        fn shrink<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
            if m.capacity() > 64 && m.len() * 4 < m.capacity() {
                m.shrink_to(m.len() * 2);
            }
        }
        shrink(&mut self.sessions);
        shrink(&mut self.users);
        shrink(&mut self.rooms);
        shrink(&mut self.user_rooms);
    }

    /// Records a new membership of a user who may be online here; true when the room
    /// had no member connected here before.
    pub fn join(&mut self, uid: &str, room: &str) -> bool {
        self.users.contains_key(uid) && self.add_member(uid, room)
    }

    /// Forgets a membership; true when the room now has no member connected here.
    pub fn leave(&mut self, uid: &str, room: &str) -> bool {
        if let Some(rooms) = self.user_rooms.get_mut(uid) {
            rooms.remove(room);
        }
        self.drop_member(uid, room)
    }

    /// True when the room had no member here before.
    fn add_member(&mut self, uid: &str, room: &str) -> bool {
        let members = self.rooms.entry(room.to_owned()).or_default();
        let occupied = members.is_empty();
        members.insert(uid.to_owned());
        self.user_rooms
            .entry(uid.to_owned())
            .or_default()
            .insert(room.to_owned());
        occupied
    }

    /// True when the room has no member here any more.
    fn drop_member(&mut self, uid: &str, room: &str) -> bool {
        let Some(members) = self.rooms.get_mut(room) else {
            return false;
        };
        if !members.remove(uid) {
            return false;
        }
        if members.is_empty() {
            self.rooms.remove(room);
            return true;
        }
        false
    }

    /// Whether `uid` is a member of `room` as far as this node knows (online here).
    pub fn is_member(&self, uid: &str, room: &str) -> bool {
        self.user_rooms.get(uid).is_some_and(|r| r.contains(room))
    }

    pub fn handle(&self, sid: SessionId) -> Option<&H> {
        self.sessions.get(&sid).map(|e| &e.handle)
    }

    pub fn uid_of(&self, sid: SessionId) -> Option<&str> {
        self.sessions.get(&sid).map(|e| e.uid.as_str())
    }

    /// How many connections `uid` has here.
    pub fn connections_of(&self, uid: &str) -> usize {
        self.users.get(uid).map_or(0, Vec::len)
    }

    /// The rooms of a user online here, sorted.
    pub fn rooms_of(&self, uid: &str) -> Vec<String> {
        let mut rooms: Vec<String> = self
            .user_rooms
            .get(uid)
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default();
        rooms.sort();
        rooms
    }

    pub fn is_online(&self, uid: &str) -> bool {
        self.users.contains_key(uid)
    }

    /// Sessions of `uid`.
    pub fn sessions_of<'a>(&'a self, uid: &str) -> impl Iterator<Item = (SessionId, &'a H)> + 'a {
        self.users
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(move |sid| self.sessions.get(sid).map(|e| (*sid, &e.handle)))
    }

    /// Members of `room` with a connection here.
    pub fn online_members<'a>(&'a self, room: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.rooms
            .get(room)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// Every session that should get a message between these users or in this room,
    /// except `exclude` (the sending connection).
    pub fn targets(
        &self,
        uids: &[&str],
        room: Option<&str>,
        exclude: Option<SessionId>,
    ) -> Vec<&H> {
        let mut out = Vec::new();
        let mut add = |uid: &str| {
            for (sid, h) in self.sessions_of(uid) {
                if Some(sid) != exclude {
                    out.push(h);
                }
            }
        };
        match room {
            Some(room) => self.online_members(room).for_each(&mut add),
            None => {
                for (i, uid) in uids.iter().enumerate() {
                    // a user listed twice gets one copy
                    if !uids[..i].contains(uid) {
                        add(uid);
                    }
                }
            }
        }
        out
    }

    /// Every session, for shutdown.
    pub fn all(&self) -> impl Iterator<Item = (SessionId, &H)> {
        self.sessions.iter().map(|(sid, e)| (*sid, &e.handle))
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Users with at least one connection here.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Rooms with at least one member online here.
    pub fn rooms(&self) -> impl Iterator<Item = &str> {
        self.rooms.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn first_and_last_connection() {
        let mut reg = Registry::default();
        let a = reg.connect(1, "alice", &rooms(&["lobby"]), "a1");
        assert!(a.first);
        assert_eq!(a.occupied, vec!["lobby"]);
        let a = reg.connect(2, "alice", &rooms(&["lobby"]), "a2");
        assert!(!a.first && a.occupied.is_empty());
        assert!(reg.is_online("alice"));
        assert_eq!(
            reg.disconnect(1),
            Some(Departure {
                uid: "alice".into(),
                last: false,
                rooms: vec![],
                vacated: vec![],
            })
        );
        assert_eq!(
            reg.online_members("lobby").collect::<Vec<_>>(),
            vec!["alice"]
        );
        let d = reg.disconnect(2).unwrap();
        assert!(d.last);
        assert_eq!(d.rooms, vec!["lobby"]);
        assert_eq!(d.vacated, vec!["lobby"]);
        assert!(!reg.is_online("alice"));
        assert_eq!(reg.online_members("lobby").count(), 0);
        assert_eq!(reg.disconnect(2), None, "double disconnect is harmless");
        assert_eq!(reg.session_count(), 0);
        assert_eq!(reg.rooms().count(), 0);
    }

    #[test]
    fn direct_targets_exclude_the_sending_connection_only() {
        let mut reg = Registry::default();
        reg.connect(1, "alice", &[], "a1");
        reg.connect(2, "alice", &[], "a2");
        reg.connect(3, "bob", &[], "b3");
        reg.connect(4, "carol", &[], "c4");
        let mut t = reg.targets(&["bob", "alice"], None, Some(1));
        t.sort();
        assert_eq!(t, vec![&"a2", &"b3"]);
        // from the API: no sending connection
        let mut t = reg.targets(&["bob", "alice"], None, None);
        t.sort();
        assert_eq!(t, vec![&"a1", &"a2", &"b3"]);
    }

    #[test]
    fn room_targets_follow_membership() {
        let mut reg = Registry::default();
        reg.connect(1, "alice", &rooms(&["lobby"]), "a1");
        reg.connect(2, "bob", &[], "b2");
        reg.connect(3, "carol", &rooms(&["lobby", "attic"]), "c3");
        let mut t = reg.targets(&[], Some("lobby"), Some(1));
        t.sort();
        assert_eq!(t, vec![&"c3"]);
        assert!(!reg.join("bob", "lobby"), "lobby already had members here");
        assert!(
            !reg.join("dave", "lobby"),
            "not online here: nothing to track"
        );
        assert!(reg.join("bob", "cellar"), "the first member here");
        let mut t = reg.targets(&[], Some("lobby"), Some(1));
        t.sort();
        assert_eq!(t, vec![&"b2", &"c3"]);
        assert!(!reg.leave("carol", "lobby"));
        assert!(reg.leave("bob", "cellar"));
        assert_eq!(reg.targets(&[], Some("lobby"), Some(1)), vec![&"b2"]);
        assert_eq!(reg.targets(&[], Some("attic"), None), vec![&"c3"]);
        let d = reg.disconnect(3).unwrap();
        assert_eq!(d.rooms, vec!["attic"]);
        assert_eq!(d.vacated, vec!["attic"]);
        assert_eq!(reg.rooms().count(), 1);
    }
}
