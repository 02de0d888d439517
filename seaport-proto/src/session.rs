//! A framed, encrypted session over one byte stream: the handshake, then
//! sealed frames in both directions.
//!
//! [`Session`] is the building block of every state machine here: it turns
//! the raw bytes a driver reads into authenticated plaintext messages, and
//! plaintext into bytes to write. It knows nothing of what the messages mean.
//!
//! Contract: after `handle_input`/`handle_timeout`, take what
//! `poll_message` returns until `None`, then drain `poll_transmit`. This is
//! the reverse of the crate's order for whole machines (transmit, then
//! events), because a session is a part, not a machine: its owner handles
//! each message first, and the replies that queues are what `poll_transmit`
//! then carries. A returned error ends the session: the caller drops it and
//! closes the stream (messages that arrived before the failure in the same
//! input are still in `poll_message`). Buffers are bounded: the decoder
//! holds at most one record, and `poll_message` yields what one input
//! produced.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::hello::{Capabilities, Intent, Stamp};
use crate::keys::{Keypair, PublicKey};
use crate::noise::{Initiator, NoiseError, Responder, Transport};
use crate::record::RecordDecoder;

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The handshake did not complete within its time limit.
    #[error("handshake did not complete in time")]
    HandshakeTimeout,
    /// A handshake or transport message was refused.
    #[error(transparent)]
    Noise(#[from] NoiseError),
    /// The initiator asked for something this responder does not serve.
    #[error("peer asked for a {got:?} session, this endpoint serves {expected:?}")]
    WrongIntent {
        /// What it asked for.
        got: Intent,
        /// What is served here.
        expected: Intent,
    },
    /// The responder refused the session for want of capacity before any
    /// handshake: it answered with an empty frame (no Noise message is
    /// empty) and closed. Not authenticated: it says only "try later".
    #[error("the peer is at its session limit and refused the connection")]
    Busy,
    /// `send` before the handshake completed (a bug in the caller).
    #[error("session is not established yet")]
    NotEstablished,
}

enum Phase {
    Initiating(Box<Initiator>),
    Responding(Box<Responder>),
    Open(Box<Transport>),
    /// Transient state while a handshake step consumes the previous phase.
    Failed,
}

/// One encrypted session; see the module docs for the call order.
pub struct Session {
    phase: Phase,
    intent: Intent,
    decoder: RecordDecoder,
    transmit: Vec<u8>,
    received: VecDeque<Vec<u8>>,
    handshake_deadline: Option<Instant>,
    /// What the peer said it supports in the handshake (none until then).
    remote_capabilities: Capabilities,
    /// The initiator's stamp, on the responder (none until then, or unstamped).
    remote_stamp: Option<Stamp>,
    /// Bytes that came after the handshake on a data session (a link), kept undecoded for the pump that takes the transport over:
    /// only a control session opens frames itself.
    after_handshake: Vec<u8>,
}

impl Session {
    /// Opens a session to `remote`; the first handshake message is ready in
    /// `poll_transmit` at once.
    pub fn initiate(
        now: Instant,
        local: &Keypair,
        remote: &PublicKey,
        intent: Intent,
        entropy: [u8; 32],
        handshake_timeout: Duration,
    ) -> Result<Session, SessionError> {
        Session::initiate_stamped(now, local, remote, intent, entropy, handshake_timeout, None)
    }

    /// `initiate`, with a [`Stamp`] in the hello (a control session's).
    pub fn initiate_stamped(
        now: Instant,
        local: &Keypair,
        remote: &PublicKey,
        intent: Intent,
        entropy: [u8; 32],
        handshake_timeout: Duration,
        stamp: Option<Stamp>,
    ) -> Result<Session, SessionError> {
        let mut transmit = Vec::new();
        let init = Initiator::start_stamped(local, remote, intent, entropy, stamp, &mut transmit)?;
        Ok(Session {
            phase: Phase::Initiating(Box::new(init)),
            intent,
            decoder: RecordDecoder::new(),
            transmit,
            received: VecDeque::new(),
            handshake_deadline: Some(now + handshake_timeout),
            remote_capabilities: Capabilities::NONE,
            remote_stamp: None,
            after_handshake: Vec::new(),
        })
    }

    /// Answers a session that a peer opens, if it asks for `intent`.
    pub fn respond(
        now: Instant,
        local: &Keypair,
        intent: Intent,
        entropy: [u8; 32],
        handshake_timeout: Duration,
    ) -> Result<Session, SessionError> {
        Ok(Session {
            phase: Phase::Responding(Box::new(Responder::new(local, entropy)?)),
            intent,
            decoder: RecordDecoder::new(),
            transmit: Vec::new(),
            received: VecDeque::new(),
            handshake_deadline: Some(now + handshake_timeout),
            remote_capabilities: Capabilities::NONE,
            remote_stamp: None,
            after_handshake: Vec::new(),
        })
    }

