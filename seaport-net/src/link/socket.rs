//! The local end of a stream ([`StreamSocket`]): a client's or backend's
//! TCP connection, or one end of an in-process pair whose other end a
//! program in this process reads and writes ([`StreamSocket::pair`]; the
//! proxy's HTTP gateway speaks HTTP to a backend over one).
//!
//! The data path treats both alike: readiness, then non-blocking reads and
//! writes straight to and from the link's buffers. They differ only in how
//! a reset shows: a TCP peer gets a RST; an in-process peer sees its end
//! shut both ways (a read returns end of file early, a write fails), since
//! a Unix socket has no RST: what it was carrying is cut, and HTTP, say,
//! notices an incomplete message.

use std::io;
use std::net::Shutdown;

use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// A stream's local socket.
#[derive(Debug)]
pub enum StreamSocket {
    /// A TCP connection (a proxy's client, a service's backend).
    Tcp(TcpStream),
    /// One end of an in-process pair.
    Local(UnixStream),
}

impl StreamSocket {
    /// An in-process pair: the first end goes to the link, the second to
    /// the program (it is `AsyncRead + AsyncWrite`).
    pub fn pair() -> io::Result<(StreamSocket, UnixStream)> {
        let (ours, theirs) = UnixStream::pair()?;
        Ok((StreamSocket::Local(ours), theirs))
    }

    pub(super) async fn readable(&self) -> io::Result<()> {
        match self {
            StreamSocket::Tcp(s) => s.readable().await,
            StreamSocket::Local(s) => s.ready(Interest::READABLE).await.map(drop),
        }
    }

    pub(super) async fn writable(&self) -> io::Result<()> {
        match self {
            StreamSocket::Tcp(s) => s.writable().await,
            StreamSocket::Local(s) => s.writable().await,
        }
    }

    pub(super) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            StreamSocket::Tcp(s) => s.try_read(buf),
            StreamSocket::Local(s) => s.try_read(buf),
        }
    }

    pub(super) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            StreamSocket::Tcp(s) => s.try_write(buf),
            StreamSocket::Local(s) => s.try_write(buf),
        }
    }

    /// No more bytes toward the peer (it reads end of file once it has
    /// the rest).
    pub(super) fn shutdown_write(&self) {
        let _ = match self {
            StreamSocket::Tcp(s) => socket2::SockRef::from(s).shutdown(Shutdown::Write),
            StreamSocket::Local(s) => socket2::SockRef::from(s).shutdown(Shutdown::Write),
        };
    }

    /// The stream was reset: a TCP peer gets a RST when the socket closes;
    /// an in-process one has its end shut both ways now.
    pub(super) fn reset(&self) {
        let _ = match self {
            StreamSocket::Tcp(s) => s.set_zero_linger(),
            StreamSocket::Local(s) => socket2::SockRef::from(s).shutdown(Shutdown::Both),
        };
    }
}

impl From<TcpStream> for StreamSocket {
    fn from(stream: TcpStream) -> StreamSocket {
        StreamSocket::Tcp(stream)
    }
}
