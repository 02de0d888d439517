//! A responder (registry or service) fed arbitrary bytes in arbitrary
//! pieces: it must refuse cleanly or wait, never panic or establish.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use seaport_proto::keys::{Keypair, Seed};
use seaport_proto::hello::Intent;
use seaport_proto::session::Session;

fuzz_target!(|input: (bool, u8, Vec<u8>)| {
    let (link, cut, bytes) = input;
    let local = Keypair::from_seed(&Seed::from_bytes([7; 32]));
    let intent = if link { Intent::Link } else { Intent::Control };
    let now = Instant::now();
    let Ok(mut session) = Session::respond(now, &local, intent, [1; 32], Duration::from_secs(1)) else {
        return;
    };
    for piece in bytes.chunks(usize::from(cut).max(1)) {
        if session.handle_input(now, piece).is_err() {
            return;
        }
    }
    // Without the responder's key nobody can complete a handshake.
    assert!(!session.is_established());
    assert!(session.handle_timeout(now + Duration::from_secs(1)).is_err());
});
