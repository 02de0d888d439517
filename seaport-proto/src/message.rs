//! Control messages between services/proxies and the registry.
//!
//! One [`Message`] per transport frame, encoded with postcard. Decoding is
//! strict: trailing bytes, invalid roles or queries and lists over their
//! limits are errors, never partially accepted. A message of a kind this
//! build does not know (a newer peer's) is its own outcome,
//! [`MessageError::UnknownKind`], which carries the request id so the
//! receiver can refuse that one request and keep the session.
//!
//! Wire rules that keep this possible: variants are only ever appended
//! (postcard encodes the variant as its index), and every request's first
//! field is its `u32` id.
//!
//! Invariant: every message that [`Message::decode`] returns, and every one
//! [`Message::encode`] accepts, fits in one frame and respects the limits below.

use std::fmt;
use std::net::SocketAddr;

use crate::keys::PublicKey;
use crate::meet::Ticket;
use crate::noise::MAX_PLAINTEXT;
use crate::role::{Role, RoleQuery};

/// Most addresses one registration or instance carries.
pub const MAX_ADDRS: usize = 8;
/// Most instances in one message: a single-message answer (to a client
/// without [`crate::hello::Capabilities::PARTS`]) reports more as `truncated`.
pub const MAX_INSTANCES: usize = 256;
/// Most instances in one answer sent in parts ([`Message::InstancesPart`]):
/// an answer carries every matching instance, oldest registration first, up
/// to this many and up to [`MAX_ANSWER_BYTES`]; beyond either it says
/// `truncated`. A proxy assembles no more than this either.
pub const MAX_ANSWER_INSTANCES: usize = 4096;
/// Most bytes of instances in one answer sent in parts (about 4,096 instances
/// with two addresses and no tags, 450 with 16 long tags each). Kept below
/// the registry's default per-peer queue (1 MiB) so that one answer always
/// fits in it.
pub const MAX_ANSWER_BYTES: usize = 512 * 1024;
/// Longest error text.
pub const MAX_ERROR_TEXT: usize = 1024;

/// A numeric error code (a number, so newer peers can add codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The message could not be decoded or was not expected: the session ends.
    pub const MALFORMED: ErrorCode = ErrorCode(1);
    /// A per-session limit was reached; the request was refused.
    pub const LIMIT: ErrorCode = ErrorCode(2);
    /// The request names something that does not exist (unknown id).
    pub const UNKNOWN: ErrorCode = ErrorCode(3);
    // Code 4 ("slow") is retired, never to be reused: a peer that does not
    // read its queue cannot read an error behind it either, so the registry
    // drops a slow peer without a word (`CloseReason::Slow` says why, locally).
    /// Another session of the same identity took over: this one ends.
    pub const SUPERSEDED: ErrorCode = ErrorCode(5);
    /// The request is of a kind this peer does not know (it is older): that
    /// request is refused, the session goes on.
    pub const UNSUPPORTED: ErrorCode = ErrorCode(6);
    /// The registry's access control list (`--acl`) does not let this key
    /// register, look up or watch that role name (the text names it); the
    /// request is refused, the session goes on. Also sent when a reloaded
    /// list revokes a registration or ends a watch it no longer grants.
    pub const FORBIDDEN: ErrorCode = ErrorCode(7);
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            ErrorCode::MALFORMED => "malformed",
            ErrorCode::LIMIT => "limit",
            ErrorCode::UNKNOWN => "unknown",
            ErrorCode::SUPERSEDED => "superseded",
            ErrorCode::UNSUPPORTED => "unsupported",
            ErrorCode::FORBIDDEN => "forbidden",
            _ => return write!(f, "code {}", self.0),
        };
        f.write_str(name)
    }
}

/// One registered service instance, as lookups and watches report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Instance {
    /// The service's identity: what a proxy's link handshake is checked against.
    pub key: PublicKey,
    /// Its role.
    pub role: Role,
    /// Where its link port can be dialed, most likely first.
    pub addrs: Vec<SocketAddr>,
}

