//! The detector: Hyperscan prefilter plus per-rule confirmation.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use hyperscan::prelude::*;

use super::{
    confirm::{has_keyword, is_placeholder, shannon_entropy},
    rules::{self, Rule, RuleSpec, BUILTIN_SOURCE},
    DetectConfig, DetectError, Detection, Secret, StreamScanner,
};

/// Bytes before a match kept as context for keywords and word boundaries.
const KEYWORD_CONTEXT: usize = 64;
/// Scratch spaces kept for reuse; more concurrent scans allocate temporarily.
const SCRATCH_POOL_MAX: usize = 64;

/// The static-key detector. Build it once and share it (`Arc<Detector>`)
/// across threads: Hyperscan scratch space, which is per scan, comes from an
/// internal pool.
pub struct Detector {
    rules: Vec<Rule>,
    db: Option<BlockDatabase>,
    scratch: Mutex<Vec<Scratch>>,
    /// Bytes before a prefilter match end where a secret can start, over all
    /// rules: what a stream keeps from one chunk to the next.
    tail: usize,
    /// Lower bound on the bytes any detection's match spans (see
    /// [`Detector::min_match_len`]).
    min_match: usize,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector").field("rules", &self.rules.len()).finish()
    }
}

/// Result of scanning one buffer, with what streaming needs to know.
pub(crate) struct ScanOutcome {
    /// Confirmed detections, offsets relative to the buffer.
    pub detections: Vec<Detection>,
    /// Start of the earliest candidate window that the end of the buffer cut
    /// short: more data may still turn it into a detection.
    pub incomplete_from: Option<usize>,
}

impl Detector {
    /// Builds the detector from the configuration: built-in rules (unless
    /// disabled) plus the custom rule file, minus `disabled_rules`.
    pub fn new(config: &DetectConfig) -> Result<Detector, DetectError> {
        let mut specs: Vec<(String, RuleSpec)> = Vec::new();
        if config.builtin_rules {
            specs.extend(rules::builtin_specs()?.into_iter().map(|s| (BUILTIN_SOURCE.to_string(), s)));
        }
        if let Some(path) = &config.custom_rules {
            let source = path.display().to_string();
            specs.extend(rules::load_rule_file(path)?.into_iter().map(|s| (source.clone(), s)));
        }
        for id in &config.disabled_rules {
            if !specs.iter().any(|(_, s)| &s.id == id) {
                return Err(DetectError::UnknownDisabledRule(id.clone()));
            }
        }
        specs.retain(|(_, s)| !config.disabled_rules.contains(&s.id));
        Self::from_specs(&specs)
    }

    /// The built-in rule set alone.
    pub fn builtin() -> Result<Detector, DetectError> {
        Self::new(&DetectConfig::default())
    }

    /// Builds a detector from rule specs, each with the name of its source file.
    pub fn from_specs(specs: &[(String, RuleSpec)]) -> Result<Detector, DetectError> {
        let mut seen = HashSet::new();
        let mut compiled = Vec::with_capacity(specs.len());
        let mut patterns = Vec::with_capacity(specs.len());
        let mut min_match = usize::MAX;
        for (i, (source, spec)) in specs.iter().enumerate() {
            let rule_err =
                |reason: String| DetectError::Rule { source_name: source.clone(), rule: spec.id.clone(), reason };
            if !seen.insert(spec.id.as_str()) {
                return Err(rule_err("duplicate rule id".into()));
            }
            let mut pattern = Pattern::new(spec.pattern.as_str()).map_err(|e| rule_err(format!("pattern: {e}")))?;
            pattern.id = Some(i);
            // Validates the expression on its own so errors name the rule.
            let info =
                pattern.info().map_err(|e| rule_err(format!("pattern is not a valid Hyperscan expression: {e}")))?;
            if info.min_width() == 0 {
                return Err(rule_err("pattern can match the empty string".into()));
            }
            let rule = spec.compile(source, info.max_width())?;
            // The confirm match, not the prefilter's: Hyperscan's min_width
            // bounds only the prefilter match, which a scan without
            // Hyperscan (see `scan_buffer`) does not need.
            min_match = min_match.min(confirm_min_len(&rule));
            compiled.push(rule);
            patterns.push(pattern);
        }
        // No rules, no detections; 0 keeps callers from reasoning about it.
        let min_match = if compiled.is_empty() { 0 } else { min_match };
        let db = if patterns.is_empty() {
            None
        } else {
            let db: BlockDatabase = Patterns(patterns).build().map_err(|e| DetectError::Hyperscan(e.to_string()))?;
            Some(db)
        };
        let tail = compiled.iter().map(|r| r.lookback).max().unwrap_or(0) + KEYWORD_CONTEXT;
        let detector = Detector { rules: compiled, db, scratch: Mutex::new(Vec::new()), tail, min_match };
        // Fail at startup, not on the first request, if scratch cannot be had.
        let scratch = detector.take_scratch()?;
        detector.put_scratch(scratch);
        Ok(detector)
    }

