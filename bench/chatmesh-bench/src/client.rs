//! One benchmark connection, speaking either chatmesh's frames (contract section 3) or
//! Socket.IO 5 over Engine.IO 4 on a websocket, behind one small interface: connect and
//! authenticate, build the frames to send, and classify what arrives.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::BoxError;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Which server the benchmark talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Chatmesh,
    Socketio,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Chatmesh => "chatmesh",
            System::Socketio => "socketio",
        }
    }
}

/// First Socket.IO ack id used for `join`; sends use their sequence number as ack id.
pub const JOIN_ACK_BASE: u64 = 1 << 40;

/// What one incoming text frame means to the benchmark.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A chat message delivered to this connection, with its body.
    Delivery(Cow<'a, str>),
    /// The server accepted a send (`sent`, or a Socket.IO ack with ok) with this number.
    Ack(u64),
    /// The server accepted a `join` (`joined`, or a Socket.IO ack of a join id).
    Joined,
    /// The server refused something (`error`, or an ack without ok).
    Refused { code: String },
    /// Engine.IO ping: answer with a pong.
    Ping,
    /// The server ended the session (Socket.IO disconnect packet).
    Closed,
    /// Anything else (presence, welcome, ...).
    Other,
}

/// Checks that a base URL points at this machine and normalises it to `ws://host:port`.
pub fn normalise_target(url: &str) -> Result<String, BoxError> {
    let url = url.trim().trim_end_matches('/');
    let rest = if let Some(r) = url.strip_prefix("ws://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        r
    } else {
        return Err(
            format!("target {url:?}: use ws://HOST:PORT or http://HOST:PORT (no TLS)").into(),
        );
    };
    if rest.contains('/') || rest.contains('?') {
        return Err(format!("target {url:?}: give the base URL only, without a path").into());
    }
    let host = if let Some(v6) = rest.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        rest.split(':').next().unwrap_or_default()
    };
    let loopback = host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if !loopback {
        return Err(format!("target {url:?}: only loopback targets are allowed").into());
    }
    Ok(format!("ws://{rest}"))
}

/// The socket address of a normalised `ws://host:port` base URL.
pub fn socket_addr(base: &str) -> Result<SocketAddr, BoxError> {
    let rest = base.strip_prefix("ws://").unwrap_or(base);
    let rest = rest.replacen("localhost", "127.0.0.1", 1);
    rest.parse()
        .map_err(|_| format!("{base}: expected ws://IP:PORT or ws://localhost:PORT").into())
}

/// The loopback source address for connection number `i` of a run spread over `spread`
/// addresses (127.0.0.1, 127.0.0.2, ...); none when `spread` is 0.
pub fn source_addr(i: usize, spread: usize) -> Option<IpAddr> {
    (spread > 0).then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % spread.min(250)) as u8)))
}

