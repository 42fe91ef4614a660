//! Websocket frames (contract section 3) and the id rules (contract section 2).
//!
//! Parsing is done in two steps so that every bad frame gets the right error code:
//! first JSON (`bad_json`), then the `type` tag (`unknown_type`), then the fields
//! of that type (`invalid`).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest user or room id.
pub const MAX_ID_LEN: usize = 64;
/// Longest `client_id` a client may choose, in characters (JSON Schema `maxLength`).
pub const MAX_CLIENT_ID_LEN: usize = 128;
/// Most uids one `presence` frame may ask about.
pub const MAX_PRESENCE_UIDS: usize = 100;
/// Most messages a `history` frame may ask for.
pub const MAX_HISTORY_LIMIT: usize = 100;
/// Messages per conversation in a `sync` answer when the client has a cursor.
pub const SYNC_PAGE: usize = 100;
/// Messages per conversation in a `sync` answer when the client has no cursor.
pub const SYNC_LATEST: usize = 20;

/// A new message `id`: a random (version 4) UUID from the thread's generator, which
/// `uuid::Uuid::new_v4` would instead ask the kernel for (a `getrandom` system call
/// for every message).
pub fn new_message_id() -> String {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .to_string()
}

/// Milliseconds since the Unix epoch (the `ts` of messages); 0 if the clock is before it.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A user or room id: 1 to 64 characters of `A-Z a-z 0-9 _ . -`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// The conversation id of a one-to-one chat: `dm:A:B` with A < B in byte order.
pub fn dm_conv(a: &str, b: &str) -> String {
    if a <= b {
        format!("dm:{a}:{b}")
    } else {
        format!("dm:{b}:{a}")
    }
}

/// The conversation id of a room.
pub fn room_conv(room: &str) -> String {
    format!("room:{room}")
}

/// A parsed conversation id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conv<'a> {
    Dm(&'a str, &'a str),
    Room(&'a str),
}

impl<'a> Conv<'a> {
    /// Parses `dm:A:B` (A < B, both valid ids) or `room:R`.
    pub fn parse(conv: &'a str) -> Option<Conv<'a>> {
        if let Some(room) = conv.strip_prefix("room:") {
            return valid_id(room).then_some(Conv::Room(room));
        }
        let rest = conv.strip_prefix("dm:")?;
        let (a, b) = rest.split_once(':')?;
        (valid_id(a) && valid_id(b) && a < b).then_some(Conv::Dm(a, b))
    }

    /// Whether `uid` may read this conversation, without looking at room membership.
    pub fn dm_includes(&self, uid: &str) -> bool {
        matches!(self, Conv::Dm(a, b) if *a == uid || *b == uid)
    }
}

/// A frame from a client, after its fields have been checked for shape (not for rules).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Direct {
        to: String,
        body: String,
        client_id: String,
    },
    Room {
        room: String,
        body: String,
        client_id: String,
    },
    Join {
        room: String,
    },
    Leave {
        room: String,
    },
    Sync {
        #[serde(default)]
        cursors: BTreeMap<String, u64>,
    },
    History {
        conv: String,
        #[serde(default)]
        before: Option<u64>,
        #[serde(default)]
        limit: Option<u64>,
    },
    Presence {
        uids: Vec<String>,
        #[serde(default)]
        subscribe: bool,
    },
    Create {
        room: String,
        #[serde(default)]
        private: bool,
    },
    Add {
        room: String,
        uid: String,
        #[serde(default)]
        role: Option<String>,
    },
    Remove {
        room: String,
        uid: String,
        #[serde(default)]
        ban: bool,
    },
    RoomInfo {
        room: String,
    },
    Inbox {
        #[serde(default)]
        limit: Option<u64>,
        #[serde(default)]
        before: Option<u64>,
        /// The conversation shown last, so ties on `before` page exactly.
        #[serde(default)]
        before_conv: Option<String>,
    },
    Read {
        conv: String,
        seq: u64,
    },
    Delivered {
        conv: String,
        seq: u64,
    },
    Receipts {
        conv: String,
    },
    Typing {
        conv: String,
    },
    Edit {
        conv: String,
        seq: u64,
        body: String,
        client_id: String,
    },
    Delete {
        conv: String,
        seq: u64,
        client_id: String,
    },
}

const CLIENT_TYPES: &[&str] = &[
    "direct",
    "room",
    "join",
    "leave",
    "sync",
    "history",
    "presence",
    "create",
    "add",
    "remove",
    "room_info",
    "inbox",
    "read",
    "delivered",
    "receipts",
    "typing",
    "edit",
    "delete",
];

/// Why a text frame could not be parsed, with the `client_id` it carried (if any)
/// so the error can be matched to the send that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub client_id: Option<String>,
}

