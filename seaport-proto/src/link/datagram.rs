//! Datagrams: UDP flows beside the streams of a link, once both ends
//! advertised [`Capabilities::DATAGRAM`](crate::hello::Capabilities::DATAGRAM)
//! and the driver said so ([`Link::allow_datagrams`]).
//!
//! A datagram is one `DATAGRAM` frame: a flow id and 0 to [`MAX_DATAGRAM`]
//! bytes, the whole UDP payload, never cut or split. Datagrams are
//! unreliable by design, as UDP is:
//! - They take no credit and grant none: a stream's window never holds a
//!   datagram back, and a datagram never uses a stream's credit. What the
//!   link cannot carry now the driver drops (it keeps a short queue, and
//!   drops its oldest entry when full), and counts.
//! - They are unnumbered on a resumable link: not kept for resending, not
//!   counted in `ACK`s, and dropped while the link is between paths.
//! - The machine keeps no per-flow state. Which socket a flow's datagrams
//!   go to is the driver's (`seaport-net`'s flows); the proxy numbers flows
//!   1, 2, 3, … per link, as it numbers streams.
//!
//! Invariant: a datagram from a peer that was not offered datagrams is a
//! protocol error (the bit says the frame may be sent), as is one above
//! [`MAX_DATAGRAM`] (it cannot have come from a UDP socket).

use super::Link;
use super::error::{LinkError, StreamError};
use super::event::Incoming;
use super::wire::{self, FlowId, HEADER_LEN, MAX_DATAGRAM};

impl Link {
    /// Both ends advertised datagrams: the link sends and takes them.
    pub fn allow_datagrams(&mut self) {
        self.datagrams = true;
    }

    /// Whether the link carries datagrams.
    pub fn takes_datagrams(&self) -> bool {
        self.datagrams
    }

    /// Writes the header of a `DATAGRAM` of flow `flow` carrying `len`
    /// bytes into `out[..HEADER_LEN]` (the payload follows it in the same
    /// buffer). Returns [`HEADER_LEN`]. A datagram never waits for credit:
    /// this fails only when the link cannot carry it at all (closed,
    /// between paths, no datagrams, too long, flow 0), and the driver drops it.
    pub fn datagram_header(
        &mut self,
        flow: FlowId,
        len: usize,
        out: &mut [u8],
    ) -> Result<usize, StreamError> {
        self.check_open()?;
        if !self.datagrams {
            return Err(StreamError::NoDatagrams);
        }
        if self.is_detached() {
            return Err(StreamError::Detached);
        }
        if len > MAX_DATAGRAM {
            return Err(StreamError::DatagramTooLong(len));
        }
        // The peer refuses flow 0: never send what it must refuse.
        if flow.get() == 0 {
            return Err(StreamError::ZeroFlow);
        }
        wire::write_datagram_header(flow, out).ok_or(StreamError::BufferTooSmall)?;
        Ok(HEADER_LEN)
    }

    /// A `DATAGRAM` from the peer: handed back at once, like data.
    pub(super) fn on_datagram<'a>(
        &mut self,
        flow: FlowId,
        bytes: &'a [u8],
    ) -> Result<Option<Incoming<'a>>, LinkError> {
        if !self.datagrams {
            return Err(LinkError::NoDatagrams);
        }
        Ok(Some(Incoming::Datagram { flow, bytes }))
    }
}
