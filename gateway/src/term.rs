//! Printing job- and traffic-supplied text on a reviewer's terminal.
//!
//! URLs, bodies, labels, process names, file names and job variables come
//! from the jobs. Printed as they are, a crafted escape sequence could
//! repaint what an approver or auditor reads, and a bidirectional override
//! (U+202E) could make `/deploy/prod` display as something else. Every
//! command that prints such text passes it through [`safe`] (or a [`Table`],
//! which escapes every cell).

use std::fmt::Write as _;

use time::{format_description::FormatItem, macros::format_description, OffsetDateTime, UtcOffset};

/// Bidirectional formatting characters: marks (LRM, RLM, ALM), embeddings,
/// overrides and isolates, which reorder how the text around them is
/// displayed.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with control characters (escape sequences, carriage returns) and
/// bidirectional controls shown escaped (`\u{1b}`, `\u{202e}`) instead of
/// being interpreted. Idempotent: escaped text has nothing left to escape.
pub fn safe(s: &str) -> String {
    safe_keeping(s, &[])
}

/// [`safe`], but the characters in `keep` (say `\n` of a multi-line body)
/// pass as they are.
pub fn safe_keeping(s: &str, keep: &[char]) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if (c.is_control() || is_bidi_control(c)) && !keep.contains(&c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Which end of a long cell [`cell`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The start (`abcd…`): names, URLs.
    Start,
    /// The end (`…/bin/tool`): paths, whose informative part is last.
    End,
}

/// [`safe`], then cut to `width` characters with an ellipsis where the cut is.
pub fn cell(s: &str, width: usize, keep: Keep) -> String {
    let s = safe(s);
    let n = s.chars().count();
    if n <= width {
        return s;
    }
    let kept = width.saturating_sub(1);
    match keep {
        Keep::Start => format!("{}…", s.chars().take(kept).collect::<String>()),
        Keep::End => format!("…{}", s.chars().skip(n - kept).collect::<String>()),
    }
}

const SECONDS: &[FormatItem<'static>] = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]Z");
const MILLISECONDS: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]Z");

/// A time in UTC to the second: `2024-05-02 09:14:03Z`.
pub fn when(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC).format(SECONDS).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A time in UTC to the millisecond: `2024-05-02 09:14:03.250Z`.
pub fn when_ms(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC).format(MILLISECONDS).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A listing: a header and rows of `N` cells, columns as wide as their
/// widest cell, two spaces apart, no trailing blanks. Every cell is passed
/// through [`safe`] when the row is added.
#[derive(Debug, Clone)]
pub struct Table<const N: usize> {
    header: [&'static str; N],
    right: [bool; N],
    rows: Vec<[String; N]>,
}

impl<const N: usize> Table<N> {
    /// An empty table with these column titles, every column left-aligned.
    pub fn new(header: [&'static str; N]) -> Self {
        Table { header, right: [false; N], rows: Vec::new() }
    }

    /// Right-aligns column `column` (counts).
    pub fn right_align(mut self, column: usize) -> Self {
        if let Some(r) = self.right.get_mut(column) {
            *r = true;
        }
        self
    }

    /// Adds a row; its cells are escaped.
    pub fn row(&mut self, cells: [String; N]) {
        self.rows.push(cells.map(|c| safe(&c)));
    }

    /// The table as text, one line per row after the header.
    pub fn render(&self) -> String {
        let mut widths = self.header.map(|h| h.chars().count());
        for row in &self.rows {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: [&str; N]| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i > 0 {
                    l.push_str("  ");
                }
                let pad = widths[i].saturating_sub(c.chars().count());
                if self.right[i] {
                    l.extend(std::iter::repeat_n(' ', pad));
                    l.push_str(c);
                } else {
                    l.push_str(c);
                    l.extend(std::iter::repeat_n(' ', pad));
                }
            }
            let _ = writeln!(out, "{}", l.trim_end());
        };
        line(self.header);
        for row in &self.rows {
            line(row.each_ref().map(String::as_str));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_controls_are_escaped() {
        assert_eq!(safe("ok /path?q=1 naïve"), "ok /path?q=1 naïve");
        assert_eq!(safe("a\u{1b}[2Jb\r\n"), "a\\u{1b}[2Jb\\r\\n");
        assert_eq!(safe("a\u{7f}b\u{9b}c"), "a\\u{7f}b\\u{9b}c");
        assert_eq!(safe_keeping("a\nb\u{7}", &['\n']), "a\nb\\u{7}");
    }

    #[test]
    fn every_bidi_control_is_escaped() {
        let bidi = ['\u{061c}', '\u{200e}', '\u{200f}', '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}'];
        let isolates = ['\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}'];
        for c in bidi.into_iter().chain(isolates) {
            let text = format!("/deploy/{c}dorp");
            let shown = safe(&text);
            assert!(!shown.contains(c), "U+{:04X} passed: {shown}", c as u32);
            assert_eq!(shown, format!("/deploy/\\u{{{:x}}}dorp", c as u32));
        }
        // Neighbours that do not reorder text are left alone.
        assert_eq!(safe("\u{200d}\u{2065}\u{202f}"), "\u{200d}\u{2065}\u{202f}");
    }

    #[test]
    fn escaping_is_idempotent() {
        let once = safe("a\u{202e}b\u{1b}c\\d");
        assert_eq!(safe(&once), once);
    }

    #[test]
    fn cells_are_escaped_then_cut() {
        assert_eq!(cell("/very/long/path/to/bin/tool", 10, Keep::End), "…/bin/tool");
        assert_eq!(cell("abcdefghijkl", 5, Keep::Start), "abcd…");
        assert_eq!(cell("ab\u{1b}", 10, Keep::Start), "ab\\u{1b}");
        assert_eq!(cell("short", 10, Keep::Start), "short");
    }

    #[test]
    fn tables_align_escape_and_trim() {
        let mut t = Table::new(["ID", "NAME", "N"]).right_align(2);
        t.row(["F-1".into(), "a\u{202e}b".into(), "7".into()]);
        t.row(["F-10".into(), "".into(), "123".into()]);
        assert_eq!(t.render(), "ID    NAME          N\nF-1   a\\u{202e}b    7\nF-10              123\n");
        let empty = Table::new(["A", "B"]);
        assert_eq!(empty.render(), "A  B\n");
    }

    #[test]
    fn times_are_utc() {
        let t = time::macros::datetime!(2024-05-02 11:14:03.25 +02:00);
        assert_eq!(when(t), "2024-05-02 09:14:03Z");
        assert_eq!(when_ms(t), "2024-05-02 09:14:03.250Z");
    }
}