/// A control message. Non-exhaustive: newer peers add kinds (appended, never
/// inserted; see the crate docs, "How the wire grows").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Service → registry: offer `role` on link `port` of the observed
    /// address and at `addrs`. Re-using an `id` replaces that registration.
    Register {
        /// Chosen by the service, unique within its session.
        id: u32,
        /// What is offered.
        role: Role,
        /// The service's link port.
        port: u16,
        /// Further addresses the service can be dialed at.
        addrs: Vec<SocketAddr>,
    },
    /// Registry → service: registration `id` is live.
    Registered {
        /// The registration's id.
        id: u32,
    },
    /// Service → registry: withdraw registration `id`.
    Unregister {
        /// The registration's id.
        id: u32,
    },
    /// Proxy → registry: one answer with the instances matching `query`.
    Lookup {
        /// Echoed in the answer.
        id: u32,
        /// What to look for.
        query: RoleQuery,
    },
    /// Proxy → registry: answer now, and again on every change of the matching set.
    Watch {
        /// Echoed in every answer; re-using one replaces that watch.
        id: u32,
        /// What to watch.
        query: RoleQuery,
    },
    /// Proxy → registry: stop watch `id`.
    Unwatch {
        /// The watch's id.
        id: u32,
    },
    /// Registry → proxy: the full matching set for lookup or watch `id`;
    /// or, after [`Message::InstancesPart`]s with the same id, the last part
    /// of it.
    Instances {
        /// The lookup's or watch's id.
        id: u32,
        /// The matching instances, oldest registration first.
        instances: Vec<Instance>,
        /// More matched than the answer carries.
        truncated: bool,
    },
    /// Keepalive request; any message counts as a sign of life.
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Keepalive answer.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Something went wrong with request `id` (or with the session).
    Error {
        /// The request it answers, if any.
        id: Option<u32>,
        /// What kind of error.
        code: ErrorCode,
        /// For people.
        text: String,
    },
    /// Proxy → registry: arrange a meeting with the service whose key is
    /// `service`, to punch a path to it or relay through the registry
    /// ([`crate::meet`]). Only to a registry whose reply advertised
    /// [`crate::hello::Capabilities::MEET`].
    Meet {
        /// Echoed in the answer.
        id: u32,
        /// The service's identity.
        service: PublicKey,
        /// The role it registered (it must be registered now): several
        /// processes may share one identity, and this names which.
        role: Role,
    },
    /// Registry → proxy: meeting `id` is arranged; connect with `ticket`.
    MeetReady {
        /// The request's id.
        id: u32,
        /// What admits the proxy's meet connection.
        ticket: Ticket,
    },
    /// Registry → service: proxy `proxy` wants to meet; connect with
    /// `ticket`. Sent only to services that advertised
    /// [`crate::hello::Capabilities::MEET`].
    MeetOffer {
        /// What admits the service's meet connection.
        ticket: Ticket,
        /// Who asked (the key its link handshake will carry).
        proxy: PublicKey,
    },
    /// Registry → proxy: a part of the answer to lookup or watch `id` that
    /// did not fit in one message. The parts of one answer come one after
    /// the other, in order, and the answer ends with `Instances { id, .. }`
    /// (its last part, which says whether it was `truncated`): a proxy acts
    /// on the whole set, never on a part. Sent only to clients whose
    /// handshake advertised [`crate::hello::Capabilities::PARTS`]; others get
    /// one `Instances` cut to a message.
    InstancesPart {
        /// The lookup's or watch's id.
        id: u32,
        /// The part's instances, continuing the order of the previous part.
        instances: Vec<Instance>,
    },
}

