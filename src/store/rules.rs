//! The rules of writes, as plain functions of the state they look at.
//!
//! Every store implementation loads that state inside the transaction that writes (so
//! two nodes racing cannot both pass a check that only one of them should), asks these
//! functions what to do, and writes what they decided. Keeping the decisions here means
//! the memory, SQLite and PostgreSQL stores cannot disagree on a rule.

use std::collections::HashMap;

use super::{By, Change, NewMessage, Refusal, Role, RoomCreation, StoreLimits};
use crate::protocol::Conv;

/// What an edit or delete needs to know about the message it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub from: String,
    pub deleted: bool,
    /// An edit or delete event itself (events cannot be edited or deleted).
    pub is_event: bool,
}

/// The state one append is decided on.
#[derive(Debug, Clone, Default)]
pub struct AppendView {
    pub last_seq: u64,
    /// The sender's role in the room (rooms only).
    pub sender_role: Option<Role>,
    /// The message an edit or delete names, if it exists.
    pub target: Option<Target>,
}

/// Decides one append: the seq it gets, or why it is refused.
pub fn decide_append(msg: &NewMessage, view: &AppendView) -> Result<u64, Refusal> {
    let room = match Conv::parse(&msg.conv) {
        Some(Conv::Room(r)) => Some(r),
        Some(Conv::Dm(..)) => None,
        None => return Err(Refusal::Invalid(format!("bad conversation {}", msg.conv))),
    };
    let member = matches!(view.sender_role, Some(Role::Owner | Role::Member));
    if let (Some(room), By::User(_)) = (room, &msg.by) {
        if !member {
            return Err(Refusal::NotMember(format!("join room {room} first")));
        }
    }
    if let Some(change) = msg.change {
        let seq = match change {
            Change::Edit(s) | Change::Delete(s) => s,
        };
        let target = match &view.target {
            Some(t) if !t.deleted && !t.is_event => t,
            Some(t) if t.deleted => {
                return Err(Refusal::NotFound(format!(
                    "message {seq} of {} is deleted",
                    msg.conv
                )))
            }
            _ => {
                return Err(Refusal::NotFound(format!(
                    "no message {seq} in {}",
                    msg.conv
                )))
            }
        };
        let author = target.from == msg.from;
        let allowed = match (change, &msg.by) {
            (_, By::Server) => true,
            (Change::Edit(_), By::User(_)) => author,
            (Change::Delete(_), By::User(_)) => author || view.sender_role == Some(Role::Owner),
        };
        if !allowed {
            return Err(Refusal::Forbidden(match change {
                Change::Edit(_) => "only the author may edit a message".into(),
                Change::Delete(_) => "only the author or a room owner may delete a message".into(),
            }));
        }
    }
    Ok(view.last_seq + 1)
}

/// The state of one room as the membership rules see it.
#[derive(Debug, Clone, Default)]
pub struct RoomView {
    pub exists: bool,
    pub private: bool,
    pub members: u64,
}

/// One user's standing in one room.
#[derive(Debug, Clone, Default)]
pub struct UserView {
    pub role: Option<Role>,
    pub banned: bool,
    /// How many rooms the user belongs to.
    pub rooms: u64,
}

/// What `join` is to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinPlan {
    /// Already a member: nothing to write.
    Nothing(Role),
    /// Add as a member of the existing room.
    Join,
    /// Create the room (public), the joiner its owner.
    Create,
}

pub fn decide_join(
    limits: &StoreLimits,
    room: &str,
    r: &RoomView,
    u: &UserView,
) -> Result<JoinPlan, Refusal> {
    if let Some(role) = u.role {
        return Ok(JoinPlan::Nothing(role));
    }
    if !r.exists {
        if limits.room_creation == RoomCreation::Api {
            return Err(Refusal::NotFound(format!("there is no room {room}")));
        }
        check_room_limit(limits, u)?;
        return Ok(JoinPlan::Create);
    }
    if u.banned {
        return Err(Refusal::Forbidden(format!("you are banned from {room}")));
    }
    if r.private {
        return Err(Refusal::Forbidden(format!(
            "{room} is private: an owner must add you"
        )));
    }
    check_room_limit(limits, u)?;
    Ok(JoinPlan::Join)
}

