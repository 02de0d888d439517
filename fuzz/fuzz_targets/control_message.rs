//! Control-message decoding: arbitrary bytes never panic, and whatever
//! decodes re-encodes to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seaport_proto::message::Message;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(msg) = Message::decode(bytes) {
        let mut out = Vec::new();
        msg.encode(&mut out).expect("a decoded message re-encodes");
        assert_eq!(Message::decode(&out).as_ref(), Ok(&msg));
    }
});
