//! Where decoded content of one message ends up: a stream of text fields,
//! each named by its location path, scanned by one [`StreamScanner`] (so a
//! key split across chunks is still found), plus whole decoded payloads
//! (protobuf messages, base64 runs) scanned by [`payload`](super::payload).
//!
//! The collector also keeps what the message as a whole needs: the budget
//! of decoded bytes, the [`ScanStatus`], and the hits, every distinct
//! `(rule, secret, location)` up to [`MAX_HITS_PER_MESSAGE`] with a count of
//! those dropped beyond it.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
};

use super::{
    b64::{self, Quads},
    http_scan::{Hit, Location},
    payload,
    status::{ScanStatus, Uninspectable},
    Detection, Detector, Secret, StreamScanner,
};

/// Longest field name kept for locations.
pub(crate) const MAX_NAME: usize = 256;

/// Most hits reported per message (an HTTP body, a WebSocket message);
/// further distinct hits are counted as dropped.
pub const MAX_HITS_PER_MESSAGE: usize = 1000;

/// Decoded bytes of a base64 run kept whole for structured scanning; longer
/// runs are scanned as a stream of plain bytes.
const RUN_BUFFER: usize = 1 << 20;

/// Receives decoded text from a content parser: `begin` starts a field named
/// by its location path, `data` continues it.
pub(crate) trait Emit {
    fn begin(&mut self, path: &str);
    fn data(&mut self, bytes: &[u8]);
}

/// Decoded bytes allowed per message, shared by every decoder in it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub used: usize,
    pub limit: usize,
}

impl Budget {
    /// Takes up to `n` bytes; returns how many may be used.
    pub(crate) fn take(&mut self, n: usize) -> usize {
        let take = n.min(self.limit.saturating_sub(self.used));
        self.used += take;
        take
    }
}

/// Joins location path components with `/`, skipping empty ones.
pub(crate) fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}/{b}"),
    }
}

/// A base64 run being decoded in the current text field.
#[derive(Default)]
struct Run {
    chars: usize,
    quads: Quads,
    decoded: Vec<u8>,
    padding: u8,
    /// Set once the run outgrew [`RUN_BUFFER`].
    stream: Option<StreamScanner>,
}

/// See the module documentation.
pub(crate) struct Collector {
    detector: Arc<Detector>,
    scanner: StreamScanner,
    /// `(absolute start, location path)` of recent fields.
    marks: VecDeque<(u64, Arc<str>)>,
    prefixes: Vec<String>,
    path: Arc<str>,
    run: Run,
    hits: Vec<Hit>,
    seen: HashSet<(Arc<str>, Secret, Location)>,
    reported: usize,
    dropped: u64,
    pub(crate) budget: Budget,
    status: ScanStatus,
}

impl Collector {
    pub(crate) fn new(detector: Arc<Detector>, limit: usize) -> Self {
        Self {
            scanner: detector.stream(),
            detector,
            marks: VecDeque::new(),
            prefixes: Vec::new(),
            path: Arc::from(""),
            run: Run::default(),
            hits: Vec::new(),
            seen: HashSet::new(),
            reported: 0,
            dropped: 0,
            budget: Budget { used: 0, limit },
            status: ScanStatus::Complete,
        }
    }

    /// Marks the message uninspectable (the first reason wins).
    pub(crate) fn fail(&mut self, why: Uninspectable) {
        if self.status.is_complete() {
            tracing::debug!(reason = %why, "detect: content not understood");
            self.status = ScanStatus::Uninspectable(why);
        }
    }

    pub(crate) fn status(&self) -> &ScanStatus {
        &self.status
    }

    /// Bytes of `n` that fit the budget (counted), failing when cut short.
    pub(crate) fn charge_partial(&mut self, n: usize) -> usize {
        let take = self.budget.take(n);
        if take < n {
            self.fail(Uninspectable::TooLarge { limit: self.budget.limit });
        }
        take
    }

    /// Nests the paths of later fields under `prefix` until [`pop_prefix`](Self::pop_prefix).
    pub(crate) fn push_prefix(&mut self, prefix: &str) {
        let full = join(self.prefixes.last().map_or("", String::as_str), prefix);
        self.prefixes.push(full);
    }

    pub(crate) fn pop_prefix(&mut self) {
        self.prefixes.pop();
    }

    fn full_path(&self, path: &str) -> String {
        join(self.prefixes.last().map_or("", String::as_str), path)
    }