fn check_room_limit(limits: &StoreLimits, u: &UserView) -> Result<(), Refusal> {
    if u.rooms >= limits.rooms_per_user as u64 {
        return Err(Refusal::Limit(format!(
            "a user belongs to at most {} rooms",
            limits.rooms_per_user
        )));
    }
    Ok(())
}

/// Checks a room creation. `rooms` holds how many rooms each initial member (owners
/// and members, the creating user among the owners) already belongs to.
pub fn decide_create(
    limits: &StoreLimits,
    by: &By,
    room: &str,
    exists: bool,
    rooms: &HashMap<String, u64>,
) -> Result<(), Refusal> {
    if exists {
        return Err(Refusal::Conflict(format!("room {room} exists")));
    }
    if by.user().is_some() && limits.room_creation == RoomCreation::Api {
        return Err(Refusal::Forbidden(
            "rooms are created by the server API only".into(),
        ));
    }
    let mut full: Vec<&String> = rooms
        .iter()
        .filter(|(_, n)| **n >= limits.rooms_per_user as u64)
        .map(|(u, _)| u)
        .collect();
    full.sort();
    if let Some(u) = full.first() {
        return Err(Refusal::Limit(format!(
            "{u} already belongs to {} rooms, the most a user may",
            limits.rooms_per_user
        )));
    }
    Ok(())
}

/// The owners and members a new room starts with: `by`'s user first among the owners,
/// no one twice, an owner not also listed as a plain member.
pub fn initial_members(by: &By, owners: &[String], members: &[String]) -> Vec<(String, Role)> {
    let mut out: Vec<(String, Role)> = Vec::new();
    let mut push = |uid: &str, role: Role| {
        if !out.iter().any(|(u, _)| u == uid) {
            out.push((uid.to_owned(), role));
        }
    };
    if let Some(u) = by.user() {
        push(u, Role::Owner);
    }
    for o in owners {
        push(o, Role::Owner);
    }
    for m in members {
        push(m, Role::Member);
    }
    out
}

/// Only owners (and the server) change who is in a room.
pub fn check_owner(
    by: &By,
    room: &str,
    r: &RoomView,
    by_role: Option<Role>,
) -> Result<(), Refusal> {
    if !r.exists {
        return Err(Refusal::NotFound(format!("there is no room {room}")));
    }
    match by {
        By::Server => Ok(()),
        By::User(_) if by_role == Some(Role::Owner) => Ok(()),
        // Members and non-members alike (contract section 7: "others: forbidden").
        By::User(_) => Err(Refusal::Forbidden(format!(
            "only owners of {room} add and remove members"
        ))),
    }
}

/// Whether `add` changes anything, and whether the added user may join one more room.
pub fn decide_add(limits: &StoreLimits, u: &UserView, role: Role) -> Result<bool, Refusal> {
    match u.role {
        Some(r) if r == role => Ok(u.banned),
        Some(_) => Ok(true),
        None => {
            check_room_limit(limits, u)?;
            Ok(true)
        }
    }
}

/// `room_info` and `history` of a room are for members; the server reads any room.
pub fn check_reader(by: &By, room: &str, r: &RoomView, role: Option<Role>) -> Result<(), Refusal> {
    match by {
        By::Server if r.exists => Ok(()),
        By::Server => Err(Refusal::NotFound(format!("there is no room {room}"))),
        By::User(_) if role.is_some() && r.exists => Ok(()),
        By::User(_) => Err(Refusal::NotMember(format!(
            "you are not a member of {room}"
        ))),
    }
}

