//! The local end of a stream ([`StreamSocket`]): a client's or backend's
//! TCP connection, or one end of an in-process pipe whose other end
//! ([`LocalStream`], `AsyncRead + AsyncWrite`) a program in this process
//! reads and writes ([`StreamSocket::pair`]; the proxy's HTTP gateway
//! speaks HTTP to a backend over one).
//!
//! The data path treats both alike: readiness, then non-blocking reads and
//! writes straight to and from the link's buffers. The pipe is two byte
//! queues under one lock, with no socket and no system call between the
//! link and the program: a delivery wakes the program's task directly.
//!
//! Invariants:
//! - Each direction of a pipe holds at most [`PIPE_BYTES`]; a full one
//!   pushes back (the link stops reading its end, the program's write
//!   waits), as a socket buffer would. An emptied queue keeps at most
//!   64 KiB of memory.
//! - The program's end dropped without shutting its writing down is a
//!   reset, as a TCP peer's abort is, not a clean end.
//! - A reset shows: a TCP peer gets a RST; the program's reads and writes
//!   fail with `ConnectionReset`.
//! - Either end going away is the other's end of file (reads) and broken
//!   pipe (writes); nothing waits forever on a dropped end.
//! - The pipe's lock is a leaf: nothing else is locked while it is held.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::lock::lock;

/// Most bytes a pipe holds each way.
pub const PIPE_BYTES: usize = 256 * 1024;

/// A stream's local socket.
#[derive(Debug)]
pub enum StreamSocket {
    /// A TCP connection (a proxy's client, a service's backend).
    Tcp(TcpStream),
    /// The link's end of an in-process pipe.
    Local(LinkEnd),
}

impl StreamSocket {
    /// An in-process pipe: the first end goes to the link, the second to
    /// the program.
    pub fn pair() -> (StreamSocket, LocalStream) {
        let pipe = Arc::new(Pipe::default());
        (StreamSocket::Local(LinkEnd(pipe.clone())), LocalStream(pipe))
    }

    pub(super) async fn readable(&self) -> io::Result<()> {
        match self {
            StreamSocket::Tcp(s) => s.readable().await,
            StreamSocket::Local(end) => {
                end.0
                    .wait(&end.0.link_readable, |s| !s.from_app.is_empty() || s.from_app_ended || s.app_gone)
                    .await;
                Ok(())
            }
        }
    }

    pub(super) async fn writable(&self) -> io::Result<()> {
        match self {
            StreamSocket::Tcp(s) => s.writable().await,
            StreamSocket::Local(end) => {
                end.0.wait(&end.0.link_writable, |s| s.to_app.len() < PIPE_BYTES || s.app_gone).await;
                Ok(())
            }
        }
    }

    /// Up to `limit` bytes waiting on a TCP socket, left there (`MSG_PEEK`):
    /// a client's first bytes, for early data. Nothing from an in-process
    /// end, or when none is waiting.
    pub(super) fn peek_waiting(&self, limit: usize) -> Vec<u8> {
        let StreamSocket::Tcp(s) = self else { return Vec::new() };
        let mut buf = vec![0; limit];
        let flags = rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT;
        match rustix::net::recv(s, &mut buf[..], flags) {
            Ok((n, _)) => buf.truncate(n),
            Err(_) => buf.clear(),
        }
        buf
    }

    pub(super) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StreamSocket::Tcp(s) => s.try_read(buf),
            StreamSocket::Local(end) => {
                let mut state = lock(&end.0.state);
                if state.from_app.is_empty() {
                    return if state.from_app_ended {
                        Ok(0)
                    } else if state.app_gone {
                        // Gone without ending its writing: cut, as a TCP
                        // peer's reset is.
                        Err(io::ErrorKind::ConnectionReset.into())
                    } else {
                        Err(io::ErrorKind::WouldBlock.into())
                    };
                }
                let n = take_into(&mut state.from_app, buf);
                let waker = state.app_writer.take();
                drop(state);
                wake(waker);
                Ok(n)
            }
        }
    }

    pub(super) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            StreamSocket::Tcp(s) => s.try_write(buf),
            StreamSocket::Local(end) => {
                let mut state = lock(&end.0.state);
                if state.app_gone {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                let n = buf.len().min(PIPE_BYTES.saturating_sub(state.to_app.len()));
                if n == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                state.to_app.extend(buf.get(..n).unwrap_or_default());
                let waker = state.app_reader.take();
                drop(state);
                wake(waker);
                Ok(n)
            }
        }
    }

    /// No more bytes toward the peer (it reads end of file once it has
    /// the rest).
    pub(super) fn shutdown_write(&self) {
        match self {
            StreamSocket::Tcp(s) => {
                let _ = socket2::SockRef::from(s).shutdown(Shutdown::Write);
            }
            StreamSocket::Local(end) => {
                let mut state = lock(&end.0.state);
                state.to_app_ended = true;
                let waker = state.app_reader.take();
                drop(state);
                wake(waker);
            }
        }
    }

    /// The stream was reset: a TCP peer gets a RST when the socket closes;
    /// the program's reads and writes fail from now on.
    pub(super) fn reset(&self) {
        match self {
            StreamSocket::Tcp(s) => {
                let _ = s.set_zero_linger();
            }
            StreamSocket::Local(end) => {
                let mut state = lock(&end.0.state);
                state.reset = true;
                let wakers = (state.app_reader.take(), state.app_writer.take());
                drop(state);
                wake(wakers.0);
                wake(wakers.1);
            }
        }
    }
}