    /// Scans a whole decoded payload (its structure sniffed) at `path`.
    pub(crate) fn payload(&mut self, bytes: &[u8], path: &str) {
        let full = self.full_path(path);
        let mut status = std::mem::replace(&mut self.status, ScanStatus::Complete);
        let found = payload::scan(&self.detector, &mut self.budget, &mut status, bytes, &full);
        self.status = status;
        for (detection, path) in found {
            self.push(detection, Location::Body(path));
        }
    }

    /// Records a hit unless the same `(rule, secret, location)` was seen.
    pub(crate) fn push(&mut self, detection: Detection, location: Location) {
        if self.reported >= MAX_HITS_PER_MESSAGE {
            self.dropped += 1;
            return;
        }
        if self.seen.insert((Arc::clone(&detection.rule_id), detection.secret.clone(), location.clone())) {
            self.reported += 1;
            self.hits.push(Hit { detection, location });
        }
    }

    pub(crate) fn take_hits(&mut self) -> Vec<Hit> {
        std::mem::take(&mut self.hits)
    }

    /// Distinct hits beyond [`MAX_HITS_PER_MESSAGE`] that were not reported.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Ends the message: the stream's held-back detections, the last run.
    pub(crate) fn finish(&mut self) {
        self.end_run();
        let d = self.scanner.finish();
        self.collect(d);
    }

    /// Ends a message but keeps the counters (WebSocket messages share them
    /// per message, not per connection, so they are reset).
    pub(crate) fn reset_message(&mut self) {
        self.finish();
        self.seen.clear();
        self.reported = 0;
        self.marks.clear();
        self.budget.used = 0;
    }

    fn location(&self, offset: u64) -> Location {
        let idx = self.marks.partition_point(|(start, _)| *start <= offset);
        let path = idx.checked_sub(1).and_then(|i| self.marks.get(i)).map_or("", |(_, p)| &**p);
        Location::Body(path.to_string())
    }

    fn collect(&mut self, detections: Vec<Detection>) {
        for detection in detections {
            let location = self.location(detection.start);
            self.push(detection, location);
        }
        // Marks before the scanner's retained tail can no longer be needed, but
        // the one covering its first byte still is.
        let keep = self.scanner.retained_from();
        while self.marks.len() > 1 && self.marks[1].0 <= keep {
            self.marks.pop_front();
        }
    }

    fn run_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(v) = b64::sextet(b) {
                if self.run.padding > 0 {
                    self.end_run();
                }
                self.run.chars += 1;
                self.run.quads.push(v, &mut self.run.decoded);
                if self.run.decoded.len() >= RUN_BUFFER {
                    self.spill_run();
                }
            } else if b == b'=' && self.run.chars > 0 && self.run.padding < 2 {
                self.run.padding += 1;
            } else if (b == b'\r' || b == b'\n') && self.run.chars > 0 && self.run.padding == 0 {
                // Wrapped base64 continues on the next line.
            } else if self.run.chars > 0 {
                self.end_run();
            }
        }
    }

    /// A long run goes on as a plain stream: its bytes so far are scanned.
    fn spill_run(&mut self) {
        let decoded = std::mem::take(&mut self.run.decoded);
        let stream = self.run.stream.get_or_insert_with(|| self.detector.stream());
        let found = stream.feed(&decoded);
        let location = Location::Body(join(&self.path, "base64"));
        for d in found {
            self.push(d, location.clone());
        }
    }

    fn end_run(&mut self) {
        let mut run = std::mem::take(&mut self.run);
        if run.chars < b64::MIN_RUN {
            return;
        }
        run.quads.flush(&mut run.decoded);
        let path = join(&self.path, "base64");
        match run.stream.take() {
            Some(mut stream) => {
                let mut found = stream.feed(&run.decoded);
                found.extend(stream.finish());
                for d in found {
                    self.push(d, Location::Body(path.clone()));
                }
            }
            None => {
                let mut status = std::mem::replace(&mut self.status, ScanStatus::Complete);
                let found = payload::scan(&self.detector, &mut self.budget, &mut status, &run.decoded, &path);
                self.status = status;
                for (detection, p) in found {
                    self.push(detection, Location::Body(p));
                }
            }
        }
    }
}

impl Emit for Collector {
    fn begin(&mut self, path: &str) {
        self.end_run();
        // A separator keeps fields from running into each other.
        if self.scanner.offset() > 0 {
            let d = self.scanner.feed(b"\n");
            self.collect(d);
        }
        let full: Arc<str> = Arc::from(self.full_path(path));
        self.path = Arc::clone(&full);
        self.marks.push_back((self.scanner.offset(), full));
    }

    fn data(&mut self, bytes: &[u8]) {
        let d = self.scanner.feed(bytes);
        self.collect(d);
        self.run_bytes(bytes);
    }
}
