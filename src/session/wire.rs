//! The websocket on the wire, on actix-http's frame codec: [`FrameReader`] turns the
//! request payload into frames, [`OutboxBody`] turns a connection's [`Outbox`] into the
//! response body.
//!
//! - **Size limits at the header.** actix-http's parser checks a frame's length only
//!   after the whole frame is buffered, so a header announcing 1 GiB would be read into
//!   memory first. The reader looks at the length in the header of the frame at the
//!   front of its buffer before asking the codec for more, and fails as soon as it is
//!   over the limit: nothing of that frame is buffered beyond what one read brought.
//! - **Backpressure both ways.** The reader pulls from the payload only when it needs
//!   bytes for the next frame, and the session pulls frames only when it can take a
//!   request; the body takes from the outbox only when actix-http asks for more, which
//!   it does only when the socket has room.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Message, ProtocolError};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;

use crate::metrics::Metrics;
use crate::outbox::{OutFrame, Outbox};

/// Most bytes the body takes from the outbox per poll.
const BODY_BUDGET: usize = 64 * 1024;

/// The payload length announced by the frame header at the front of `buf`, once the
/// header's length bytes are there (RFC 6455 section 5.2).
pub fn announced_len(buf: &[u8]) -> Option<u64> {
    let second = *buf.get(1)?;
    match second & 0x7F {
        126 => {
            let b = buf.get(2..4)?;
            Some(u64::from(u16::from_be_bytes([b[0], b[1]])))
        }
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            Some(u64::from_be_bytes(b))
        }
        n => Some(u64::from(n)),
    }
}

/// Frames from a websocket request's payload.
pub struct FrameReader<S> {
    payload: S,
    buf: BytesMut,
    codec: Codec,
    max: usize,
    eof: bool,
}

impl<S> FrameReader<S> {
    pub fn new(payload: S, max_frame: usize) -> Self {
        FrameReader {
            payload,
            buf: BytesMut::new(),
            codec: Codec::new().max_size(max_frame),
            max: max_frame,
            eof: false,
        }
    }
}

impl<S, E> Stream for FrameReader<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<Frame, ProtocolError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if announced_len(&this.buf).is_some_and(|n| n > this.max as u64) {
                this.eof = true;
                this.buf.clear();
                return Poll::Ready(Some(Err(ProtocolError::Overflow)));
            }
            match this.codec.decode(&mut this.buf) {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.eof = true;
                    this.buf.clear();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if this.eof {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.payload).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => this.buf.extend_from_slice(&chunk),
                Poll::Ready(Some(Err(e))) => {
                    this.eof = true;
                    return Poll::Ready(Some(Err(ProtocolError::Io(std::io::Error::other(
                        e.to_string(),
                    )))));
                }
                Poll::Ready(None) => this.eof = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The websocket response body: frames from the outbox, encoded, as the socket takes
/// them; ends after the close frame.
pub struct OutboxBody {
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    codec: Codec,
    buf: BytesMut,
    done: bool,
}

impl OutboxBody {
    pub fn new(outbox: Arc<Outbox>, metrics: Arc<Metrics>) -> Self {
        OutboxBody {
            outbox,
            metrics,
            codec: Codec::new(),
            buf: BytesMut::new(),
            done: false,
        }
    }

    fn encode(&mut self, msg: Message) {
        if let Err(e) = self.codec.encode(msg, &mut self.buf) {
            log::error!("cannot encode a websocket frame: {e}");
        }
    }
}

impl Stream for OutboxBody {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        // Registered before taking, so a frame pushed meanwhile wakes us.
        self.outbox.register(cx.waker());
        let taken = self.outbox.take(BODY_BUDGET);
        self.metrics.deliveries.inc_by(taken.messages);
        if taken.resync {
            self.metrics.resyncs.inc();
        }
        for frame in taken.frames {
            let msg = match frame {
                OutFrame::Text(t) => Message::Text(t),
                OutFrame::Ping(b) => Message::Ping(b),
                OutFrame::Pong(b) => Message::Pong(b),
            };
            self.encode(msg);
        }
        if let Some(close) = taken.close {
            self.encode(Message::Close(Some(CloseReason {
                code: CloseCode::from(close.code),
                description: Some(close.reason),
            })));
            self.done = true;
        }
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            return Poll::Ready(Some(Ok(chunk)));
        }
        if self.done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_come_from_the_header_alone() {
        assert_eq!(announced_len(&[0x81]), None);
        assert_eq!(announced_len(&[0x81, 0x85]), Some(5));
        assert_eq!(
            announced_len(&[0x81, 0xFE]),
            None,
            "16-bit length not there yet"
        );
        assert_eq!(announced_len(&[0x81, 0xFE, 0x01, 0x00]), Some(256));
        let mut giant = vec![0x81, 0xFF];
        giant.extend_from_slice(&(1u64 << 30).to_be_bytes());
        assert_eq!(announced_len(&giant), Some(1 << 30));
        assert_eq!(announced_len(&giant[..9]), None);
    }

    #[tokio::test]
    async fn an_oversized_header_fails_before_its_payload_arrives() {
        let mut header = vec![0x81, 0xFF];
        header.extend_from_slice(&(1u64 << 30).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]); // mask
        let payload =
            futures_util::stream::iter(vec![Ok::<_, std::io::Error>(Bytes::from(header))]);
        let mut reader = FrameReader::new(payload, 64 * 1024);
        let next = futures_util::StreamExt::next(&mut reader).await;
        assert!(
            matches!(next, Some(Err(ProtocolError::Overflow))),
            "{next:?}"
        );
    }
}
