use super::handshake::builder;
use super::transport::{aead_key, nonce};
use super::*;
use crate::hello::{CAPABILITIES, Capabilities, HELLO_BASE_LEN, Hello, Stamp};
use crate::keys::{Keypair, PublicKey};
use crate::record::{self, RecordDecoder};
use crate::testing::keypair;
use proptest::prelude::*;

fn body(wire: &[u8]) -> Vec<u8> {
    let mut decoder = RecordDecoder::new();
    assert_eq!(decoder.push(wire), wire.len());
    decoder.next_record().unwrap().to_vec()
}

fn handshake(e1: [u8; 32], e2: [u8; 32]) -> (Transport, Transport, Hello) {
    let (client, server) = (keypair(1), keypair(2));
    let mut wire = Vec::new();
    let init = Initiator::start(&client, &server.public(), Intent::Link, e1, &mut wire).unwrap();
    let resp = Responder::new(&server, e2).unwrap();
    let mut reply = Vec::new();
    let (hello, server_t) = resp.accept(&body(&wire), &mut reply).unwrap();
    let (caps, client_t) = init.finish(&body(&reply)).unwrap();
    assert_eq!(caps, CAPABILITIES);
    (client_t, server_t, hello)
}

/// The first message of an initiator that sends `payload` as its hello.
fn first_message_with(client: &Keypair, server: &PublicKey, payload: &[u8]) -> (Initiator, Vec<u8>) {
    let secret = client.x25519_secret();
    let state = builder(&secret, client.x25519_public(), [7; 32])
        .unwrap()
        .remote_public_key(&server.to_x25519())
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut wire = Vec::new();
    let init = Initiator::start_with_payload(state, *server, payload, &mut wire).unwrap();
    (init, body(&wire))
}

/// A hello as a peer encodes it: the known fields, then whatever `extra` it adds.
fn hello_bytes(client: &Keypair, caps: Option<u64>, extra: &[u8]) -> Vec<u8> {
    let mut payload = PROTOCOL_VERSION.to_be_bytes().to_vec();
    payload.push(1);
    payload.extend_from_slice(client.public().as_bytes());
    if let Some(caps) = caps {
        payload.extend_from_slice(&caps.to_be_bytes());
    }
    payload.extend_from_slice(extra);
    payload
}

#[test]
fn a_newer_initiator_with_unknown_capabilities_and_fields_is_accepted() {
    let (client, server) = (keypair(1), keypair(2));
    // Capabilities, a stamp, then a field this build does not know.
    let mut after_caps = [5u64.to_be_bytes(), 9u64.to_be_bytes()].concat();
    after_caps.extend_from_slice(b"a field from the future");
    let newer = hello_bytes(&client, Some(1 << 63 | 1 << 5 | CAPABILITIES.0), &after_caps);
    let (init, first) = first_message_with(&client, &server.public(), &newer);
    let mut reply = Vec::new();
    let (hello, _) = Responder::new(&server, [4; 32]).unwrap().accept(&first, &mut reply).unwrap();
    assert_eq!(hello.intent, Intent::Control);
    assert_eq!(hello.capabilities, Capabilities(1 << 63 | 1 << 5 | CAPABILITIES.0));
    assert_eq!(hello.stamp, Some(Stamp { process: 5, counter: 9 }));
    assert_eq!(hello.capabilities.common(CAPABILITIES), CAPABILITIES, "unknown bits are not used");
    assert_eq!(init.finish(&body(&reply)).unwrap().0, CAPABILITIES);
}

#[test]
fn every_intent_survives_the_hello() {
    for intent in [Intent::Control, Intent::Link] {
        for stamp in [None, Some(Stamp { process: u64::MAX, counter: 1 })] {
            let hello = Hello {
                version: PROTOCOL_VERSION,
                intent,
                key: keypair(1).public(),
                capabilities: CAPABILITIES,
                stamp,
            };
            assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
        }
    }
}

