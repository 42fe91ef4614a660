//! Server-rendered pages (askama templates in `templates/`) and the embedded static
//! files they load. Everything a page needs is served by the node itself: no CDN.

use askama::Template;

/// `GET /`: choose your id and a person or room, or create a private room.
#[derive(Template)]
#[template(path = "index.html")]
pub struct IndexPage<'a> {
    pub node: &'a str,
    /// Development mode: `?uid=` is trusted, so the page may offer any id.
    pub dev_mode: bool,
    /// Prefilled values from the query string, if any (already validated or empty).
    pub uid: &'a str,
    pub to: &'a str,
    pub room: &'a str,
}

/// The messenger: `GET /chat?uid=U&to=V`, `GET /chat?uid=U&room=R` (the conversation
/// open) and `GET /inbox?uid=U` (none open). In JWT mode `uid` may be empty: the page
/// learns who it is from the token it keeps.
#[derive(Template)]
#[template(path = "chat.html")]
pub struct ChatPage<'a> {
    pub node: &'a str,
    pub dev_mode: bool,
    pub uid: &'a str,
    /// At most one of `to` and `room` is non-empty.
    pub to: &'a str,
    pub room: &'a str,
    /// The conversation id the page opens (`dm:A:B` or `room:R`), or empty (the inbox
    /// only, or a DM whose uid the page learns from its token).
    pub conv: &'a str,
    /// `private` or `public` when the page creates `room` first (the start page's
    /// "Create private room"), else empty.
    pub create: &'a str,
}

/// Static files, compiled into the binary so it runs from any directory.
pub struct StaticFile {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

pub const STATIC_FILES: &[StaticFile] = &[
    StaticFile {
        path: "chatmesh.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../static/chatmesh.js"),
    },
    StaticFile {
        path: "chat.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../static/chat.js"),
    },
    StaticFile {
        path: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../static/style.css"),
    },
];

/// A page that explains what was wrong with the request (400).
#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage<'a> {
    pub node: &'a str,
    pub dev_mode: bool,
    pub message: &'a str,
}

/// Any route that does not exist (404).
#[derive(Template)]
#[template(path = "not_found.html")]
pub struct NotFoundPage<'a> {
    pub node: &'a str,
    pub dev_mode: bool,
    pub path: &'a str,
}