    /// Number of active rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Ids of the active rules, in priority order.
    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| &*r.id)
    }

    /// Human-readable name of a rule.
    pub fn rule_name(&self, id: &str) -> Option<&str> {
        self.rules.iter().find(|r| &*r.id == id).map(|r| r.name.as_str())
    }

    /// The rules' prefilter patterns (e.g. to benchmark other engines on them).
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.pattern.as_str())
    }

    /// Bytes a stream keeps from earlier chunks so that a secret split across
    /// chunks is still seen whole (more while a candidate awaits its end).
    pub fn overlap(&self) -> usize {
        self.tail
    }

    /// No detection spans fewer bytes of the scanned buffer than this, so a
    /// buffer shorter than it holds none. Sound because a detection only
    /// ever comes from a match of its rule's confirm regex lying inside the
    /// buffer (after a prefilter hit, or without one when Hyperscan fails
    /// and every rule is confirmed on the whole buffer), the entropy,
    /// placeholder, keyword and check steps after it only reject, and this
    /// is the minimum over all rules of the confirm regex's shortest match
    /// (in bytes, as compiled: no Unicode). 0 (no bound) when a regex's
    /// minimum is unknown.
    pub fn min_match_len(&self) -> usize {
        self.min_match
    }

    /// Confirmed detections in `data`, ordered by offset.
    pub fn scan(&self, data: &[u8]) -> Vec<Detection> {
        self.scan_buffer(data).detections
    }

    /// A scanner for data arriving in chunks.
    pub fn stream(self: &Arc<Self>) -> StreamScanner {
        StreamScanner::new(Arc::clone(self))
    }

    fn take_scratch(&self) -> Result<Scratch, DetectError> {
        let pooled = self.scratch.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match (pooled, &self.db) {
            (Some(s), _) => Ok(s),
            (None, Some(db)) => db.alloc_scratch().map_err(|e| DetectError::Hyperscan(e.to_string())),
            (None, None) => Err(DetectError::Hyperscan("no database".into())),
        }
    }

    fn put_scratch(&self, scratch: Scratch) {
        let mut pool = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < SCRATCH_POOL_MAX {
            pool.push(scratch);
        }
    }

    /// Prefilter hits as `(rule index, match end)`, sorted and deduplicated.
    fn prefilter(&self, data: &[u8]) -> Option<Vec<(u32, usize)>> {
        let db = self.db.as_ref()?;
        let scratch = match self.take_scratch() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "detector: no Hyperscan scratch; confirming every rule on the whole buffer");
                return None;
            }
        };
        let mut hits: Vec<(u32, usize)> = Vec::new();
        let result = db.scan(data, &scratch, |id, _from, to, _flags| {
            hits.push((id, to as usize));
            Matching::Continue
        });
        self.put_scratch(scratch);
        if let Err(e) = result {
            tracing::error!(error = %e, "detector: Hyperscan scan failed; confirming every rule on the whole buffer");
            return None;
        }
        hits.sort_unstable();
        hits.dedup();
        Some(hits)
    }

    pub(crate) fn scan_buffer(&self, data: &[u8]) -> ScanOutcome {
        let mut found: Vec<(usize, Detection)> = Vec::new();
        let mut incomplete_from: Option<usize> = None;
        let windows = match self.prefilter(data) {
            Some(hits) => self.windows(data.len(), &hits),
            // Degraded but still correct: every rule over the whole buffer.
            None if self.db.is_some() => (0..self.rules.len()).map(|r| (r, 0, data.len(), false)).collect(),
            None => Vec::new(),
        };
        for (rule_idx, start, end, cut) in windows {
            if cut {
                incomplete_from = Some(incomplete_from.map_or(start, |s: usize| s.min(start)));
            }
            self.confirm(rule_idx, data, start, end, &mut found);
        }
        ScanOutcome { detections: resolve_overlaps(found), incomplete_from }
    }

    /// Merged confirm windows `(rule, start, end, cut_by_buffer_end)` per rule.
    fn windows(&self, len: usize, hits: &[(u32, usize)]) -> Vec<(usize, usize, usize, bool)> {
        let mut out: Vec<(usize, usize, usize, bool)> = Vec::new();
        for &(id, end) in hits {
            let rule_idx = id as usize;
            let Some(rule) = self.rules.get(rule_idx) else {
                continue;
            };
            let start = end.saturating_sub(rule.lookback + KEYWORD_CONTEXT);
            let wanted = end.saturating_add(rule.window);
            let (stop, cut) = if wanted >= len { (len, true) } else { (wanted, false) };
            match out.last_mut() {
                Some(last) if last.0 == rule_idx && start <= last.2 => {
                    last.2 = last.2.max(stop);
                    last.3 = cut;
                }
                _ => out.push((rule_idx, start, stop, cut)),
            }
        }
        out
    }

    fn confirm(&self, rule_idx: usize, data: &[u8], start: usize, stop: usize, found: &mut Vec<(usize, Detection)>) {
        let rule = &self.rules[rule_idx];
        let hay = &data[..stop];
        let mut pos = start;
        while pos < stop {
            let Some(caps) = rule.confirm.captures_at(hay, pos) else {
                break;
            };
            let Some(whole) = caps.get(0) else { break };
            pos = if whole.end() > whole.start() { whole.end() } else { whole.start() + 1 };
            // A match running into an artificial window edge may be truncated.
            if whole.end() == stop && stop < data.len() {
                continue;
            }
            let Some(m) = caps.get(rule.secret_group) else {
                continue;
            };
            let secret = m.as_bytes();
            if secret.is_empty() || is_placeholder(secret) {
                continue;
            }
            if let Some(min) = rule.entropy {
                if shannon_entropy(secret) < min {
                    continue;
                }
            }
            let context = &data[whole.start().saturating_sub(KEYWORD_CONTEXT)..m.end()];
            if !has_keyword(context, &rule.keywords) {
                continue;
            }
            if let Some(check) = rule.check {
                let user = rule.user_group.and_then(|g| caps.get(g)).map(|u| u.as_bytes());
                if !check.passes(secret, user) {
                    continue;
                }
            }
            found.push((
                rule_idx,
                Detection {
                    rule_id: Arc::clone(&rule.id),
                    confidence: rule.confidence,
                    start: m.start() as u64,
                    end: m.end() as u64,
                    secret: Secret::new(secret),
                },
            ));
        }
    }
}