#[test]
fn a_hello_from_before_capabilities_has_none() {
    let (client, server) = (keypair(1), keypair(2));
    let (_, first) = first_message_with(&client, &server.public(), &hello_bytes(&client, None, b""));
    let (hello, _) = Responder::new(&server, [4; 32]).unwrap().accept(&first, &mut Vec::new()).unwrap();
    assert_eq!(hello.capabilities, Capabilities::NONE);
}

#[test]
fn a_hello_cut_short_or_of_another_version_is_refused() {
    let (client, server) = (keypair(1), keypair(2));
    let full = hello_bytes(&client, Some(0), b"");
    let (_, first) = first_message_with(&client, &server.public(), &full[..HELLO_BASE_LEN - 1]);
    let refused = Responder::new(&server, [4; 32]).unwrap().accept(&first, &mut Vec::new());
    assert_eq!(refused.unwrap_err(), NoiseError::BadHello);
    let mut other = full;
    other[..2].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
    let (_, first) = first_message_with(&client, &server.public(), &other);
    let refused = Responder::new(&server, [4; 32]).unwrap().accept(&first, &mut Vec::new());
    assert_eq!(refused.unwrap_err(), NoiseError::Version(PROTOCOL_VERSION + 1));
}

#[test]
fn a_newer_responder_with_unknown_capabilities_and_fields_is_accepted() {
    let (client, server) = (keypair(1), keypair(2));
    let mut wire = Vec::new();
    let init = Initiator::start(&client, &server.public(), Intent::Control, [3; 32], &mut wire).unwrap();
    let mut newer = (1u64 << 62).to_be_bytes().to_vec();
    newer.extend_from_slice(b"more from the future");
    let mut reply = Vec::new();
    let resp = Responder::new(&server, [4; 32]).unwrap();
    let (hello, mut server_t) = resp.accept_with_payload(&body(&wire), &mut reply, &newer, None).unwrap();
    assert_eq!(hello.capabilities, CAPABILITIES);
    let (caps, mut client_t) = init.finish(&body(&reply)).unwrap();
    assert_eq!(caps, Capabilities(1 << 62));
    // And from a responder before capabilities: an empty reply, no capabilities.
    let mut wire = Vec::new();
    let init = Initiator::start(&client, &server.public(), Intent::Control, [3; 32], &mut wire).unwrap();
    let mut reply = Vec::new();
    let resp = Responder::new(&server, [4; 32]).unwrap();
    resp.accept_with_payload(&body(&wire), &mut reply, &[], None).unwrap();
    assert_eq!(init.finish(&body(&reply)).unwrap().0, Capabilities::NONE);
    // The first session still carries data.
    let mut sealed = Vec::new();
    server_t.seal(b"ok", &mut sealed).unwrap();
    let mut plain = Vec::new();
    client_t.open(&body(&sealed), &mut plain).unwrap();
    assert_eq!(plain, b"ok");
}

