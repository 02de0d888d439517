//! seaport-proto: a fully deterministic implementation of seaport's protocol
//! logic. It contains no networking code, reads no clock and draws no
//! randomness of its own: time comes in as an `Instant` argument, randomness
//! as bytes the caller passes in. Two state machines can be wired together in
//! memory and driven, byte for byte and with time advanced by hand, exactly as
//! they run over TCP (`tests/world.rs` does).
//!
//! # Layers, and where a newcomer finds each concern
//! The wire, outermost first:
//! - [`record`]: the 2-byte length prefix around every Noise message; an
//!   incremental decoder for any chunking.
//! - [`noise`]: the `IK` handshakes (`noise/handshake.rs`, over snow) and
//!   the transport that seals records in place (`noise/transport.rs`).
//! - [`hello`]: what every handshake carries and how the wire grows: the
//!   protocol version, a session's intent, capability bits, stamps.
//! - [`session`]: handshake then sealed messages over one stream: the part
//!   every control machine is built on.
//! - [`message`]: the postcard-encoded control messages; [`link::wire`]
//!   the frames a link carries instead.
//!
//! What the messages are about:
//! - [`keys`]: seeds, ed25519 identities and their X25519 (Noise) form.
//! - [`range`], [`role`]: npm version ranges; `Role` and `RoleQuery`.
//! - [`acl`]: who may register and look up which roles (`--acl`).
//! - [`meet`]: how a registry brings a proxy and a service together for hole
//!   punching and relaying: the exchange and its frames.
//!
//! The machines:
//! - [`registry`]: the registry (many sessions). One file per concern:
//!   admission (which connections it takes), replay (stamps, superseding),
//!   outbox (queues, caps, due watch updates), requests (each message under
//!   the access list), its index ([`registry::Directory`]) and its side of
//!   meetings ([`registry::Meetings`]).
//! - [`client`]: the service and proxy, each over one
//!   [`client::ControlSession`] (its control session, keepalive and
//!   reconnects), with backoff and balancing beside them.
//! - [`link`]: streams multiplexed on one proxy–service session. One file
//!   per concern: a stream's states, flow control (credit, windows,
//!   auto-tuning), the round robin, keepalive, the receive path.
//! - `testing` (feature `testing`): the in-memory harness every test and the
//!   registry fuzz target share.
//!
//! Tests: a module that is a folder (`registry/`, `link/`, `noise/`) keeps
//! its unit tests in `tests.rs` beside it; a one-file module keeps them
//! inline. Tests across machines are in `tests/` (the world, the models).
//!
//! # The contract every state machine follows
//! Each is fed input and asked for output, never the other way round:
//! 1. Input: `handle_input(now, bytes)` for bytes read from a stream (a
//!    [`link::Link`] takes one decrypted frame: `handle_frame(now, frame)`),
//!    `handle_closed` when the stream closed (the registry also takes
//!    `accept`; clients `connect`), and `handle_timeout(now)` once the time
//!    returned by `poll_timeout()` has come.
//! 2. After every input, drain `poll_transmit(&mut buf)` until it reports
//!    nothing, writing the bytes to the stream it names; then drain
//!    `poll_event()`; then ask `poll_timeout()` for the next deadline.
//! 3. Bytes may be fed in any chunks; the result is the same.
//!
//! Nothing a peer sends can make these panic or buffer without bound: a bad
//! frame, message or handshake ends that peer's session with a reason, and
//! every queue has a cap stated where it is defined.
//!
//! # How the wire grows
//! Two kinds of change, and only the second breaks anything:
//! - **Compatible additions** keep [`hello::PROTOCOL_VERSION`]. Each side
//!   advertises its optional features as [`hello::Capabilities`] bits in the
//!   handshake (the initiator in its `Hello`, the responder in its reply),
//!   and a feature is used on a session only when both set its bit
//!   ([`session::Session::remote_capabilities`] against
//!   [`hello::CAPABILITIES`]; e.g. a registry sends an answer in parts,
//!   [`message::Message::InstancesPart`], only to a client with
//!   [`hello::Capabilities::PARTS`]; a link is resumable, with `ACK`,
//!   `RESUME` and `RESUMED` frames, only when both ends set
//!   [`hello::Capabilities::RESUME`]; it carries `DATAGRAM` frames only when
//!   both set [`hello::Capabilities::DATAGRAM`]; a proxy puts its client's
//!   address in `OPEN` only for a service that set
//!   [`hello::Capabilities::CLIENT_ADDRESS`], and sends `DATA` before
//!   `ACCEPT` (early data) only to one that set
//!   [`hello::Capabilities::EARLY_DATA`]). Unknown bits are ignored, and so are bytes
//!   after the fields a build knows in either handshake payload: a newer
//!   peer adds fields at the end.
//! - **A new message** is a new [`message::Message`] variant, appended after
//!   the last one (postcard encodes the variant index, so never insert or
//!   reorder), with a `u32` request id as its first field if it is a
//!   request. An older peer decodes it as [`message::MessageError::UnknownKind`]
//!   and answers a request with `Error { id, code: UNSUPPORTED }` and goes
//!   on; the sender treats that as "not here" (a registry ignores unknown
//!   messages that carry no id; a client ignores any unknown message). A
//!   sender that needs the new message answered should first check a
//!   capability bit that names it, and fall back otherwise. A new field in an
//!   existing message is a new message. A new error code needs nothing:
//!   codes are numbers, and unknown ones print as such.
//! - **Breaking changes** (the cipher suite, the framing, the meaning of an
//!   existing field) bump [`hello::PROTOCOL_VERSION`] and the prologue that
//!   binds it: old and new peers then fail the handshake cleanly.
//!
//! A known message that does not decode (cut short, an invalid role, over a
//! limit) is still malformed and ends the session.
//!
//! The data path, a [`link`], uses [`session::Session`] for its handshake
//! only: once established, a data session opens no record itself and hands
//! its [`noise::Transport`] and every byte read past the handshake to the
//! link driver, which carries one [`link::Link`] frame per Noise message.

// Unit tests may panic freely; the non-test build of the crate is held to the
// workspace's no-unwrap, no-indexing rule.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

pub mod acl;
pub mod client;
pub mod hello;
pub mod keys;
pub mod link;
pub mod meet;
pub mod message;
pub mod noise;
pub mod range;
pub mod record;
pub mod registry;
pub mod role;
pub mod session;
#[cfg(feature = "testing")]
pub mod testing;