    /// Two ends of a session that is open from the start, `a` as `first`'s
    /// end and `b`'s as the second, keyed from `entropy`, with no handshake.
    /// For tests and fuzzing only: identities are taken on trust.
    #[cfg(feature = "testing")]
    pub(crate) fn established_pair(
        a: &Keypair,
        b: &Keypair,
        intent: Intent,
        entropy: [u8; 32],
    ) -> (Session, Session) {
        let mut other = entropy;
        if let Some(first) = other.first_mut() {
            *first ^= 0xff;
        }
        let end = |transport: Transport| Session {
            phase: Phase::Open(Box::new(transport)),
            intent,
            decoder: RecordDecoder::new(),
            transmit: Vec::new(),
            received: VecDeque::new(),
            handshake_deadline: None,
            remote_capabilities: crate::hello::CAPABILITIES,
            remote_stamp: None,
            after_handshake: Vec::new(),
        };
        let (ta, tb) = Transport::pair_for_testing(a.public(), b.public(), entropy, other);
        (end(ta), end(tb))
    }

    /// The authenticated peer, once the handshake is done.
    pub fn remote(&self) -> Option<PublicKey> {
        match &self.phase {
            Phase::Open(t) => Some(t.remote()),
            _ => None,
        }
    }

    /// Whether the handshake is done.
    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// The optional features the peer advertised in the handshake; use one
    /// only if [`crate::hello::CAPABILITIES`] has it too.
    pub fn remote_capabilities(&self) -> Capabilities {
        self.remote_capabilities
    }

    /// The initiator's [`Stamp`], as its responder read it (`None` before
    /// the handshake, on the initiator, or from an unstamped peer).
    pub fn remote_stamp(&self) -> Option<Stamp> {
        self.remote_stamp
    }

    /// What the session is for.
    pub fn intent(&self) -> Intent {
        self.intent
    }

    /// Feeds bytes read from the stream. Reading needs no clock (the
    /// handshake deadline is checked in `handle_timeout`); `now` is taken so
    /// that every state machine is fed the same way.
    pub fn handle_input(&mut self, _now: Instant, data: &[u8]) -> Result<(), SessionError> {
        let mut input = data;
        while !input.is_empty() {
            if self.hands_over() {
                self.after_handshake.extend_from_slice(input);
                break;
            }
            let taken = self.decoder.push(input);
            input = input.get(taken..).unwrap_or_default();
            while !self.hands_over()
                && let Some(frame) = self.decoder.next_record()
            {
                match &mut self.phase {
                    Phase::Open(transport) => {
                        let mut plain = Vec::new();
                        transport.open(frame, &mut plain)?;
                        self.received.push_back(plain);
                    }
                    phase => {
                        let next = match std::mem::replace(phase, Phase::Failed) {
                            Phase::Initiating(_) if frame.is_empty() => return Err(SessionError::Busy),
                            Phase::Initiating(init) => {
                                let (capabilities, transport) = init.finish(frame)?;
                                self.remote_capabilities = capabilities;
                                transport
                            }
                            Phase::Responding(resp) => {
                                let (hello, transport) = resp
                                    .accept_for(self.intent, frame, &mut self.transmit)
                                    .map_err(|e| match e {
                                        NoiseError::WrongIntent { got, expected } => {
                                            SessionError::WrongIntent { got, expected }
                                        }
                                        other => other.into(),
                                    })?;
                                self.remote_capabilities = hello.capabilities;
                                self.remote_stamp = hello.stamp;
                                transport
                            }
                            Phase::Open(_) | Phase::Failed => return Err(NoiseError::Decrypt.into()),
                        };
                        *phase = Phase::Open(Box::new(next));
                        self.handshake_deadline = None;
                    }
                }
            }
        }
        // Control messages are small and arrive whole: an idle session holds no buffer.
        self.decoder.release();
        Ok(())
    }

    /// Checks the handshake deadline.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        match self.handshake_deadline {
            Some(deadline) if now >= deadline => Err(SessionError::HandshakeTimeout),
            _ => Ok(()),
        }
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.handshake_deadline
    }

    /// The next received plaintext message.
    pub fn poll_message(&mut self) -> Option<Vec<u8>> {
        self.received.pop_front()
    }

    /// Seals one plaintext message (at most one frame) for sending.
    pub fn send(&mut self, plaintext: &[u8]) -> Result<(), SessionError> {
        match &mut self.phase {
            Phase::Open(t) => Ok(t.seal(plaintext, &mut self.transmit)?),
            _ => Err(SessionError::NotEstablished),
        }
    }

    /// Moves the bytes waiting to be written into `buf`; false if there were none.
    pub fn poll_transmit(&mut self, buf: &mut Vec<u8>) -> bool {
        if self.transmit.is_empty() {
            return false;
        }
        buf.append(&mut self.transmit);
        true
    }

    /// Bytes waiting in `poll_transmit`.
    pub fn pending_transmit(&self) -> usize {
        self.transmit.len()
    }

    /// Whether this is a data session whose handshake is done: its frames
    /// are left for the pump that takes the transport over.
    fn hands_over(&self) -> bool {
        self.intent != Intent::Control && matches!(self.phase, Phase::Open(_))
    }

    /// Hands the established transport to a data pump, with any bytes already
    /// read past the handshake, still sealed (a data session never opens a
    /// frame after its handshake, so none is lost in between). `None` before
    /// the handshake is done.
    pub fn into_transport(self) -> Option<(Transport, Vec<u8>)> {
        match self.phase {
            Phase::Open(t) => {
                let mut leftover = self.decoder.into_buffered();
                leftover.extend_from_slice(&self.after_handshake);
                Some((*t, leftover))
            }
            _ => None,
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = match &self.phase {
            Phase::Initiating(_) => "initiating",
            Phase::Responding(_) => "responding",
            Phase::Open(_) => "open",
            Phase::Failed => "failed",
        };
        write!(f, "Session({phase}, {:?}, remote {:?})", self.intent, self.remote())
    }
}