/// A mark: None when it does not move forward, else the new value.
pub fn decide_mark(
    conv: &str,
    participant: bool,
    last_seq: u64,
    current: u64,
    seq: u64,
) -> Result<Option<u64>, Refusal> {
    if !participant {
        return Err(Refusal::NotMember(format!(
            "{conv} is not one of your conversations"
        )));
    }
    if seq > last_seq {
        return Err(Refusal::Invalid(format!(
            "seq {seq} is above the newest message of {conv} ({last_seq})"
        )));
    }
    Ok((seq > current).then_some(seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(conv: &str, from: &str, change: Option<Change>, by: By) -> NewMessage {
        NewMessage {
            conv: conv.into(),
            from: from.into(),
            body: Some("x".into()),
            change,
            client_id: None,
            id: "i".into(),
            ts: 1,
            by,
        }
    }

    fn user(u: &str) -> By {
        By::User(u.into())
    }

    #[test]
    fn room_messages_need_membership_except_from_the_server() {
        let view = AppendView {
            last_seq: 4,
            ..AppendView::default()
        };
        let m = msg("room:x", "alice", None, user("alice"));
        assert!(matches!(
            decide_append(&m, &view),
            Err(Refusal::NotMember(_))
        ));
        let m = msg("room:x", "system", None, By::Server);
        assert_eq!(decide_append(&m, &view), Ok(5));
        let member = AppendView {
            sender_role: Some(Role::Member),
            ..view
        };
        let m = msg("room:x", "alice", None, user("alice"));
        assert_eq!(decide_append(&m, &member), Ok(5));
        let m = msg("dm:alice:bob", "alice", None, user("alice"));
        assert_eq!(decide_append(&m, &AppendView::default()), Ok(1));
    }

    #[test]
    fn edits_by_the_author_deletes_by_author_or_owner() {
        let target = |from: &str| Target {
            from: from.into(),
            deleted: false,
            is_event: false,
        };
        let view = |role, t: Option<Target>| AppendView {
            last_seq: 9,
            sender_role: role,
            target: t,
        };
        let edit = msg("room:x", "bob", Some(Change::Edit(3)), user("bob"));
        assert_eq!(
            decide_append(&edit, &view(Some(Role::Member), Some(target("bob")))),
            Ok(10)
        );
        assert!(matches!(
            decide_append(&edit, &view(Some(Role::Owner), Some(target("alice")))),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            decide_append(&edit, &view(Some(Role::Member), None)),
            Err(Refusal::NotFound(_))
        ));
        let del = msg("room:x", "bob", Some(Change::Delete(3)), user("bob"));
        assert_eq!(
            decide_append(&del, &view(Some(Role::Owner), Some(target("alice")))),
            Ok(10)
        );
        assert!(matches!(
            decide_append(&del, &view(Some(Role::Member), Some(target("alice")))),
            Err(Refusal::Forbidden(_))
        ));
        let gone = Target {
            deleted: true,
            ..target("bob")
        };
        assert!(matches!(
            decide_append(&del, &view(Some(Role::Member), Some(gone))),
            Err(Refusal::NotFound(_))
        ));
        let event = Target {
            is_event: true,
            ..target("bob")
        };
        assert!(matches!(
            decide_append(&edit, &view(Some(Role::Member), Some(event))),
            Err(Refusal::NotFound(_))
        ));
        let moderation = msg("room:x", "system", Some(Change::Delete(3)), By::Server);
        assert_eq!(
            decide_append(&moderation, &view(None, Some(target("alice")))),
            Ok(10)
        );
    }

    #[test]
    fn join_rules() {
        let open = StoreLimits {
            rooms_per_user: 2,
            ..StoreLimits::default()
        };
        let api = StoreLimits {
            room_creation: RoomCreation::Api,
            ..open
        };
        let missing = RoomView::default();
        let public = RoomView {
            exists: true,
            ..RoomView::default()
        };
        let private = RoomView {
            private: true,
            ..public.clone()
        };
        let nobody = UserView::default();
        assert_eq!(
            decide_join(&open, "r", &missing, &nobody),
            Ok(JoinPlan::Create)
        );
        assert!(matches!(
            decide_join(&api, "r", &missing, &nobody),
            Err(Refusal::NotFound(_))
        ));
        assert_eq!(
            decide_join(&open, "r", &public, &nobody),
            Ok(JoinPlan::Join)
        );
        assert!(matches!(
            decide_join(&open, "r", &private, &nobody),
            Err(Refusal::Forbidden(_))
        ));
        let banned = UserView {
            banned: true,
            ..UserView::default()
        };
        assert!(matches!(
            decide_join(&open, "r", &public, &banned),
            Err(Refusal::Forbidden(_))
        ));
        let full = UserView {
            rooms: 2,
            ..UserView::default()
        };
        assert!(matches!(
            decide_join(&open, "r", &public, &full),
            Err(Refusal::Limit(_))
        ));
        let member = UserView {
            role: Some(Role::Member),
            rooms: 2,
            ..UserView::default()
        };
        assert_eq!(
            decide_join(&open, "r", &private, &member),
            Ok(JoinPlan::Nothing(Role::Member))
        );
    }

    #[test]
    fn owners_add_and_remove() {
        let r = RoomView {
            exists: true,
            ..RoomView::default()
        };
        assert!(check_owner(&user("a"), "r", &r, Some(Role::Owner)).is_ok());
        assert!(check_owner(&By::Server, "r", &r, None).is_ok());
        assert!(matches!(
            check_owner(&user("a"), "r", &r, Some(Role::Member)),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            check_owner(&user("a"), "r", &r, None),
            Err(Refusal::Forbidden(_))
        ));
        assert!(matches!(
            check_owner(&user("a"), "r", &RoomView::default(), Some(Role::Owner)),
            Err(Refusal::NotFound(_))
        ));
        let limits = StoreLimits {
            rooms_per_user: 1,
            ..StoreLimits::default()
        };
        let full = UserView {
            rooms: 1,
            ..UserView::default()
        };
        assert!(matches!(
            decide_add(&limits, &full, Role::Member),
            Err(Refusal::Limit(_))
        ));
        let member = UserView {
            role: Some(Role::Member),
            rooms: 1,
            ..UserView::default()
        };
        assert_eq!(decide_add(&limits, &member, Role::Member), Ok(false));
        assert_eq!(decide_add(&limits, &member, Role::Owner), Ok(true));
    }

    #[test]
    fn creation() {
        let limits = StoreLimits::default();
        let none = HashMap::new();
        assert!(matches!(
            decide_create(&limits, &user("a"), "r", true, &none),
            Err(Refusal::Conflict(_))
        ));
        let api = StoreLimits {
            room_creation: RoomCreation::Api,
            ..limits
        };
        assert!(matches!(
            decide_create(&api, &user("a"), "r", false, &none),
            Err(Refusal::Forbidden(_))
        ));
        assert!(decide_create(&api, &By::Server, "r", false, &none).is_ok());
        assert_eq!(
            initial_members(
                &user("a"),
                &["b".into(), "a".into()],
                &["b".into(), "c".into()]
            ),
            vec![
                ("a".into(), Role::Owner),
                ("b".into(), Role::Owner),
                ("c".into(), Role::Member)
            ]
        );
    }

    #[test]
    fn marks_move_forward_only() {
        assert_eq!(decide_mark("c", true, 10, 4, 7), Ok(Some(7)));
        assert_eq!(decide_mark("c", true, 10, 7, 5), Ok(None));
        assert_eq!(decide_mark("c", true, 10, 7, 7), Ok(None));
        assert!(matches!(
            decide_mark("c", true, 10, 7, 11),
            Err(Refusal::Invalid(_))
        ));
        assert!(matches!(
            decide_mark("c", false, 10, 0, 1),
            Err(Refusal::NotMember(_))
        ));
    }
}