/// Parses one text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    // The common case in one pass; only a bad frame pays for finding out what is wrong.
    if let Ok(frame) = serde_json::from_str(text) {
        return Ok(frame);
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| FrameError {
        code: ErrorCode::BadJson,
        message: format!("frame is not JSON: {e}"),
        client_id: None,
    })?;
    let Some(object) = value.as_object() else {
        return Err(FrameError {
            code: ErrorCode::BadJson,
            message: "frame must be a JSON object".into(),
            client_id: None,
        });
    };
    let client_id = object
        .get("client_id")
        .and_then(|v| v.as_str())
        .map(|s| s.chars().take(MAX_CLIENT_ID_LEN).collect::<String>());
    match object.get("type").and_then(|t| t.as_str()) {
        Some(t) if CLIENT_TYPES.contains(&t) => {}
        Some(t) => {
            return Err(FrameError {
                code: ErrorCode::UnknownType,
                message: format!(
                    "unknown frame type {:?}",
                    t.chars().take(32).collect::<String>()
                ),
                client_id,
            })
        }
        None => {
            return Err(FrameError {
                code: ErrorCode::UnknownType,
                message: "frame has no string field \"type\"".into(),
                client_id,
            })
        }
    }
    serde_json::from_value(value).map_err(|e| FrameError {
        code: ErrorCode::Invalid,
        message: e.to_string(),
        client_id,
    })
}

/// The error codes of contract section 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    Invalid,
    TooLarge,
    NotMember,
    RateLimited,
    Unavailable,
    Unsupported,
    Forbidden,
    NotFound,
    Conflict,
    Limit,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownType,
        ErrorCode::Invalid,
        ErrorCode::TooLarge,
        ErrorCode::NotMember,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Unsupported,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::Limit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::Invalid => "invalid",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotMember => "not_member",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Limit => "limit",
        }
    }
}

/// A stored message, as it travels to clients, peers and the store.
///
/// `to` and `room` are not stored: they follow from `conv` and `from`. An edit or a
/// delete is a message of its own that names the `seq` it changes (`edit`, `delete`); the
/// message it changed is read back with its latest body and `edited`, or with no body and
/// `deleted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub conv: String,
    pub seq: u64,
    pub id: String,
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub edited: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
    pub ts: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Whom a `message` frame is for, read from the frame itself: a node passes on the frame
/// a peer serialised as it came (see [`Message::frame`]).
#[derive(Debug, Deserialize)]
pub struct FrameHead<'a> {
    /// `message` in a frame; absent where a peer sent the bare message.
    #[serde(rename = "type", default, borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub from: Cow<'a, str>,
    #[serde(default, borrow)]
    pub to: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub room: Option<Cow<'a, str>>,
}

impl Message {
    /// This message's `message` frame, serialised once on the node that stored it and
    /// carried as those bytes to every connection that gets it: the node's own, and
    /// (in the peer batch) its peers'. None only if serde_json fails (logged).
    pub fn frame(&self) -> Option<Box<RawValue>> {
        match serde_json::value::to_raw_value(&ServerFrame::Message(self)) {
            Ok(json) => Some(json),
            Err(e) => {
                log::error!("cannot serialise message {}: {e}", self.id);
                None
            }
        }
    }

    /// A message of `conv` from `from`, with `to` / `room` filled in from the
    /// conversation id.
    pub fn new(
        conv: &str,
        seq: u64,
        id: String,
        from: &str,
        body: Option<String>,
        ts: u64,
    ) -> Self {
        let (to, room) = match Conv::parse(conv) {
            Some(Conv::Dm(a, b)) => (Some(if a == from { b } else { a }.to_owned()), None),
            Some(Conv::Room(r)) => (None, Some(r.to_owned())),
            None => (None, None),
        };
        Message {
            conv: conv.to_owned(),
            seq,
            id,
            from: from.to_owned(),
            to,
            room,
            body,
            edit: None,
            delete: None,
            edited: false,
            deleted: false,
            ts,
        }
    }

    /// An edit or delete event rather than a message of its own.
    pub fn is_event(&self) -> bool {
        self.edit.is_some() || self.delete.is_some()
    }
}

/// The answer to a stored send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub conv: String,
    pub seq: u64,
    pub id: String,
    pub ts: u64,
}

/// `room_info`: the room, its owners and (up to a bound) its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomInfo {
    pub room: String,
    pub private: bool,
    pub owners: Vec<String>,
    /// Sorted; at most the bound the caller asked for.
    pub members: Vec<String>,
    /// Exact number of members.
    pub count: u64,
}