pub struct Conn {
    pub system: System,
    pub ws: Ws,
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: the idle scenario holds tens of thousands of these, and tungstenite
    // zeroes the whole free part of the read buffer before every read.
    WebSocketConfig::default()
        .read_buffer_size(2 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

impl Conn {
    /// Opens a websocket to `base` as `uid` and waits until the server has accepted the
    /// session: chatmesh's `welcome`, or Socket.IO's connect packet. Bounded by `limit`.
    ///
    /// `source`: the local address to connect from. Spreading many connections over
    /// several loopback source addresses keeps the kernel's ephemeral port search cheap
    /// (one address and one destination port run out of ports near 28,000 connections and
    /// slow down well before that).
    pub async fn connect(
        system: System,
        base: &str,
        uid: &str,
        source: Option<IpAddr>,
        limit: Duration,
    ) -> Result<Conn, BoxError> {
        let deadline = Instant::now() + limit;
        let url = match system {
            System::Chatmesh => format!("{base}/ws?uid={uid}"),
            System::Socketio => format!("{base}/socket.io/?EIO=4&transport=websocket&uid={uid}"),
        };
        let addr = socket_addr(base)?;
        let (ws, _) = timeout(limit, async {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(ip) = source.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            let stream = socket.connect(addr).await?;
            stream.set_nodelay(true)?;
            let (ws, response) = tokio_tungstenite::client_async_with_config(
                url.as_str(),
                MaybeTlsStream::Plain(stream),
                Some(ws_config()),
            )
            .await?;
            Ok::<_, BoxError>((ws, response))
        })
        .await
        .map_err(|_| format!("{url}: connect timed out"))?
        .map_err(|e| format!("{url}: {e}"))?;
        let mut conn = Conn { system, ws };
        match system {
            System::Chatmesh => {
                conn.wait_text(deadline, |t| t.contains(r#""type":"welcome""#))
                    .await
                    .map_err(|e| format!("{url}: waiting for welcome: {e}"))?;
            }
            System::Socketio => {
                conn.wait_text(deadline, |t| t.starts_with('0'))
                    .await
                    .map_err(|e| format!("{url}: waiting for the Engine.IO open packet: {e}"))?;
                let auth = serde_json::json!({ "uid": uid }).to_string();
                conn.send_text(format!("40{auth}")).await?;
                let reply = conn
                    .wait_text(deadline, |t| t.starts_with("40") || t.starts_with("44"))
                    .await
                    .map_err(|e| format!("{url}: waiting for the Socket.IO connect: {e}"))?;
                if reply.starts_with("44") {
                    return Err(format!("{url}: Socket.IO refused the connection: {reply}").into());
                }
            }
        }
        Ok(conn)
    }

    /// Reads frames until one satisfies `done`, answering Engine.IO pings on the way.
    async fn wait_text(
        &mut self,
        deadline: Instant,
        done: impl Fn(&str) -> bool,
    ) -> Result<String, BoxError> {
        // At most this many unrelated frames before giving up (bounded loop).
        for _ in 0..100_000 {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| "timed out")?;
            match next {
                Some(Ok(Message::Text(t))) => {
                    if done(t.as_str()) {
                        return Ok(t.as_str().to_owned());
                    }
                    if self.system == System::Socketio && t.as_str() == "2" {
                        self.send_text("3".into()).await?;
                    }
                    if self.system == System::Chatmesh && t.as_str().contains(r#""type":"error""#) {
                        return Err(format!("server error: {}", t.as_str()).into());
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    return Err(format!("closed by server: {f:?}").into())
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err("connection ended".into()),
            }
        }
        Err("too many frames without the expected one".into())
    }

    pub async fn send_text(&mut self, text: String) -> Result<(), BoxError> {
        self.ws.send(Message::text(text)).await?;
        Ok(())
    }

    /// Joins `room` and waits for the server to confirm.
    pub async fn join(&mut self, room: &str, limit: Duration) -> Result<(), BoxError> {
        let deadline = Instant::now() + limit;
        match self.system {
            System::Chatmesh => {
                let frame = serde_json::json!({"type": "join", "room": room}).to_string();
                self.send_text(frame).await?;
                self.wait_text(deadline, |t| t.contains(r#""type":"joined""#))
                    .await
                    .map_err(|e| format!("join {room}: {e}"))?;
            }
            System::Socketio => {
                let frame = format!(
                    "42{JOIN_ACK_BASE}{}",
                    serde_json::json!(["join", {"room": room}])
                );
                self.send_text(frame).await?;
                let prefix = format!("43{JOIN_ACK_BASE}[");
                let reply = self
                    .wait_text(deadline, |t| t.starts_with(&prefix))
                    .await
                    .map_err(|e| format!("join {room}: {e}"))?;
                if !reply.contains(r#""ok":true"#) {
                    return Err(format!("join {room} refused: {reply}").into());
                }
            }
        }
        Ok(())
    }

    /// Closes the websocket politely, bounded by `limit`.
    pub async fn close(mut self, limit: Duration) {
        let _ = timeout(limit, self.ws.close(None)).await;
    }
}

/// The text frame of a direct message with send number `seq`.
pub fn direct_frame(system: System, to: &str, body: &str, seq: u64) -> String {
    match system {
        System::Chatmesh => {
            format!(r#"{{"type":"direct","to":"{to}","body":"{body}","client_id":"k{seq}"}}"#)
        }
        System::Socketio => {
            format!(r#"42{seq}["direct",{{"to":"{to}","body":"{body}","client_id":"k{seq}"}}]"#)
        }
    }
}

/// The text frame of a room message with send number `seq`.
pub fn room_frame(system: System, room: &str, body: &str, seq: u64) -> String {
    match system {
        System::Chatmesh => {
            format!(r#"{{"type":"room","room":"{room}","body":"{body}","client_id":"k{seq}"}}"#)
        }
        System::Socketio => {
            format!(r#"42{seq}["room",{{"room":"{room}","body":"{body}","client_id":"k{seq}"}}]"#)
        }
    }
}

#[derive(Deserialize)]
struct CmFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    client_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct SioMessage<'a> {
    #[serde(borrow)]
    body: Cow<'a, str>,
}

const SIO_MESSAGE_PREFIX: &str = r#"42["message","#;

/// Classifies one incoming text frame.
pub fn parse(system: System, text: &str) -> Event<'_> {
    match system {
        System::Chatmesh => {
            let Ok(frame) = serde_json::from_str::<CmFrame>(text) else {
                return Event::Refused {
                    code: "bench_unparsable_frame".into(),
                };
            };
            match frame.kind.as_ref() {
                "message" => match frame.body {
                    Some(body) => Event::Delivery(body),
                    None => Event::Other,
                },
                "sent" => Event::Ack(client_seq(frame.client_id.as_deref())),
                "joined" => Event::Joined,
                "error" => Event::Refused {
                    code: frame.code.as_deref().unwrap_or("unknown").to_owned(),
                },
                _ => Event::Other,
            }
        }
        System::Socketio => {
            if text == "2" {
                return Event::Ping;
            }
            if let Some(rest) = text.strip_prefix(SIO_MESSAGE_PREFIX) {
                let obj = rest.strip_suffix(']').unwrap_or(rest);
                return match serde_json::from_str::<SioMessage>(obj) {
                    Ok(m) => Event::Delivery(m.body),
                    Err(_) => Event::Refused {
                        code: "bench_unparsable_frame".into(),
                    },
                };
            }
            if let Some(rest) = text.strip_prefix("43") {
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                let id: u64 = rest[..digits].parse().unwrap_or(u64::MAX);
                let payload = &rest[digits..];
                if !payload.contains(r#""ok":true"#) {
                    return Event::Refused {
                        code: format!("ack {payload}"),
                    };
                }
                return if id >= JOIN_ACK_BASE {
                    Event::Joined
                } else {
                    Event::Ack(id)
                };
            }
            if text.starts_with("41") || text.starts_with('1') {
                return Event::Closed;
            }
            if text.starts_with("44") {
                return Event::Refused {
                    code: format!("connect_error {text}"),
                };
            }
            Event::Other
        }
    }
}

fn client_seq(client_id: Option<&str>) -> u64 {
    client_id
        .and_then(|c| c.strip_prefix('k'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_be_loopback() {
        assert_eq!(
            normalise_target("http://127.0.0.1:8080/").unwrap(),
            "ws://127.0.0.1:8080"
        );
        assert_eq!(
            normalise_target("ws://localhost:1").unwrap(),
            "ws://localhost:1"
        );
        assert!(normalise_target("ws://[::1]:80").is_ok());
        assert!(normalise_target("ws://10.0.0.1:80").is_err());
        assert!(normalise_target("ws://example.com:80").is_err());
        assert!(normalise_target("wss://127.0.0.1:80").is_err());
        assert!(normalise_target("ws://127.0.0.1:80/ws").is_err());
        assert_eq!(
            socket_addr("ws://localhost:9").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert_eq!(source_addr(3, 0), None);
        assert_eq!(source_addr(3, 2), Some("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn parses_chatmesh_frames() {
        let m = r#"{"type":"message","conv":"dm:a:b","seq":1,"id":"x","from":"a","to":"b","body":"1|2|3","ts":1}"#;
        assert_eq!(
            parse(System::Chatmesh, m),
            Event::Delivery(Cow::Borrowed("1|2|3"))
        );
        let s = r#"{"type":"sent","client_id":"k17","conv":"dm:a:b","seq":1,"id":"x","ts":1}"#;
        assert_eq!(parse(System::Chatmesh, s), Event::Ack(17));
        assert_eq!(
            parse(System::Chatmesh, r#"{"type":"joined","room":"r"}"#),
            Event::Joined
        );
        assert_eq!(
            parse(
                System::Chatmesh,
                r#"{"type":"error","code":"rate_limited","message":"slow \"down\""}"#
            ),
            Event::Refused {
                code: "rate_limited".into()
            }
        );
    }

    #[test]
    fn parses_socketio_packets() {
        assert_eq!(parse(System::Socketio, "2"), Event::Ping);
        let m = r#"42["message",{"from":"a","to":"b","body":"1|2|3","ts":5}]"#;
        assert_eq!(
            parse(System::Socketio, m),
            Event::Delivery(Cow::Borrowed("1|2|3"))
        );
        assert_eq!(
            parse(System::Socketio, r#"4312[{"ok":true}]"#),
            Event::Ack(12)
        );
        assert_eq!(
            parse(
                System::Socketio,
                &format!(r#"43{JOIN_ACK_BASE}[{{"ok":true}}]"#)
            ),
            Event::Joined
        );
        assert!(matches!(
            parse(System::Socketio, r#"433[{"ok":false}]"#),
            Event::Refused { .. }
        ));
        assert_eq!(parse(System::Socketio, "41"), Event::Closed);
    }

    #[test]
    fn builds_frames() {
        let f = direct_frame(System::Chatmesh, "bob", "1|2|3", 7);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"direct","to":"bob","body":"1|2|3","client_id":"k7"})
        );
        // The frame is what chatmesh's own parser accepts.
        assert!(chatmesh::protocol::parse_client_frame(&f).is_ok());
        assert!(chatmesh::protocol::parse_client_frame(&room_frame(
            System::Chatmesh,
            "lobby",
            "x",
            1
        ))
        .is_ok());
        let f = room_frame(System::Socketio, "lobby", "x", 3);
        assert_eq!(
            f,
            r#"423["room",{"room":"lobby","body":"x","client_id":"k3"}]"#
        );
    }
}
