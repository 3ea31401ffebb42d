//! `gateway scan --git`: a repository's history.
//!
//! Runs `git log --all -p -U0 --cc` (the `git` command, not a library: it
//! is on every machine that has a repository, reads every object format
//! and pack the repository uses, and costs this binary nothing; `gix`
//! would add a large dependency tree for one command) and scans the lines
//! each commit added, file by file, reporting the commit, the path and the
//! line in that commit's version of the file. Every line of every blob
//! reachable from any ref was added by some commit, so a key committed and
//! deleted later is still found, at the commit that added it; merges are
//! read as combined diffs (`--cc`), so content only a merge introduced (a
//! conflict resolution) is scanned too. Binary files show no lines.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
};

use super::Scan;

/// Bytes of added lines scanned together (one file of one commit); longer
/// runs are scanned in pieces of this size.
const MAX_BLOCK: usize = 8 << 20;

/// Added lines of one file in one commit, joined, with the line number in
/// the new file of each.
#[derive(Default)]
struct Added {
    text: Vec<u8>,
    /// (offset in `text`, line number in the file) per line.
    lines: Vec<(usize, u64)>,
}

impl Added {
    fn push(&mut self, line: &[u8], number: u64) {
        // A gap in the numbering is another hunk: a blank line keeps a match
        // from joining text that is not adjacent in the file.
        if let Some(&(_, last)) = self.lines.last() {
            if number != last + 1 {
                self.text.push(b'\n');
            }
        }
        self.lines.push((self.text.len(), number));
        self.text.extend_from_slice(line);
        self.text.push(b'\n');
    }

    fn line_of(&self, offset: u64) -> (u64, u64) {
        let i = self.lines.partition_point(|&(at, _)| at as u64 <= offset).saturating_sub(1);
        let (at, number) = self.lines.get(i).copied().unwrap_or((0, 1));
        (number, offset.saturating_sub(at as u64) + 1)
    }
}

/// Scans the history of the repository at `repo`.
pub(super) fn scan_history<W: Write>(scan: &mut Scan<W>, repo: &Path) {
    let mut child = match Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "core.quotePath=false", "-c", "diff.noprefix=false", "-c", "log.showSignature=false"])
        .args(["log", "--all", "-p", "-U0", "--cc", "--no-color", "--no-ext-diff", "--no-textconv"])
        .args(["--src-prefix=a/", "--dst-prefix=b/", "--format=commit %H"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return scan.error(repo, &format!("running git: {e}")),
    };
    let Some(stdout) = child.stdout.take() else { return scan.error(repo, &"git gave no output") };
    let mut reader = BufReader::new(stdout);
    let mut commit = String::new();
    let mut path: Option<String> = None;
    let mut added = Added::default();
    // Parents of the current hunk's diff (1, or more for a merge's combined
    // diff), and the next line number in the new file.
    let (mut parents, mut next) = (1usize, 0u64);
    let mut in_hunk = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                scan.error(repo, &format!("reading git's output: {e}"));
                break;
            }
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if let Some(id) = text.strip_prefix(b"commit ") {
            flush(scan, &commit, path.as_deref(), &mut added);
            commit = String::from_utf8_lossy(id).into_owned();
            path = None;
            in_hunk = false;
            continue;
        }
        if text.starts_with(b"diff ") {
            flush(scan, &commit, path.as_deref(), &mut added);
            path = None;
            in_hunk = false;
            continue;
        }
        if !in_hunk {
            if let Some(p) = text.strip_prefix(b"+++ ") {
                path = new_path(p);
            }
        }
        if text.starts_with(b"@@") {
            let ats = text.iter().take_while(|&&b| b == b'@').count();
            parents = ats.saturating_sub(1).max(1);
            next = hunk_start(text).unwrap_or(1);
            in_hunk = true;
            continue;
        }
        if !in_hunk || path.is_none() || text.len() < parents {
            continue;
        }
        let (marks, content) = text.split_at(parents);
        if marks.contains(&b'-') {
            // Only in a parent: not in the new file.
            continue;
        }
        if marks.contains(&b'+') {
            added.push(content, next);
            if added.text.len() >= MAX_BLOCK {
                flush(scan, &commit, path.as_deref(), &mut added);
            }
        }
        if marks.iter().all(|&m| m == b'+' || m == b' ') {
            next += 1;
        }
    }
    flush(scan, &commit, path.as_deref(), &mut added);
    match child.wait() {
        Ok(status) if status.success() => {}
        Ok(status) => scan.error(repo, &format!("git log failed ({status}); is it a git repository?")),
        Err(e) => scan.error(repo, &format!("waiting for git: {e}")),
    }
}

/// Scans the added lines collected for one file and starts over.
fn flush<W: Write>(scan: &mut Scan<W>, commit: &str, path: Option<&str>, added: &mut Added) {
    let block = std::mem::take(added);
    let Some(path) = path else { return };
    if block.text.is_empty() {
        return;
    }
    for d in scan.detector.scan(&block.text) {
        let (line, column) = block.line_of(d.start);
        let place = super::Place { path, line, column, commit: Some(commit), location: None };
        scan.report(&place, &d);
    }
}

/// The path of `+++ b/<path>`; `None` for `/dev/null` (a deletion).
fn new_path(p: &[u8]) -> Option<String> {
    let p = String::from_utf8_lossy(p);
    let p = p.trim_end_matches('\t');
    let p = match p.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
        // Quoted for special characters: unescape the common ones.
        Some(q) => q.replace("\\\"", "\"").replace("\\t", "\t").replace("\\n", "\n").replace("\\\\", "\\"),
        None => p.to_owned(),
    };
    p.strip_prefix("b/").map(str::to_owned)
}

/// The first line of the new file's range in a hunk header
/// (`@@ -a,b +c,d @@`, or `@@@ -a -b +c @@@` for a merge).
fn hunk_start(header: &[u8]) -> Option<u64> {
    let header = std::str::from_utf8(header).ok()?;
    let plus = header.split(' ').find(|w| w.starts_with('+'))?;
    let start = plus[1..].split(',').next()?;
    let start: u64 = start.parse().ok()?;
    // A range of zero lines starts after line `start`; none are added then.
    Some(start.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_hunk_headers_and_paths() {
        assert_eq!(hunk_start(b"@@ -0,0 +1,3 @@"), Some(1));
        assert_eq!(hunk_start(b"@@ -5 +7 @@ fn x()"), Some(7));
        assert_eq!(hunk_start(b"@@@ -1,2 -1,2 +1,3 @@@"), Some(1));
        assert_eq!(new_path(b"b/src/main.rs").as_deref(), Some("src/main.rs"));
        assert_eq!(new_path(b"/dev/null"), None);
        assert_eq!(new_path(b"\"b/a \\\"q\\\".txt\"").as_deref(), Some("a \"q\".txt"));
    }

    #[test]
    fn added_lines_keep_their_numbers() {
        let mut a = Added::default();
        a.push(b"one", 3);
        a.push(b"two", 4);
        a.push(b"ten", 10);
        assert_eq!(a.line_of(0), (3, 1));
        assert_eq!(a.line_of(5), (4, 2));
        // After the gap's blank line.
        assert_eq!(a.line_of(9), (10, 1));
    }
}