/// Test support: a session that claims what an older (or newer) peer
/// advertised, for tests of what the registry sends whom.
#[cfg(feature = "testing")]
impl Session {
    /// Sets what the remote side is taken to support.
    pub fn set_remote_capabilities(&mut self, capabilities: Capabilities) {
        self.remote_capabilities = capabilities;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Seed;

    fn pair(n: u8) -> Keypair {
        Keypair::from_seed(&Seed::from_bytes([n; 32]))
    }

    #[test]
    fn a_data_session_hands_over_frames_that_came_with_the_handshake() {
        let now = Instant::now();
        let t = Duration::from_secs(5);
        let mut c = Session::initiate(now, &pair(1), &pair(2).public(), Intent::Link, [1; 32], t).unwrap();
        let mut s = Session::respond(now, &pair(2), Intent::Link, [2; 32], t).unwrap();
        let mut wire = Vec::new();
        c.poll_transmit(&mut wire);
        s.handle_input(now, &wire).unwrap();
        wire.clear();
        s.poll_transmit(&mut wire);
        // The responder's first transport frame rides in the same read as its reply.
        let (mut theirs, _) = s.into_transport().unwrap();
        theirs.seal(b"first frame", &mut wire).unwrap();
        c.handle_input(now, &wire).unwrap();
        assert_eq!(c.poll_message(), None, "a data session opens no frame itself");
        let (mut ours, leftover) = c.into_transport().unwrap();
        let mut decoder = crate::record::RecordDecoder::new();
        decoder.push(&leftover);
        let mut plain = Vec::new();
        ours.open(decoder.next_record().unwrap(), &mut plain).unwrap();
        assert_eq!(plain, b"first frame");
    }

    #[test]
    fn an_empty_answer_to_a_hello_means_busy() {
        let now = Instant::now();
        let t = Duration::from_secs(5);
        let mut c = Session::initiate(now, &pair(1), &pair(2).public(), Intent::Control, [1; 32], t).unwrap();
        assert_eq!(c.handle_input(now, &[0, 0]).unwrap_err(), SessionError::Busy);
        // Once established, an empty frame is just a frame that fails to open.
        let mut s = Session::respond(now, &pair(2), Intent::Control, [2; 32], t).unwrap();
        assert!(matches!(s.handle_input(now, &[0, 0]), Err(SessionError::Noise(_))));
    }

    #[test]
    fn byte_at_a_time_handshake_and_messages() {
        let now = Instant::now();
        let t = Duration::from_secs(5);
        let mut c = Session::initiate(now, &pair(1), &pair(2).public(), Intent::Control, [1; 32], t).unwrap();
        let mut s = Session::respond(now, &pair(2), Intent::Control, [2; 32], t).unwrap();
        let mut wire = Vec::new();
        assert!(c.poll_transmit(&mut wire));
        for b in &wire {
            s.handle_input(now, std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(s.remote(), Some(pair(1).public()));
        wire.clear();
        s.poll_transmit(&mut wire);
        s.send(b"hello").unwrap();
        s.poll_transmit(&mut wire);
        c.handle_input(now, &wire).unwrap();
        assert_eq!(c.remote(), Some(pair(2).public()));
        assert_eq!(c.poll_message().as_deref(), Some(&b"hello"[..]));
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn wrong_intent_and_timeout_end_the_session() {
        let now = Instant::now();
        let t = Duration::from_secs(5);
        let mut c = Session::initiate(now, &pair(1), &pair(2).public(), Intent::Link, [1; 32], t).unwrap();
        let mut s = Session::respond(now, &pair(2), Intent::Control, [2; 32], t).unwrap();
        let mut wire = Vec::new();
        c.poll_transmit(&mut wire);
        assert!(matches!(s.handle_input(now, &wire), Err(SessionError::WrongIntent { .. })));
        assert_eq!(c.handle_timeout(now + t), Err(SessionError::HandshakeTimeout));
        assert!(c.handle_timeout(now + t / 2).is_ok());
        assert!(c.send(b"x").is_err());
    }
}
