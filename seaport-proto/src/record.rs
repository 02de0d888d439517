//! Records: the length-prefixed framing of the byte stream, the outermost
//! of the wire's three layers (a record carries one Noise message, whose
//! plaintext is a control message or one link frame, [`crate::link::wire`]).
//!
//! Every Noise message travels as a 2-byte big-endian length followed by that
//! many bytes. [`RecordDecoder`] accepts the stream cut at any points and yields
//! whole records. Invariant: it never holds more than one record
//! ([`MAX_WIRE_RECORD`] bytes), and it grows its buffer only as far as the
//! records it is given need.

/// Largest Noise message, hence largest record body.
pub const MAX_RECORD: usize = u16::MAX as usize;
/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 2;
/// Largest record on the wire, prefix included.
pub const MAX_WIRE_RECORD: usize = HEADER_LEN + MAX_RECORD;

/// Smallest receive buffer the decoder allocates.
const MIN_CHUNK: usize = 1024;

/// A message longer than a record can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("record of {0} bytes exceeds the {MAX_RECORD}-byte limit")]
pub struct RecordTooLarge(pub usize);

/// Appends `body` to `out` as one record.
pub fn encode(body: &[u8], out: &mut Vec<u8>) -> Result<(), RecordTooLarge> {
    let len = u16::try_from(body.len()).map_err(|_| RecordTooLarge(body.len()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// Incremental decoder of records from a byte stream.
///
/// Feed bytes with [`push`](Self::push) (or read straight into
/// [`spare_mut`](Self::spare_mut) and [`commit`](Self::commit)), then take
/// complete records with [`next_record`](Self::next_record) until it returns
/// `None`; repeat while input remains. The buffer never exceeds
/// [`MAX_WIRE_RECORD`] bytes, and when full it always holds a complete record, so
/// the loop always makes progress. Frames are handed out mutable so a
/// transport can decrypt them in place. The buffer is allocated on first use
/// and can be given back while idle with [`release`](Self::release).
#[derive(Debug, Default)]
pub struct RecordDecoder {
    /// Receive buffer, at most `MAX_WIRE_RECORD` bytes; grown on demand.
    buf: Vec<u8>,
    /// Start of the bytes not yet handed out.
    start: usize,
    /// End of the bytes received.
    end: usize,
}

impl RecordDecoder {
    /// A decoder with nothing buffered (and nothing allocated).
    pub fn new() -> Self {
        Self::default()
    }

    /// Room to receive into, after moving any partial record to the front.
    /// Never empty when the buffered bytes hold no complete record (take those
    /// with [`next_record`](Self::next_record) first). The buffer grows towards
    /// what the current record needs, but never to more than twice what has
    /// arrived, so a peer that only announces a large record costs little.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let pending = self.buf.get(..self.end).unwrap_or_default();
        let frame_need = split_len(pending).map_or(HEADER_LEN, |(len, _)| HEADER_LEN + len);
        let want = frame_need.min(MIN_CHUNK.max(2 * self.end)).clamp(MIN_CHUNK, MAX_WIRE_RECORD);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        self.buf.get_mut(self.end..).unwrap_or_default()
    }

    /// Records that `n` bytes were written into [`spare_mut`](Self::spare_mut).
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Buffers as much of `input` as fits and returns how many bytes it took;
    /// it stops short only when a complete record is waiting to be taken.
    pub fn push(&mut self, input: &[u8]) -> usize {
        let mut taken = 0;
        while let Some(rest) = input.get(taken..).filter(|r| !r.is_empty()) {
            let spare = self.spare_mut();
            let n = rest.len().min(spare.len());
            if n == 0 {
                break;
            }
            spare.get_mut(..n).unwrap_or_default().copy_from_slice(rest.get(..n).unwrap_or_default());
            self.commit(n);
            taken += n;
        }
        taken
    }

    /// The next complete record's body, if one is buffered.
    pub fn next_record(&mut self) -> Option<&mut [u8]> {
        let pending = self.buf.get(self.start..self.end)?;
        let (len, _) = split_len(pending)?;
        let begin = self.start + HEADER_LEN;
        let end = begin + len;
        if end > self.end {
            return None;
        }
        self.start = end;
        self.buf.get_mut(begin..end)
    }

    /// Bytes buffered and not yet handed out as a record.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Whether a receive buffer is allocated.
    pub fn holds_buffer(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Frees the buffer if nothing is pending (an idle stream holds no memory).
    pub fn release(&mut self) {
        if self.start == self.end {
            *self = RecordDecoder::default();
        }
    }

    /// Hands back the buffered bytes (those after the last record handed out),
    /// for a new owner of the stream.
    pub fn into_buffered(self) -> Vec<u8> {
        self.buf.get(self.start..self.end).unwrap_or_default().to_vec()
    }
}

fn split_len(input: &[u8]) -> Option<(usize, &[u8])> {
    let (head, rest) = input.split_first_chunk::<HEADER_LEN>()?;
    Some((usize::from(u16::from_be_bytes(*head)), rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_chunked(stream: &[u8], cuts: &[usize]) -> (Vec<Vec<u8>>, usize) {
        let mut decoder = RecordDecoder::new();
        let mut frames = Vec::new();
        let mut start = 0;
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        points.push(stream.len());
        points.sort_unstable();
        for end in points {
            let mut input = &stream[start..end];
            while !input.is_empty() {
                let taken = decoder.push(input);
                input = &input[taken..];
                while let Some(frame) = decoder.next_record() {
                    frames.push(frame.to_vec());
                }
            }
            assert!(decoder.buffered() <= MAX_WIRE_RECORD);
            start = end;
        }
        (frames, decoder.buffered())
    }

    proptest! {
        #[test]
        fn round_trip_under_any_chunking(
            bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20),
            cuts in prop::collection::vec(any::<usize>(), 0..40),
        ) {
            let mut stream = Vec::new();
            for body in &bodies {
                encode(body, &mut stream).unwrap();
            }
            let (frames, left) = decode_chunked(&stream, &cuts);
            prop_assert_eq!(frames, bodies);
            prop_assert_eq!(left, 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(stream in prop::collection::vec(any::<u8>(), 0..2000),
                                       cuts in prop::collection::vec(any::<usize>(), 0..10)) {
            let (frames, left) = decode_chunked(&stream, &cuts);
            let used: usize = frames.iter().map(|f| f.len() + HEADER_LEN).sum();
            prop_assert_eq!(used + left, stream.len());
        }
    }

    #[test]
    fn largest_frame_fits_and_larger_is_refused() {
        let mut out = Vec::new();
        encode(&vec![1; MAX_RECORD], &mut out).unwrap();
        assert_eq!(out.len(), MAX_WIRE_RECORD);
        assert_eq!(encode(&vec![1; MAX_RECORD + 1], &mut out), Err(RecordTooLarge(MAX_RECORD + 1)));
        let (frames, _) = decode_chunked(&out, &[1, 2, 3, 40_000]);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].len(), MAX_RECORD);
    }
}
