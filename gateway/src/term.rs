//! Printing job- and traffic-supplied text on a reviewer's terminal.
//!
//! URLs, bodies, labels, process names and job variables come from the jobs.
//! Printed as they are, a crafted escape sequence could repaint what an
//! approver or auditor reads, and a bidirectional override (U+202E) could
//! make `/deploy/prod` display as something else. Every command that prints
//! such text passes it through [`safe`].

/// Bidirectional formatting characters: marks, embeddings, overrides and
/// isolates, which reorder how the text around them is displayed.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with control characters (escape sequences, carriage returns) and
/// bidirectional overrides shown escaped (`\u{1b}`, `\u{202e}`) instead of
/// being interpreted.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_overrides_are_escaped() {
        assert_eq!(safe("ok /path?q=1 naïve"), "ok /path?q=1 naïve");
        assert_eq!(safe("a\u{1b}[2Jb\r\n"), "a\\u{1b}[2Jb\\r\\n");
        assert_eq!(safe("a\u{202e}b\u{2066}c\u{200f}"), "a\\u{202e}b\\u{2066}c\\u{200f}");
        assert_eq!(safe_keeping("a\nb\u{7}", &['\n']), "a\nb\\u{7}");
    }
}
