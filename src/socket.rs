//! The public listener's connections, wrapped so the server can drop one.
//!
//! actix-http polls a response body only while its write buffer has room. A client that
//! never reads fills the socket, actix-http stops polling the websocket's body, and
//! nothing queued in the body (not even a close frame) is ever written: the connection
//! would stay open for as long as the client keeps its TCP window shut. So every
//! accepted connection is wrapped in [`Guarded`], whose [`KillSwitch`] the websocket
//! handler finds in the connection's data: [`KillSwitch::kill`] wakes the connection's
//! task, the next read or write fails, and actix-http drops the connection, which is
//! closed with a reset (`SO_LINGER` 0) so no unread data keeps it alive.
//!
//! Nothing here touches a file descriptor from outside the connection's own task, so a
//! switch that outlives its connection is harmless.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Drops one connection from anywhere.
#[derive(Debug, Default)]
pub struct KillSwitch {
    killed: AtomicBool,
    waker: AtomicWaker,
}

impl KillSwitch {
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }
}

/// A TCP connection with a [`KillSwitch`].
pub struct Guarded {
    io: TcpStream,
    switch: Arc<KillSwitch>,
    reset: bool,
}

impl Guarded {
    pub fn new(io: TcpStream) -> Self {
        Guarded {
            io,
            switch: Arc::new(KillSwitch::default()),
            reset: false,
        }
    }

    pub fn switch(&self) -> Arc<KillSwitch> {
        self.switch.clone()
    }

    /// Err once the switch is off; registers the task to be woken when it is.
    fn check(&mut self, cx: &Context<'_>) -> Result<(), io::Error> {
        self.switch.waker.register(cx.waker());
        if !self.switch.is_killed() {
            return Ok(());
        }
        if !self.reset {
            self.reset = true;
            // Close with a reset: unsent data must not keep the connection alive.
            if let Err(e) = socket2::SockRef::from(&self.io).set_linger(Some(Duration::ZERO)) {
                log::debug!("cannot set SO_LINGER on a dropped connection: {e}");
            }
        }
        Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "connection dropped by the server",
        ))
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Err(e) = self.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