proptest! {
    #[test]
    fn pairs_agree(e1 in any::<[u8; 32]>(), e2 in any::<[u8; 32]>(),
                   msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..8)) {
        let (mut c, mut s, hello) = handshake(e1, e2);
        prop_assert_eq!(hello.key, keypair(1).public());
        prop_assert_eq!(hello.intent, Intent::Link);
        prop_assert_eq!(c.remote(), keypair(2).public());
        prop_assert_eq!(s.remote(), keypair(1).public());
        for m in &msgs {
            let mut wire = Vec::new();
            c.seal(m, &mut wire).unwrap();
            let mut plain = Vec::new();
            s.open(&body(&wire), &mut plain).unwrap();
            prop_assert_eq!(&plain, m);
            let mut wire = Vec::new();
            s.seal(m, &mut wire).unwrap();
            let mut plain = Vec::new();
            c.open(&body(&wire), &mut plain).unwrap();
            prop_assert_eq!(&plain, m);
        }
    }

    #[test]
    fn flipped_handshake_byte_fails_cleanly(index in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (client, server) = (keypair(1), keypair(2));
        let mut wire = Vec::new();
        Initiator::start(&client, &server.public(), Intent::Control, [3; 32], &mut wire).unwrap();
        let mut first = body(&wire);
        let i = index.index(first.len());
        first[i] ^= 1 << bit;
        let resp = Responder::new(&server, [4; 32]).unwrap();
        prop_assert!(resp.accept(&first, &mut Vec::new()).is_err());
    }

    #[test]
    fn flipped_reply_byte_fails_cleanly(index in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (client, server) = (keypair(1), keypair(2));
        let mut wire = Vec::new();
        let init = Initiator::start(&client, &server.public(), Intent::Control, [3; 32], &mut wire).unwrap();
        let mut reply = Vec::new();
        Responder::new(&server, [4; 32]).unwrap().accept(&body(&wire), &mut reply).unwrap();
        let mut reply = body(&reply);
        let i = index.index(reply.len());
        reply[i] ^= 1 << bit;
        prop_assert_eq!(init.finish(&reply).unwrap_err(), NoiseError::Decrypt);
    }

    #[test]
    fn flipped_transport_byte_fails_cleanly(msg in prop::collection::vec(any::<u8>(), 0..100),
                                            index in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (mut c, mut s, _) = handshake([5; 32], [6; 32]);
        let mut wire = Vec::new();
        c.seal(&msg, &mut wire).unwrap();
        let mut sealed = body(&wire);
        let i = index.index(sealed.len());
        sealed[i] ^= 1 << bit;
        let mut out = Vec::new();
        prop_assert_eq!(s.open(&sealed, &mut out).unwrap_err(), NoiseError::Decrypt);
        prop_assert!(out.is_empty());
    }

    #[test]
    fn arbitrary_first_message_is_refused(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let resp = Responder::new(&keypair(2), [4; 32]).unwrap();
        prop_assert!(resp.accept(&bytes, &mut Vec::new()).is_err());
    }
}

#[test]
fn both_ends_rekey_at_the_same_message_as_the_noise_spec_says() {
    let k = [9u8; 32];
    let (mut sealer, mut opener) = (Sealer::new(&k).unwrap(), Opener::new(&k).unwrap());
    sealer.counter = REKEY_EVERY - 2;
    opener.counter = REKEY_EVERY - 2;
    let mut old = Sealer::new(&k).unwrap();
    old.counter = REKEY_EVERY;
    for n in 0..4u8 {
        let mut wire = Vec::new();
        sealer.seal(&[n; 40], &mut wire).unwrap();
        let mut plain = Vec::new();
        opener.open(&wire[record::HEADER_LEN..], &mut plain).unwrap();
        assert_eq!(plain, vec![n; 40]);
        if n == 2 {
            // Message REKEY_EVERY went under the new key: the old one cannot have sealed it.
            let mut stale = Vec::new();
            old.seal(&[n; 40], &mut stale).unwrap();
            assert_ne!(stale, wire);
        }
    }
    // The new key is REKEY(k) = ENCRYPT(k, 2^64-1, "", zeros)[..32], computed here apart.
    let mut expected = [0u8; 32];
    let _tag = aead_key(&k)
        .unwrap()
        .seal_in_place_separate_tag(nonce(u64::MAX), ring::aead::Aad::empty(), &mut expected)
        .unwrap();
    let (mut a, mut b) = (Sealer::new(&expected).unwrap(), Sealer::new(&k).unwrap());
    a.counter = REKEY_EVERY + 5;
    b.counter = REKEY_EVERY - 1;
    let mut skip = Vec::new();
    b.seal(b"x", &mut skip).unwrap();
    b.counter = REKEY_EVERY + 5;
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    a.seal(b"same", &mut wa).unwrap();
    b.seal(b"same", &mut wb).unwrap();
    assert_eq!(wa, wb, "the rekeyed key is the spec's");
}

