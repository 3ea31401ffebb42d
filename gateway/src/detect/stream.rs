//! Scanning data that arrives in chunks, with bounded memory.

use std::{collections::HashSet, sync::Arc};

use super::{
    rules::{MAX_LOOKBACK, MAX_WINDOW},
    Detection, Detector,
};

/// A detection ending this close to the end of the data seen so far may still
/// grow (`dapi…` then `-2`), so it is reported only once more data or the end
/// of the stream arrives.
const GUARD: usize = 16;
/// Hard cap on what is kept between chunks, whatever candidates are pending.
const MAX_TAIL: usize = MAX_WINDOW + 2 * MAX_LOOKBACK;

/// Finds secrets in a byte stream fed in chunks, including secrets split
/// across chunk boundaries, reporting absolute offsets. Memory is bounded: it
/// keeps a tail of earlier data (the detector's [`overlap`](Detector::overlap),
/// longer while a candidate such as a PEM block awaits its end) and the
/// detections already reported inside that tail, so none is reported twice.
pub struct StreamScanner {
    detector: Arc<Detector>,
    buf: Vec<u8>,
    /// Absolute offset of `buf[0]`.
    base: u64,
    reported: HashSet<(Arc<str>, u64, u64)>,
}

impl std::fmt::Debug for StreamScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamScanner").field("offset", &self.offset()).field("tail", &self.buf.len()).finish()
    }
}

impl StreamScanner {
    /// A scanner at offset 0.
    pub fn new(detector: Arc<Detector>) -> Self {
        Self { detector, buf: Vec::new(), base: 0, reported: HashSet::new() }
    }

    /// Total bytes fed so far.
    pub fn offset(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Absolute offset of the oldest byte still kept: later detections never
    /// start before it.
    pub fn retained_from(&self) -> u64 {
        self.base
    }

    /// Scans the next chunk; returns detections that are now final.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Detection> {
        if chunk.is_empty() {
            return Vec::new();
        }
        self.buf.extend_from_slice(chunk);
        self.scan(false)
    }

    /// Ends the stream: reports what was held back and resets the scanner
    /// (offsets keep counting from where they were).
    pub fn finish(&mut self) -> Vec<Detection> {
        let out = self.scan(true);
        self.base += self.buf.len() as u64;
        self.buf.clear();
        self.reported.clear();
        out
    }

    fn scan(&mut self, at_end: bool) -> Vec<Detection> {
        let outcome = self.detector.scan_buffer(&self.buf);
        let len = self.buf.len();
        let mut keep_from = len.saturating_sub(self.detector.overlap() + GUARD);
        if !at_end {
            if let Some(start) = outcome.incomplete_from {
                keep_from = keep_from.min(start);
            }
        }
        let mut out = Vec::new();
        for mut d in outcome.detections {
            let (start, end) = (d.start as usize, d.end as usize);
            if !at_end && end + GUARD > len {
                keep_from = keep_from.min(start.saturating_sub(self.detector.overlap()));
                continue;
            }
            if end > keep_from {
                // Keep the whole secret so a suffix of it is never re-matched alone.
                keep_from = keep_from.min(start);
            }
            d.start += self.base;
            d.end += self.base;
            if self.reported.insert((Arc::clone(&d.rule_id), d.start, d.end)) {
                out.push(d);
            }
        }
        keep_from = keep_from.max(len.saturating_sub(MAX_TAIL));
        if !at_end && keep_from > 0 {
            self.buf.drain(..keep_from);
            self.base += keep_from as u64;
            let base = self.base;
            self.reported.retain(|(_, _, end)| *end > base);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ghp() -> Vec<u8> {
        let random = b"Q2w3E4r5T6y7U8i9O0pAsDfGhJkLzX";
        let mut t = b"ghp_".to_vec();
        t.extend_from_slice(random);
        t.extend_from_slice(&crate::detect::confirm::base62_crc32(random));
        t
    }

    #[test]
    fn finds_keys_split_at_every_boundary() {
        let det = Arc::new(Detector::builtin().unwrap());
        let token = ghp();
        let mut data = b"lorem ipsum\nGITHUB_TOKEN=".to_vec();
        let start = data.len() as u64;
        data.extend_from_slice(&token);
        data.extend_from_slice(b"\nmore text follows here\n");
        for split in 1..data.len() {
            for chunk_size in [1usize, 3, 7, 64] {
                let mut s = det.stream();
                let mut found = Vec::new();
                found.extend(s.feed(&data[..split]));
                for c in data[split..].chunks(chunk_size) {
                    found.extend(s.feed(c));
                }
                found.extend(s.finish());
                let ghs: Vec<_> = found.iter().filter(|d| &*d.rule_id == "github-pat").collect();
                assert_eq!(ghs.len(), 1, "split {split} chunk {chunk_size}: {found:?}");
                assert_eq!(ghs[0].start, start);
                assert_eq!(ghs[0].end, start + token.len() as u64);
            }
        }
    }

    #[test]
    fn memory_stays_bounded() {
        let det = Arc::new(Detector::builtin().unwrap());
        let mut s = det.stream();
        let chunk = vec![b'a'; 100_000];
        for _ in 0..20 {
            assert!(s.feed(&chunk).is_empty());
            assert!(s.buf.len() <= MAX_TAIL + chunk.len());
        }
        assert_eq!(s.offset(), 2_000_000);
    }

    #[test]
    fn pem_split_over_many_chunks() {
        let det = Arc::new(Detector::builtin().unwrap());
        let mut pem = b"prefix\n-----BEGIN RSA PRIVATE KEY-----\n".to_vec();
        let mut x: u32 = 12345;
        for _ in 0..40 {
            for _ in 0..64 {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
                pem.push(alphabet[(x >> 16) as usize % 64]);
            }
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END RSA PRIVATE KEY-----\n");
        let mut s = det.stream();
        let mut found = Vec::new();
        for c in pem.chunks(100) {
            found.extend(s.feed(c));
        }
        found.extend(s.finish());
        assert_eq!(found.iter().filter(|d| &*d.rule_id == "private-key").count(), 1, "{found:?}");
    }
}