impl From<TcpStream> for StreamSocket {
    fn from(stream: TcpStream) -> StreamSocket {
        StreamSocket::Tcp(stream)
    }
}

/// Both directions of a pipe and who waits on them.
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    /// The link's stream task waits here for bytes from the program.
    link_readable: Notify,
    /// The link's stream task waits here for room toward the program.
    link_writable: Notify,
}

#[derive(Default)]
struct PipeState {
    /// Link → program.
    to_app: VecDeque<u8>,
    /// The link will send no more (its peer ended the stream).
    to_app_ended: bool,
    /// Program → link.
    from_app: VecDeque<u8>,
    /// The program shut its writing down.
    from_app_ended: bool,
    /// The stream was reset.
    reset: bool,
    /// The program dropped its end.
    app_gone: bool,
    /// The link dropped its end.
    link_gone: bool,
    app_reader: Option<Waker>,
    app_writer: Option<Waker>,
}

impl Pipe {
    /// Waits, on `notify`, until `ready` holds.
    async fn wait(&self, notify: &Notify, ready: impl Fn(&PipeState) -> bool) {
        loop {
            // Registered before the check: a wake-up between the two is kept.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ready(&lock(&self.state)) {
                return;
            }
            notified.await;
        }
    }
}

/// The link's end of a pipe; dropping it ends the program's reads.
pub struct LinkEnd(Arc<Pipe>);

impl std::fmt::Debug for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkEnd")
    }
}

impl Drop for LinkEnd {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.link_gone = true;
        let wakers = (state.app_reader.take(), state.app_writer.take());
        drop(state);
        wake(wakers.0);
        wake(wakers.1);
    }
}

/// The program's end of an in-process stream: bytes written here go out on
/// the link; bytes the service sends are read here.
pub struct LocalStream(Arc<Pipe>);

impl std::fmt::Debug for LocalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalStream")
    }
}

impl Drop for LocalStream {
    fn drop(&mut self) {
        lock(&self.0.state).app_gone = true;
        self.0.link_readable.notify_one();
        self.0.link_writable.notify_one();
    }
}

