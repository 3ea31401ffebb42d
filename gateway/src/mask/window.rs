//! The hold-back window: plaintext waits here until every matcher has
//! decided about it, then leaves with its matches replaced.
//!
//! Matchers report ranges (absolute stream offsets) and a *safe point*: no
//! range they report later starts before it. [`Window::emit`] releases bytes
//! up to the lowest safe point, so every range that touches released bytes
//! is already known and a secret's prefix is never released. Overlapping
//! ranges merge into one replacement, named after the range that starts first
//! (ties: lower label id). Because ranges are merged in (start, label) order
//! whatever the chunking, the output equals that of masking the whole stream
//! at once.

use bytes::BytesMut;

use super::{Label, MaskLocation, Masked, MaskedLog};

/// Index into the masker's label table.
pub(crate) type LabelId = u32;

/// A stretch of plaintext to replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    /// Absolute offset of the first byte.
    pub start: u64,
    /// Absolute offset just past the last byte.
    pub end: u64,
    /// What replaces it.
    pub label: LabelId,
}

/// Plaintext not yet released, plus a little context before it that
/// matchers may still look at.
#[derive(Debug, Default)]
pub(crate) struct Window {
    /// Bytes from `base` to the end of the data seen.
    buf: Vec<u8>,
    /// Absolute offset of `buf[0]`.
    base: u64,
    /// Bytes before this offset have been released (or dropped as masked).
    emitted: u64,
    /// End of the latest replacement: bytes before it are dropped, and a range
    /// starting before it merges into that replacement.
    suppress_until: u64,
    /// Known ranges that start at or after `emitted`, not yet processed.
    pending: Vec<Range>,
    sorted: bool,
}

impl Window {
    /// Absolute offset just past the data seen.
    pub fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Absolute offset of the oldest byte kept.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes kept.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// Appends plaintext.
    pub fn append(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The kept bytes from `from` (clamped to what is kept) to the end.
    pub fn slice_from(&self, from: u64) -> &[u8] {
        let at = from.saturating_sub(self.base).min(self.buf.len() as u64) as usize;
        &self.buf[at..]
    }

    /// Adds a range found by a matcher. Matchers uphold the safe-point
    /// contract, so `start` is never before the bytes already released.
    pub fn add(&mut self, range: Range) {
        debug_assert!(range.start >= self.emitted, "range before released bytes");
        debug_assert!(range.end > range.start, "empty range");
        if range.end <= range.start {
            return;
        }
        self.pending.push(range);
        self.sorted = false;
    }

    /// Releases the bytes up to `upto` (at most the end of the data) into
    /// `out`, replacing ranges with their labels and recording each
    /// replacement in `log`.
    pub fn emit(&mut self, upto: u64, labels: &[Label], out: &mut BytesMut, log: &mut MaskedLog) {
        let upto = upto.min(self.end());
        if upto <= self.emitted {
            return;
        }
        if !self.sorted {
            self.pending.sort_unstable_by_key(|r| (r.start, r.label, r.end));
            self.sorted = true;
        }
        let mut cursor = self.emitted;
        let mut done = 0;
        for r in self.pending.iter().take_while(|r| r.start < upto) {
            done += 1;
            if r.start < self.suppress_until {
                self.suppress_until = self.suppress_until.max(r.end);
                continue;
            }
            let from = cursor.max(self.suppress_until);
            out.extend_from_slice(self.bytes(from, r.start));
            let label = labels.get(r.label as usize);
            if let Some(label) = label {
                out.extend_from_slice(&label.text);
                log.push(Masked { rule: label.rule.clone(), location: MaskLocation::Body { offset: r.start } });
            } else {
                // Labels come from the same masker as the ranges; never leak
                // even if that ever breaks.
                out.extend_from_slice(b"[MASKED]");
            }
            self.suppress_until = r.end;
            cursor = r.start;
        }
        self.pending.drain(..done);
        let from = cursor.max(self.suppress_until);
        if from < upto {
            out.extend_from_slice(self.bytes(from, upto));
        }
        self.emitted = upto;
    }

    /// Drops kept bytes before `keep_from`, but never unreleased ones.
    pub fn discard_before(&mut self, keep_from: u64) {
        let keep_from = keep_from.min(self.emitted);
        if keep_from > self.base {
            let n = ((keep_from - self.base) as usize).min(self.buf.len());
            self.buf.drain(..n);
            self.base += n as u64;
        }
    }

    fn bytes(&self, from: u64, to: u64) -> &[u8] {
        let len = self.buf.len() as u64;
        let a = from.saturating_sub(self.base).min(len) as usize;
        let b = to.saturating_sub(self.base).min(len) as usize;
        &self.buf[a..b.max(a)]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn labels() -> Vec<Label> {
        ["a", "b", "c"]
            .iter()
            .map(|n| Label { rule: Arc::from(*n), text: format!("[{n}]").into_bytes().into_boxed_slice() })
            .collect()
    }

    fn run(data: &[u8], ranges: &[(u64, u64, LabelId)], cuts: &[u64]) -> String {
        let labels = labels();
        let mut w = Window::default();
        w.append(data);
        for &(start, end, label) in ranges {
            w.add(Range { start, end, label });
        }
        let mut out = BytesMut::new();
        let mut log = MaskedLog::default();
        for &c in cuts {
            w.emit(c, &labels, &mut out, &mut log);
        }
        w.emit(u64::MAX, &labels, &mut out, &mut log);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn replaces_and_merges_overlaps_but_not_neighbours() {
        let data = b"0123456789";
        assert_eq!(run(data, &[(2, 4, 0)], &[]), "01[a]456789");
        assert_eq!(run(data, &[(2, 5, 1), (4, 7, 0)], &[]), "01[b]789");
        assert_eq!(run(data, &[(2, 4, 1), (4, 6, 0)], &[]), "01[b][a]6789");
        assert_eq!(run(data, &[(2, 4, 1), (2, 6, 0)], &[]), "01[a]6789");
    }

    #[test]
    fn release_points_inside_a_range_change_nothing() {
        let data = b"0123456789";
        let ranges = [(2, 5, 1), (4, 7, 0), (8, 9, 2)];
        let whole = run(data, &ranges, &[]);
        for cut in 0..=10 {
            assert_eq!(run(data, &ranges, &[cut]), whole, "cut {cut}");
        }
    }
}
