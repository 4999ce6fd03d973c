//! A lingering close, so that a peer always receives the answer it was sent.
//!
//! When a service answers before it has read the whole request (a 403, 404 or 413 sent
//! without reading the body, or a request that arrived in two writes) and then closes the
//! connection while the rest of the request sits unread in the kernel's receive buffer, the
//! kernel resets the connection (TCP sends RST; a Unix socket marks its peer
//! `ECONNRESET`), and the peer's next read fails instead of returning the answer. Both
//! services therefore close like an HTTP server should (RFC 9112 §9.6): shut down the
//! writing side first, then read and discard what the peer still sends until it closes its
//! side, for at most [`LINGER_FOR`] and [`LINGER_BYTES`], whatever the peer does.
//!
//! [`Linger`] wraps a connection's I/O so that its `poll_shutdown` (which hyper calls when it
//! closes a connection it has finished with) does exactly that; [`drain`] is the same for
//! code that writes its own answer.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The longest a closed connection is drained.
pub const LINGER_FOR: Duration = Duration::from_millis(500);

/// The most bytes read from a closed connection before it is dropped anyway.
pub const LINGER_BYTES: usize = 64 * 1024;

/// I/O whose shutdown lingers (see the module docs). Reads and writes pass through.
#[derive(Debug)]
pub struct Linger<I> {
    inner: I,
    state: State,
}

#[derive(Debug)]
enum State {
    Open,
    /// The writing side is being shut down.
    Closing,
    /// Written side shut; draining until the peer closes, the budget is spent or time is up.
    Draining {
        deadline: Pin<Box<Sleep>>,
        read: usize,
    },
    Done,
}

impl<I> Linger<I> {
    /// Wraps `inner`.
    pub fn new(inner: I) -> Self {
        Self {
            inner,
            state: State::Open,
        }
    }

    /// The wrapped I/O.
    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Linger<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Linger<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => this.state = State::Closing,
                State::Closing => {
                    let shut = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
                    if shut.is_err() {
                        this.state = State::Done;
                        return Poll::Ready(shut);
                    }
                    this.state = State::Draining {
                        deadline: Box::pin(tokio::time::sleep(LINGER_FOR)),
                        read: 0,
                    };
                }
                State::Draining { deadline, read } => {
                    if deadline.as_mut().poll(cx).is_ready() || *read >= LINGER_BYTES {
                        this.state = State::Done;
                        continue;
                    }
                    let mut sink = [0u8; 4096];
                    let mut buf = ReadBuf::new(&mut sink);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                        // The deadline is registered with `cx`, so pending ends in time.
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            *read += buf.filled().len();
                        }
                        // The peer closed (or broke) its side: nothing is left to lose.
                        Poll::Ready(_) => this.state = State::Done,
                    }
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Reads and discards what the peer of an already shut-down `io` still sends, until it
/// closes its side, for at most [`LINGER_FOR`] and [`LINGER_BYTES`].
pub async fn drain<I: AsyncRead + Unpin>(io: &mut I) {
    let _ = tokio::time::timeout(LINGER_FOR, async {
        let mut sink = [0u8; 4096];
        let mut seen = 0usize;
        while seen < LINGER_BYTES {
            match io.read(&mut sink).await? {
                0 => break,
                n => seen += n,
            }
        }
        Ok::<(), io::Error>(())
    })
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::AsyncWriteExt as _;

    /// The answer to a request whose body was never read still reaches the peer, which is
    /// sending that body after the answer was written.
    #[tokio::test]
    async fn a_late_body_does_not_reset_the_answer() {
        for _ in 0..50 {
            let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
            let mut server = Linger::new(server);
            let srv = tokio::spawn(async move {
                let mut head = [0u8; 16];
                server.read_exact(&mut head).await.unwrap();
                server.write_all(b"answer").await.unwrap();
                server.shutdown().await.unwrap();
            });
            client.write_all(b"0123456789abcdef").await.unwrap();
            tokio::task::yield_now().await;
            client.write_all(&[7u8; 8192]).await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"answer");
            drop(client);
            srv.await.unwrap();
        }
    }

    /// A peer that never closes holds the closing side for [`LINGER_FOR`] at most, and one
    /// that floods it for [`LINGER_BYTES`] at most.
    #[tokio::test]
    async fn lingering_is_bounded_in_time_and_bytes() {
        let (server, client) = tokio::net::UnixStream::pair().unwrap();
        let mut server = Linger::new(server);
        let start = Instant::now();
        server.shutdown().await.unwrap();
        let took = start.elapsed();
        assert!(took >= LINGER_FOR - Duration::from_millis(20), "{took:?}");
        assert!(took < LINGER_FOR * 4, "{took:?}");
        drop(client);

        let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
        let flood = tokio::spawn(async move {
            let chunk = [1u8; 4096];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let mut server = Linger::new(server);
        let start = Instant::now();
        server.shutdown().await.unwrap();
        assert!(start.elapsed() < LINGER_FOR, "{:?}", start.elapsed());
        drop(server);
        flood.await.unwrap();
    }
}