/// Why a control message could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// Not a valid postcard encoding of a message (or an invalid role/query in it).
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// Bytes left after the message.
    #[error("{0} unexpected bytes after the control message")]
    TrailingBytes(usize),
    /// A list or text over its limit.
    #[error("control message over a limit: {0}")]
    Limit(&'static str),
    /// The encoding does not fit in one frame.
    #[error("control message of {0} bytes does not fit in one frame")]
    TooLarge(usize),
    /// A kind of message this build does not know (from a newer peer). Not
    /// a broken message: a request of this kind is refused with
    /// [`ErrorCode::UNSUPPORTED`], anything else is ignored.
    #[error("control message of unknown kind {kind}")]
    UnknownKind {
        /// The variant index on the wire.
        kind: u32,
        /// The request's id, read from where every request has it.
        id: Option<u32>,
    },
}

/// Postcard's index of [`Message::Instances`] (variants count from 0 in
/// declaration order; a test pins it).
const INSTANCES_VARIANT: u32 = 6;
/// Postcard's index of [`Message::InstancesPart`] (a test pins it).
const INSTANCES_PART_VARIANT: u32 = 13;
/// How many kinds of message this build knows: variant indexes from here
/// on are a newer peer's (a test pins it to the last variant).
const KNOWN_KINDS: u32 = 14;

impl Instance {
    /// The instance's encoding, for [`encode_instances`].
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }
}

/// Room for the variant, id and length varints (5 bytes each at most) and the flag.
const ENVELOPE: usize = 16;

/// How many of `encoded`, from the start, fit in one message.
fn fitting(encoded: &[&[u8]]) -> usize {
    let mut size = 0;
    encoded
        .iter()
        .take(MAX_INSTANCES)
        .take_while(|item| {
            size += item.len();
            size + ENVELOPE <= MAX_PLAINTEXT
        })
        .count()
}

/// Appends one list message: `variant` (Instances or InstancesPart), `id`,
/// the items, and for `Instances` the `truncated` flag.
fn encode_list(variant: u32, id: u32, items: &[&[u8]], truncated: Option<bool>, out: &mut Vec<u8>) {
    // Three varints: the variant, the id and the list's length (at most MAX_INSTANCES).
    let header: postcard::Result<Vec<u8>> = postcard::to_allocvec(&(variant, id, items.len() as u32));
    out.extend_from_slice(&header.unwrap_or_default());
    for item in items {
        out.extend_from_slice(item);
    }
    if let Some(truncated) = truncated {
        out.push(u8::from(truncated));
    }
}

/// Appends the encoding of `Message::Instances { id, instances, truncated }`
/// built from instances encoded beforehand with [`Instance::encode`], taking
/// as many as fit in one frame (at most [`MAX_INSTANCES`]). A registry answers
/// a client without [`crate::hello::Capabilities::PARTS`] this way: the
/// instances are encoded once, at registration, instead of once per answer.
/// `truncated` is set when not all were taken.
pub fn encode_instances(id: u32, encoded: &[&[u8]], truncated: bool, out: &mut Vec<u8>) {
    let count = fitting(encoded);
    let taken = encoded.get(..count).unwrap_or_default();
    encode_list(INSTANCES_VARIANT, id, taken, Some(truncated || count < encoded.len()), out);
}

/// The messages of a whole answer to lookup or watch `id`, sent in parts:
/// every instance of `encoded` (encoded with [`Instance::encode`]) up to
/// [`MAX_ANSWER_INSTANCES`] and [`MAX_ANSWER_BYTES`], as
/// [`Message::InstancesPart`]s and a last [`Message::Instances`], each
/// message within one frame. An answer that fits one message is exactly the
/// single-message one.
pub fn encode_answer_parts(id: u32, encoded: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut bytes = 0;
    let whole = encoded
        .iter()
        .take(MAX_ANSWER_INSTANCES)
        .take_while(|item| {
            bytes += item.len();
            bytes <= MAX_ANSWER_BYTES
        })
        .count();
    let truncated = whole < encoded.len();
    let mut rest = encoded.get(..whole).unwrap_or_default();
    let mut messages = Vec::new();
    loop {
        // An item too large for any message (none is: an instance is far
        // below a frame) still moves the answer on rather than looping.
        let count = fitting(rest).max(1).min(rest.len());
        let (part, tail) = rest.split_at(count);
        let mut out = Vec::new();
        if tail.is_empty() {
            encode_list(INSTANCES_VARIANT, id, part, Some(truncated), &mut out);
            messages.push(out);
            return messages;
        }
        encode_list(INSTANCES_PART_VARIANT, id, part, None, &mut out);
        messages.push(out);
        rest = tail;
    }
}