/// A frame from the server.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        uid: &'a str,
        node: &'a str,
        rooms: &'a [String],
        epoch: &'a str,
    },
    Message(&'a Message),
    Sent(&'a Sent),
    Joined {
        room: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        private: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        by: Option<&'a str>,
    },
    Left {
        room: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        by: Option<&'a str>,
    },
    Added {
        room: &'a str,
        uid: &'a str,
        role: &'a str,
    },
    Removed {
        room: &'a str,
        uid: &'a str,
        ban: bool,
    },
    RoomInfo(&'a RoomInfo),
    Synced {
        more: &'a [String],
    },
    History {
        conv: &'a str,
        messages: &'a [Message],
        more: bool,
    },
    Presence {
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        uid: &'a str,
        online: bool,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
    },
    Inbox {
        conversations: &'a [InboxItem],
        more: bool,
    },
    /// A read mark moved (pushed to the other participants and the user's devices).
    Read {
        conv: &'a str,
        uid: &'a str,
        seq: u64,
    },
    Delivered {
        conv: &'a str,
        uid: &'a str,
        seq: u64,
    },
    Receipts {
        conv: &'a str,
        read: &'a BTreeMap<String, u64>,
        delivered: &'a BTreeMap<String, u64>,
    },
    Typing {
        conv: &'a str,
        uid: &'a str,
    },
}

/// One conversation of an `inbox` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboxItem {
    pub conv: String,
    /// The other participant of a DM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub with: Option<String>,
    /// The room of a room conversation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Message>,
    pub read: u64,
    pub unread: u64,
}

impl ServerFrame<'_> {
    /// The frame as JSON text. Serialising these types cannot fail (string keys, no
    /// maps with non-string keys), so a failure is a programming error worth a log line,
    /// not a panic.
    pub fn to_text(&self) -> bytestring::ByteString {
        match serde_json::to_string(self) {
            Ok(s) => s.into(),
            Err(e) => {
                log::error!("cannot serialise server frame: {e}");
                r#"{"type":"error","code":"invalid","message":"internal serialisation error"}"#
                    .into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_random_version_4_uuids() {
        let a = new_message_id();
        let b = new_message_id();
        assert_ne!(a, b);
        let u = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version(), Some(uuid::Version::Random));
        assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn ids() {
        assert!(valid_id("alice"));
        assert!(valid_id("A-b_c.9"));
        assert!(valid_id(&"x".repeat(64)));
        assert!(!valid_id(&"x".repeat(65)));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id("a:b"));
        assert!(!valid_id("<script>"));
        assert!(!valid_id("é"));
    }

    #[test]
    fn conversation_ids() {
        assert_eq!(dm_conv("bob", "alice"), "dm:alice:bob");
        assert_eq!(dm_conv("alice", "bob"), "dm:alice:bob");
        // byte order: upper case sorts before lower case
        assert_eq!(dm_conv("bob", "Zed"), "dm:Zed:bob");
        assert_eq!(room_conv("lobby"), "room:lobby");
        assert_eq!(Conv::parse("dm:alice:bob"), Some(Conv::Dm("alice", "bob")));
        assert_eq!(Conv::parse("dm:bob:alice"), None);
        assert_eq!(Conv::parse("dm:alice:alice"), None);
        assert_eq!(Conv::parse("room:lobby"), Some(Conv::Room("lobby")));
        assert_eq!(Conv::parse("room:"), None);
        assert_eq!(Conv::parse("lobby"), None);
        assert!(Conv::parse("dm:alice:bob").unwrap().dm_includes("bob"));
        assert!(!Conv::parse("dm:alice:bob").unwrap().dm_includes("carol"));
    }

    #[test]
    fn parses_every_client_frame() {
        let f = parse_client_frame(r#"{"type":"direct","to":"bob","body":"hi","client_id":"k1"}"#);
        assert_eq!(
            f,
            Ok(ClientFrame::Direct {
                to: "bob".into(),
                body: "hi".into(),
                client_id: "k1".into()
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"remove","room":"t","uid":"c","ban":true}"#),
            Ok(ClientFrame::Remove {
                room: "t".into(),
                uid: "c".into(),
                ban: true
            })
        );
        assert!(matches!(
            parse_client_frame(r#"{"type":"sync"}"#),
            Ok(ClientFrame::Sync { .. })
        ));
        assert!(matches!(
            parse_client_frame(r#"{"type":"history","conv":"room:x"}"#),
            Ok(ClientFrame::History {
                before: None,
                limit: None,
                ..
            })
        ));
    }

    #[test]
    fn classifies_bad_frames() {
        let code = |t: &str| parse_client_frame(t).unwrap_err().code;
        assert_eq!(code("nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"to":"bob"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"direct","to":"bob"}"#), ErrorCode::Invalid);
        assert_eq!(
            code(r#"{"type":"direct","to":5,"body":"x","client_id":"k"}"#),
            ErrorCode::Invalid
        );
        let e = parse_client_frame(r#"{"type":"room","client_id":"k9"}"#).unwrap_err();
        assert_eq!(e.client_id.as_deref(), Some("k9"));
    }

    #[test]
    fn server_frames_match_the_contract() {
        let m = Message::new(
            "dm:alice:bob",
            13,
            "i".into(),
            "alice",
            Some("hi".into()),
            1,
        );
        let v: serde_json::Value =
            serde_json::from_str(&ServerFrame::Message(&m).to_text()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"message","conv":"dm:alice:bob","seq":13,"id":"i",
                "from":"alice","to":"bob","body":"hi","ts":1})
        );
        let v: serde_json::Value = serde_json::from_str(
            &ServerFrame::Presence {
                room: None,
                uid: "bob",
                online: true,
            }
            .to_text(),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"presence","uid":"bob","online":true})
        );
    }
}