#[test]
fn transport_matches_snows_own() {
    // A handshake in plain snow; one side then uses snow's transport, the
    // other ours: each must read what the other sealed.
    let (client, server) = (keypair(1), keypair(2));
    let (cs, ss) = (client.x25519_secret(), server.x25519_secret());
    let server_x = server.public().to_x25519();
    let mut init = builder(&cs, client.x25519_public(), [1; 32])
        .unwrap()
        .remote_public_key(&server_x)
        .unwrap()
        .build_initiator()
        .unwrap();
    let mut resp = builder(&ss, server.x25519_public(), [2; 32]).unwrap().build_responder().unwrap();
    let (mut m1, mut m2, mut scratch) = ([0u8; 256], [0u8; 256], [0u8; 256]);
    let n = init.write_message(b"", &mut m1).unwrap();
    resp.read_message(&m1[..n], &mut scratch).unwrap();
    let n = resp.write_message(b"", &mut m2).unwrap();
    init.read_message(&m2[..n], &mut scratch).unwrap();
    let mut ours = Transport::from_handshake(init, server.public()).unwrap();
    let mut theirs = resp.into_transport_mode().unwrap();
    for round in 0..3u8 {
        let msg = vec![round; 100 + usize::from(round)];
        let mut wire = Vec::new();
        ours.seal(&msg, &mut wire).unwrap();
        let mut plain = [0u8; 512];
        let n = theirs.read_message(&wire[2..], &mut plain).unwrap();
        assert_eq!(&plain[..n], &msg[..]);
        let mut sealed = [0u8; 512];
        let n = theirs.write_message(&msg, &mut sealed).unwrap();
        let mut out = Vec::new();
        ours.open(&sealed[..n], &mut out).unwrap();
        assert_eq!(out, msg);
    }
}

#[test]
fn wrong_responder_key_is_refused() {
    let mut wire = Vec::new();
    Initiator::start(&keypair(1), &keypair(3).public(), Intent::Control, [3; 32], &mut wire).unwrap();
    let resp = Responder::new(&keypair(2), [4; 32]).unwrap();
    assert_eq!(resp.accept(&body(&wire), &mut Vec::new()).unwrap_err(), NoiseError::Decrypt);
}

#[test]
fn largest_plaintext_fills_a_frame() {
    let (mut c, mut s, _) = handshake([5; 32], [6; 32]);
    let mut wire = Vec::new();
    c.seal(&vec![9; MAX_PLAINTEXT], &mut wire).unwrap();
    assert_eq!(wire.len(), record::MAX_WIRE_RECORD);
    assert_eq!(c.seal(&vec![9; MAX_PLAINTEXT + 1], &mut wire), Err(NoiseError::TooLarge(MAX_PLAINTEXT + 1)));
    let mut out = Vec::new();
    s.open(&body(&wire), &mut out).unwrap();
    assert_eq!(out.len(), MAX_PLAINTEXT);
}

#[test]
fn authenticates_checks_the_next_record_without_opening_it() {
    let (mut client, server, _) = handshake([1; 32], [2; 32]);
    let mut wire = Vec::new();
    client.seal(b"first", &mut wire).unwrap();
    let (_, mut opener) = server.split();
    let body = wire[record::HEADER_LEN..].to_vec();
    assert!(opener.authenticates(&body));
    assert!(opener.authenticates(&body), "nothing moved");
    let mut flipped = body.clone();
    flipped[0] ^= 1;
    assert!(!opener.authenticates(&flipped));
    assert!(!opener.authenticates(&body[..3]), "shorter than a tag");
    let mut plain = Vec::new();
    opener.open(&body, &mut plain).unwrap();
    assert_eq!(plain, b"first");
    assert!(!opener.authenticates(&body), "once opened, the next record is another");
}