/// The fewest bytes a match of `rule`'s confirm regex spans, as
/// `regex-syntax` computes it for the regex as compiled (bytes, no
/// Unicode); 0 when that is unknown (it never is for a regex that
/// compiled, but 0 only disables the views' skip).
fn confirm_min_len(rule: &Rule) -> usize {
    let hir = regex_syntax::ParserBuilder::new().unicode(false).utf8(false).build().parse(rule.confirm.as_str());
    match hir {
        Ok(hir) => hir.properties().minimum_len().unwrap_or(0),
        Err(e) => {
            tracing::warn!(rule = %rule.id, error = %e, "detector: confirm regex not re-parsed; no match-length bound");
            0
        }
    }
}

/// Drops duplicates and, where detections overlap, keeps the more confident
/// one (and among equals the earlier rule), so that `API_KEY=sk_live_…` is
/// reported once as a Stripe key rather than also as a generic assignment.
fn resolve_overlaps(mut found: Vec<(usize, Detection)>) -> Vec<Detection> {
    found.sort_by_key(|a| (a.1.start, a.1.end, a.0));
    found.dedup_by(|b, a| a.0 == b.0 && a.1.start == b.1.start && a.1.end == b.1.end);
    let rank = |f: &(usize, Detection)| (std::cmp::Reverse(f.1.confidence), f.0);
    let mut keep = vec![true; found.len()];
    for i in 0..found.len() {
        for j in i + 1..found.len() {
            if found[j].1.start >= found[i].1.end {
                break;
            }
            let (a, b) = (&found[i], &found[j]);
            let better = |x: &(usize, Detection), y: &(usize, Detection)| {
                let same_span = x.1.start == y.1.start && x.1.end == y.1.end;
                x.1.confidence > y.1.confidence || (same_span && rank(x) < rank(y))
            };
            if better(a, b) {
                keep[j] = false;
            } else if better(b, a) {
                keep[i] = false;
            }
        }
    }
    found.into_iter().zip(keep).filter_map(|(f, k)| k.then_some(f.1)).collect()
}
