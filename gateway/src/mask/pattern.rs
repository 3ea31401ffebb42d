//! Regexes with a bounded match length, run over a stream.
//!
//! A match of at most `max_len` bytes starting at `p` depends only on the
//! bytes up to `p + max_len` plus a few bytes of look-around (`\b`, `$`), so
//! once the stream is [`LOOK`] bytes past that, the leftmost-first match at
//! `p` is the same as in the whole text, and so is the decision that no
//! match starts at `p`. Matches are taken in the order and with the
//! non-overlapping semantics of `Regex::find_iter` over the whole text.

use regex::bytes::{Regex, RegexBuilder};

use super::window::Window;

/// Bytes of look-around a regex assertion may inspect on either side of a
/// position (a Unicode `\b` looks at one UTF-8 character).
pub(crate) const LOOK: usize = 4;
/// Longest match a policy pattern may have, which bounds the hold-back.
pub const MAX_PATTERN_LEN: usize = 4096;
const REGEX_SIZE_LIMIT: usize = 16 << 20;

/// A compiled regex and the longest match it can produce.
#[derive(Debug, Clone)]
pub(crate) struct BoundedRegex {
    pub regex: Regex,
    pub max_len: usize,
}

impl BoundedRegex {
    /// Compiles `source`; the error says why it is unusable for masking.
    pub fn new(source: &str) -> Result<Self, String> {
        let hir = regex_syntax::ParserBuilder::new()
            .utf8(false)
            .build()
            .parse(source)
            .map_err(|e| format!("does not parse: {e}"))?;
        let props = hir.properties();
        if props.minimum_len().is_none_or(|n| n == 0) {
            return Err("can match the empty string".into());
        }
        let max_len = match props.maximum_len() {
            Some(n) if n <= MAX_PATTERN_LEN => n,
            Some(n) => return Err(format!("can match {n} bytes, more than the maximum {MAX_PATTERN_LEN}")),
            None => {
                return Err("has no maximum match length: bound repetitions \
                     (e.g. `{1,64}` instead of `+` or `*`)"
                    .into())
            }
        };
        let regex = RegexBuilder::new(source)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|e| format!("does not compile: {e}"))?;
        Ok(Self { regex, max_len })
    }
}

/// Where a [`BoundedRegex`] stands in a stream.
#[derive(Debug, Default, Clone)]
pub(crate) struct RegexStream {
    /// Absolute offset where the next match may start; every earlier start
    /// has been decided.
    next: u64,
}

impl RegexStream {
    /// The next match that is final given the data in `win` (all of it when
    /// `at_end`), as absolute `(start, end)`.
    pub fn next_match(&mut self, re: &BoundedRegex, win: &Window, at_end: bool) -> Option<(u64, u64)> {
        let end = win.end();
        let limit = if at_end { end } else { end.saturating_sub((re.max_len + LOOK) as u64) };
        if self.next >= limit {
            return None;
        }
        // Bytes before `base` are gone only if they are no longer needed;
        // should that ever break, skip ahead rather than misplace offsets.
        let hay_start = self.next.saturating_sub(LOOK as u64).max(win.base());
        self.next = self.next.max(hay_start);
        let hay = win.slice_from(hay_start);
        let pos = (self.next - hay_start) as usize;
        match re.regex.find_at(hay, pos) {
            Some(m) if hay_start + (m.start() as u64) < limit && m.end() > m.start() => {
                let found = (hay_start + m.start() as u64, hay_start + m.end() as u64);
                self.next = found.1;
                Some(found)
            }
            _ => {
                self.next = limit;
                None
            }
        }
    }

    /// No match reported later starts before this offset.
    pub fn safe(&self) -> u64 {
        self.next
    }

    /// Oldest byte the stream still needs (look-behind before `next`).
    pub fn needed_from(&self) -> u64 {
        self.next.saturating_sub(LOOK as u64)
    }

    /// Continues the search at `at` (after a match consumed by the caller).
    pub fn resume_at(&mut self, at: u64) {
        self.next = self.next.max(at);
    }
}