impl Message {
    /// Decodes one message, strictly.
    pub fn decode(bytes: &[u8]) -> Result<Message, MessageError> {
        // The variant index comes first; postcard cannot tell an unknown one
        // from a broken message, so it is looked at before postcard is asked.
        if let Ok((kind, rest)) = postcard::take_from_bytes::<u32>(bytes)
            && kind >= KNOWN_KINDS
        {
            let id = postcard::take_from_bytes::<u32>(rest).ok().map(|(id, _)| id);
            return Err(MessageError::UnknownKind { kind, id });
        }
        let (msg, rest): (Message, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|e| MessageError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(MessageError::TrailingBytes(rest.len()));
        }
        msg.check_limits()?;
        Ok(msg)
    }

    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), MessageError> {
        self.check_limits()?;
        let start = out.len();
        let buf = std::mem::take(out);
        *out = postcard::to_extend(self, buf).map_err(|e| MessageError::Malformed(e.to_string()))?;
        let len = out.len() - start;
        if len > MAX_PLAINTEXT {
            out.truncate(start);
            return Err(MessageError::TooLarge(len));
        }
        Ok(())
    }

    /// The kind's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Register { .. } => "Register",
            Message::Registered { .. } => "Registered",
            Message::Unregister { .. } => "Unregister",
            Message::Lookup { .. } => "Lookup",
            Message::Watch { .. } => "Watch",
            Message::Unwatch { .. } => "Unwatch",
            Message::Instances { .. } => "Instances",
            Message::Ping { .. } => "Ping",
            Message::Pong { .. } => "Pong",
            Message::Error { .. } => "Error",
            Message::Meet { .. } => "Meet",
            Message::MeetReady { .. } => "MeetReady",
            Message::MeetOffer { .. } => "MeetOffer",
            Message::InstancesPart { .. } => "InstancesPart",
        }
    }

    fn check_limits(&self) -> Result<(), MessageError> {
        match self {
            Message::Register { addrs, .. } if addrs.len() > MAX_ADDRS => {
                Err(MessageError::Limit("addresses"))
            }
            Message::Instances { instances, .. } | Message::InstancesPart { instances, .. }
                if instances.len() > MAX_INSTANCES =>
            {
                Err(MessageError::Limit("instances"))
            }
            Message::Instances { instances, .. } | Message::InstancesPart { instances, .. }
                if instances.iter().any(|i| i.addrs.len() > MAX_ADDRS + 1) =>
            {
                Err(MessageError::Limit("instance addresses"))
            }
            Message::Error { text, .. } if text.len() > MAX_ERROR_TEXT => {
                Err(MessageError::Limit("error text"))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::keypair;
    use proptest::prelude::*;

    fn instance(n: u8) -> Instance {
        Instance {
            key: keypair(n).public(),
            role: Role::parse("couchdb@3.2.2").unwrap().with_tags(["eu"]).unwrap(),
            addrs: vec!["127.0.0.1:4000".parse().unwrap(), "[::1]:4000".parse().unwrap()],
        }
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Register {
                id: 1,
                role: Role::parse("@a/b@1.0.0-rc.1").unwrap(),
                port: 9,
                addrs: vec!["10.0.0.1:9".parse().unwrap()],
            },
            Message::Registered { id: 1 },
            Message::Unregister { id: 1 },
            Message::Lookup { id: 2, query: RoleQuery::parse("couchdb@3.x").unwrap() },
            Message::Watch { id: 3, query: RoleQuery::parse("couchdb").unwrap() },
            Message::Unwatch { id: 3 },
            Message::Instances { id: 3, instances: vec![instance(1), instance(2)], truncated: false },
            Message::Ping { nonce: u64::MAX },
            Message::Pong { nonce: 0 },
            Message::Error { id: None, code: ErrorCode::LIMIT, text: "too many".into() },
            Message::Meet { id: 4, service: instance(1).key, role: instance(1).role },
            Message::MeetReady { id: 4, ticket: crate::meet::Ticket([3; 16]) },
            Message::MeetOffer { ticket: crate::meet::Ticket([3; 16]), proxy: instance(2).key },
            Message::InstancesPart { id: 3, instances: vec![instance(3)] },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let mut out = vec![0xAA];
            msg.encode(&mut out).unwrap();
            assert_eq!(out[0], 0xAA, "encode appends");
            assert_eq!(Message::decode(&out[1..]), Ok(msg));
        }
    }

    #[test]
    fn variant_indexes_are_pinned() {
        let last = samples().pop().unwrap();
        let mut out = Vec::new();
        last.encode(&mut out).unwrap();
        assert_eq!(u32::from(out[0]) + 1, KNOWN_KINDS, "InstancesPart is the last known kind");
        assert_eq!(u32::from(out[0]), INSTANCES_PART_VARIANT);
        let mut out = Vec::new();
        Message::Instances { id: 0, instances: vec![], truncated: false }.encode(&mut out).unwrap();
        assert_eq!(u32::from(out[0]), INSTANCES_VARIANT);
    }

    #[test]
    fn a_newer_kind_is_unknown_not_malformed() {
        // Kind 14 (one past the last), id 300, then fields we cannot read.
        let mut newer = postcard::to_allocvec(&(KNOWN_KINDS, 300u32)).unwrap();
        newer.extend_from_slice(b"\x05fresh");
        assert_eq!(
            Message::decode(&newer),
            Err(MessageError::UnknownKind { kind: KNOWN_KINDS, id: Some(300) })
        );
        let far = postcard::to_allocvec(&u32::MAX).unwrap();
        assert_eq!(Message::decode(&far), Err(MessageError::UnknownKind { kind: u32::MAX, id: None }));
        // A known kind cut short is still malformed.
        let mut out = Vec::new();
        Message::Lookup { id: 2, query: RoleQuery::parse("db").unwrap() }.encode(&mut out).unwrap();
        out.truncate(out.len() - 1);
        assert!(matches!(Message::decode(&out), Err(MessageError::Malformed(_))));
    }

    #[test]
    fn pre_encoded_answers_match_the_message_encoding() {
        let instances = vec![instance(1), instance(2), instance(3)];
        let encoded: Vec<Vec<u8>> = instances.iter().map(Instance::encode).collect();
        for truncated in [false, true] {
            let mut fast = vec![0xAA];
            let slices: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
            encode_instances(300, &slices, truncated, &mut fast);
            let mut slow = vec![0xAA];
            Message::Instances { id: 300, instances: instances.clone(), truncated }
                .encode(&mut slow)
                .unwrap();
            assert_eq!(fast, slow);
        }
        // More than a frame holds: cut, and flagged.
        let big = instance(4).with_many_tags();
        let one = big.encode();
        let many = vec![one.as_slice(); MAX_INSTANCES];
        let mut out = Vec::new();
        encode_instances(1, &many, false, &mut out);
        assert!(out.len() <= MAX_PLAINTEXT);
        let Ok(Message::Instances { instances, truncated: true, .. }) = Message::decode(&out) else {
            panic!("expected a truncated answer");
        };
        assert!(!instances.is_empty() && instances.len() < MAX_INSTANCES);
    }

    #[test]
    fn a_large_answer_goes_in_parts_each_within_a_frame_and_nothing_is_lost() {
        let big = instance(4).with_many_tags();
        let one = big.encode();
        let many = vec![one.as_slice(); 300];
        let parts = encode_answer_parts(9, &many);
        assert!(parts.len() > 1, "300 big instances take more than one frame");
        let mut got = Vec::new();
        for (n, plain) in parts.iter().enumerate() {
            assert!(plain.len() <= MAX_PLAINTEXT);
            match Message::decode(plain).unwrap() {
                Message::InstancesPart { id: 9, instances } if n + 1 < parts.len() => got.extend(instances),
                Message::Instances { id: 9, instances, truncated: false } if n + 1 == parts.len() => {
                    got.extend(instances)
                }
                other => panic!("part {n}: {other:?}"),
            }
        }
        assert_eq!(got.len(), 300);
        assert!(got.iter().all(|i| *i == big));
        // A small answer is the single-message one, byte for byte.
        let small = [one.as_slice(); 2];
        let mut single = Vec::new();
        encode_instances(9, &small, false, &mut single);
        assert_eq!(encode_answer_parts(9, &small), vec![single]);
        // Nothing at all is one empty Instances.
        let none = encode_answer_parts(9, &[]);
        assert_eq!(none.len(), 1);
        assert_eq!(
            Message::decode(&none[0]),
            Ok(Message::Instances { id: 9, instances: vec![], truncated: false })
        );
    }

    #[test]
    fn an_answer_beyond_its_caps_says_truncated() {
        let small = instance(5).encode();
        let many = vec![small.as_slice(); MAX_ANSWER_INSTANCES + 10];
        let parts = encode_answer_parts(1, &many);
        let mut count = 0;
        let mut truncated = false;
        for plain in &parts {
            match Message::decode(plain).unwrap() {
                Message::InstancesPart { instances, .. } => count += instances.len(),
                Message::Instances { instances, truncated: t, .. } => {
                    count += instances.len();
                    truncated = t;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(count, MAX_ANSWER_INSTANCES);
        assert!(truncated);
        // And by bytes.
        let big = instance(4).with_many_tags().encode();
        let many = vec![big.as_slice(); 1000];
        let total: usize = encode_answer_parts(1, &many)
            .iter()
            .map(|p| match Message::decode(p).unwrap() {
                Message::InstancesPart { instances, .. } | Message::Instances { instances, .. } => {
                    instances.len()
                }
                other => panic!("{other:?}"),
            })
            .sum();
        assert_eq!(total, MAX_ANSWER_BYTES / big.len());
    }

    impl Instance {
        fn with_many_tags(mut self) -> Instance {
            // instance() has one tag already; fill the rest to the limit.
            let tags: Vec<String> = (1..16).map(|i| format!("{i:02}{}", "t".repeat(62))).collect();
            self.role = self.role.with_tags(tags).unwrap();
            self
        }
    }

    #[test]
    fn trailing_bytes_and_limits_are_refused() {
        let mut out = Vec::new();
        Message::Ping { nonce: 1 }.encode(&mut out).unwrap();
        out.push(0);
        assert_eq!(Message::decode(&out), Err(MessageError::TrailingBytes(1)));
        let big =
            Message::Instances { id: 1, instances: vec![instance(1); MAX_INSTANCES + 1], truncated: false };
        assert_eq!(big.encode(&mut Vec::new()), Err(MessageError::Limit("instances")));
    }

    #[test]
    fn invalid_role_inside_a_message_is_refused() {
        let mut out = Vec::new();
        Message::Lookup { id: 1, query: RoleQuery::parse("db@1.x").unwrap() }.encode(&mut out).unwrap();
        // Corrupt the range text "1.x" into "1.y".
        let at = out.iter().rposition(|b| *b == b'x').unwrap();
        out[at] = b'y';
        assert!(matches!(Message::decode(&out), Err(MessageError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(msg) = Message::decode(&bytes) {
                let mut out = Vec::new();
                msg.encode(&mut out).unwrap();
                prop_assert_eq!(Message::decode(&out), Ok(msg));
            }
        }

        #[test]
        fn mutated_messages_never_panic(which in 0usize..14, index in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut out = Vec::new();
            samples()[which].encode(&mut out).unwrap();
            let i = index.index(out.len());
            out[i] = byte;
            let _ = Message::decode(&out);
        }
    }
}