impl AsyncRead for LocalStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut state = lock(&self.0.state);
        if state.reset {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if state.to_app.is_empty() {
            if state.to_app_ended || state.link_gone {
                return Poll::Ready(Ok(()));
            }
            state.app_reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = state.to_app.len().min(buf.remaining());
        let (front, back) = state.to_app.as_slices();
        let first = front.len().min(n);
        buf.put_slice(front.get(..first).unwrap_or_default());
        buf.put_slice(back.get(..n - first).unwrap_or_default());
        drain(&mut state.to_app, n);
        drop(state);
        self.0.link_writable.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for LocalStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut state = lock(&self.0.state);
        if state.reset {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if state.link_gone || state.from_app_ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(PIPE_BYTES.saturating_sub(state.from_app.len()));
        if n == 0 && !buf.is_empty() {
            state.app_writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        state.from_app.extend(buf.get(..n).unwrap_or_default());
        drop(state);
        self.0.link_readable.notify_one();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.0.state).from_app_ended = true;
        self.0.link_readable.notify_one();
        Poll::Ready(Ok(()))
    }
}

/// Gives a type that wraps a [`LocalStream`] in its field `$field` the
/// stream's `AsyncRead` and `AsyncWrite`, every call handed to the field:
/// the one place the library's stream types (a service's
/// [`Accepted`](crate::link::Accepted), a client's `Stream`) get their I/O.
#[doc(hidden)]
#[macro_export]
macro_rules! local_stream_io {
    ($ty:ty, $field:ident) => {
        impl $crate::__tokio::io::AsyncRead for $ty {
            fn poll_read(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &mut $crate::__tokio::io::ReadBuf<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                $crate::__tokio::io::AsyncRead::poll_read(::std::pin::Pin::new(&mut self.$field), cx, buf)
            }
        }

        impl $crate::__tokio::io::AsyncWrite for $ty {
            fn poll_write(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
                buf: &[u8],
            ) -> ::std::task::Poll<::std::io::Result<usize>> {
                $crate::__tokio::io::AsyncWrite::poll_write(::std::pin::Pin::new(&mut self.$field), cx, buf)
            }

            fn poll_flush(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                $crate::__tokio::io::AsyncWrite::poll_flush(::std::pin::Pin::new(&mut self.$field), cx)
            }

            fn poll_shutdown(
                mut self: ::std::pin::Pin<&mut Self>,
                cx: &mut ::std::task::Context<'_>,
            ) -> ::std::task::Poll<::std::io::Result<()>> {
                $crate::__tokio::io::AsyncWrite::poll_shutdown(::std::pin::Pin::new(&mut self.$field), cx)
            }
        }
    };
}

/// Moves the front of `queue` into `buf`; returns how much.
fn take_into(queue: &mut VecDeque<u8>, buf: &mut [u8]) -> usize {
    let n = queue.len().min(buf.len());
    let (front, back) = queue.as_slices();
    let first = front.len().min(n);
    if let (Some(dst), Some(src)) = (buf.get_mut(..first), front.get(..first)) {
        dst.copy_from_slice(src);
    }
    if let (Some(dst), Some(src)) = (buf.get_mut(first..n), back.get(..n - first)) {
        dst.copy_from_slice(src);
    }
    drain(queue, n);
    n
}

/// Drops the first `n` bytes of `queue`. An emptied queue above 64 KiB
/// gives its memory back (it may have grown to twice [`PIPE_BYTES`] under
/// push-back), so an idle pipe holds little; smaller ones are kept, so a
/// stream moving frame after frame does not allocate for each.
fn drain(queue: &mut VecDeque<u8>, n: usize) {
    queue.drain(..n);
    if queue.is_empty() && queue.capacity() > 64 * 1024 {
        *queue = VecDeque::new();
    }
}

/// Wakes a program's task; called with the pipe's lock released.
fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_pipe_pushes_back_when_full_and_shows_each_end() {
        let (link, mut app) = StreamSocket::pair();
        // Toward the program: at most PIPE_BYTES, then WouldBlock.
        let big = vec![7u8; PIPE_BYTES + 10];
        assert_eq!(link.try_write(&big).unwrap(), PIPE_BYTES);
        assert_eq!(link.try_write(&big).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let mut got = vec![0u8; 1000];
        assert_eq!(app.read(&mut got).await.unwrap(), 1000);
        link.writable().await.unwrap();
        assert_eq!(link.try_write(&big).unwrap(), 1000);

        // From the program: readable once written; end of file after shutdown.
        let mut buf = [0u8; 16];
        assert_eq!(link.try_read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        app.write_all(b"hello").await.unwrap();
        link.readable().await.unwrap();
        assert_eq!(link.try_read(&mut buf).unwrap(), 5);
        app.shutdown().await.unwrap();
        link.readable().await.unwrap();
        assert_eq!(link.try_read(&mut buf).unwrap(), 0);

        // A reset fails the program's reads; a dropped program end fails
        // the link's writes.
        link.reset();
        assert_eq!(app.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        drop(app);
        assert_eq!(link.try_write(b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);

        // A program gone without shutting its writing down cut the stream:
        // the link resets it rather than end it cleanly.
        let (link, app) = StreamSocket::pair();
        drop(app);
        link.readable().await.unwrap();
        assert_eq!(link.try_read(&mut buf).unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn the_link_ending_is_the_programs_end_of_file() {
        let (link, mut app) = StreamSocket::pair();
        link.try_write(b"last").unwrap();
        link.shutdown_write();
        let mut all = Vec::new();
        app.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last");
        let (link, mut app) = StreamSocket::pair();
        drop(link);
        assert_eq!(app.read(&mut [0u8; 4]).await.unwrap(), 0);
        assert_eq!(app.write(b"x").await.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
