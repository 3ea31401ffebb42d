//! Masking of a plaintext stream: every matcher (detector rules, policy
//! patterns, JSON fields) reads the window, and the window releases what
//! none of them can still claim.

use bytes::BytesMut;

use super::{
    json::JsonStream,
    pattern::RegexStream,
    window::{Range, Window},
    MaskedLog, Masker,
};
use crate::detect::StreamScanner;

/// Streaming masker for one plaintext stream of one [`Masker`].
#[derive(Debug)]
pub(crate) struct PlainMasker {
    window: Window,
    detector: Option<StreamScanner>,
    patterns: Vec<RegexStream>,
    json: Option<JsonStream>,
    pub log: MaskedLog,
}

impl PlainMasker {
    /// A masker at offset 0; without `use_detector`, detector ranges must be
    /// supplied through [`add_range`](Self::add_range) before any data.
    pub fn new(masker: &Masker, use_detector: bool) -> Self {
        Self {
            window: Window::default(),
            detector: masker.detector.as_ref().filter(|_| use_detector).map(|d| d.stream()),
            patterns: vec![RegexStream::default(); masker.patterns.len()],
            json: masker.json.as_ref().map(|_| JsonStream::default()),
            log: MaskedLog::default(),
        }
    }

    /// Plaintext bytes held.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.window.held()
    }

    /// Adds a range found outside the stream (e.g. by a one-shot scan).
    pub fn add_range(&mut self, range: Range) {
        self.window.add(range);
    }

    /// Masks the next chunk, appending what can be released to `out`.
    pub fn push(&mut self, masker: &Masker, data: &[u8], out: &mut BytesMut) {
        if data.is_empty() {
            return;
        }
        self.window.append(data);
        let mut safe = self.window.end();
        if let Some(scanner) = &mut self.detector {
            for d in scanner.feed(data) {
                if let Some(&label) = masker.rule_labels.get(&*d.rule_id) {
                    self.window.add(Range { start: d.start, end: d.end, label });
                }
            }
            safe = safe.min(scanner.retained_from());
        }
        safe = safe.min(self.run_patterns(masker, false));
        self.release(masker, safe, out);
    }

    /// Ends the stream, appending everything still held.
    pub fn finish(&mut self, masker: &Masker, out: &mut BytesMut) {
        if let Some(scanner) = &mut self.detector {
            for d in scanner.finish() {
                if let Some(&label) = masker.rule_labels.get(&*d.rule_id) {
                    self.window.add(Range { start: d.start, end: d.end, label });
                }
            }
        }
        self.run_patterns(masker, true);
        self.release(masker, u64::MAX, out);
    }

    /// Runs the regex and JSON matchers; returns their lowest safe point.
    fn run_patterns(&mut self, masker: &Masker, at_end: bool) -> u64 {
        let mut safe = u64::MAX;
        for (stream, pattern) in self.patterns.iter_mut().zip(&masker.patterns) {
            while let Some((start, end)) = stream.next_match(&pattern.regex, &self.window, at_end) {
                self.window.add(Range { start, end, label: pattern.label });
            }
            safe = safe.min(stream.safe());
        }
        if let (Some(stream), Some(spec)) = (&mut self.json, &masker.json) {
            safe = safe.min(stream.run(spec, &mut self.window, at_end));
        }
        safe
    }

    fn release(&mut self, masker: &Masker, upto: u64, out: &mut BytesMut) {
        self.window.emit(upto, &masker.labels, out, &mut self.log);
        let mut keep = u64::MAX;
        for stream in &self.patterns {
            keep = keep.min(stream.needed_from());
        }
        if let Some(json) = &self.json {
            keep = keep.min(json.needed_from());
        }
        self.window.discard_before(keep);
    }
}
