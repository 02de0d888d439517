//! Record decoding: any bytes, cut at any points, never panic, never buffer
//! more than one record, and account for every byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seaport_proto::record::{RecordDecoder, HEADER_LEN, MAX_WIRE_RECORD};

fuzz_target!(|input: (Vec<u16>, Vec<u8>)| {
    let (cuts, stream) = input;
    let mut decoder = RecordDecoder::new();
    let mut used = 0;
    let mut rest = stream.as_slice();
    let mut cuts = cuts.into_iter();
    while !rest.is_empty() {
        let n = cuts.next().map_or(rest.len(), |c| usize::from(c).clamp(1, rest.len()));
        let (mut piece, after) = rest.split_at(n);
        rest = after;
        while !piece.is_empty() {
            let taken = decoder.push(piece);
            piece = &piece[taken..];
            while let Some(frame) = decoder.next_record() {
                used += frame.len() + HEADER_LEN;
            }
            assert!(decoder.buffered() <= MAX_WIRE_RECORD);
        }
    }
    assert_eq!(used + decoder.buffered(), stream.len());
});
