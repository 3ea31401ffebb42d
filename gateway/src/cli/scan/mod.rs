//! `gateway scan`: the detector as a command-line secret scanner.
//!
//! Reads files and directories (walked with `.gitignore`, `.ignore` and
//! git's excludes respected, binary files skipped), standard input, saved
//! HTTP messages (a raw request or response, its body de-chunked and its
//! `Content-Encoding` undone exactly as the proxy does: [`message`]), HAR
//! files ([`message`]), and with `--git` a repository's whole history
//! ([`git`]). Results go out as text, JSON lines or SARIF, with file, line
//! and (for history) commit; a secret is shown only as its fingerprint and
//! redacted preview.

use std::{
    collections::VecDeque,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use serde_json::{json, Value};

use crate::{
    config::Config,
    detect::{http_scan::BodyLimits, DetectConfig, Detection, Detector, FingerprintKey},
    mask::{MaskSpec, Masker},
    term::safe,
};

mod git;
mod message;

/// Bytes checked for NUL to decide that a file is binary.
const BINARY_SNIFF: usize = 8192;
const STDIN_CHUNK: usize = 1 << 20;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One line per secret: `path:line:column: rule (confidence) fingerprint preview`.
    Text,
    /// One JSON object per secret and line.
    Json,
    /// One SARIF 2.1.0 log, for code-scanning dashboards.
    Sarif,
}

/// Arguments of `gateway scan`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
    /// Shorthand for `--format json`.
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Scan the history of the git repositories PATH (default `.`): every
    /// line added by every commit reachable from any ref, reported with its
    /// commit, path and line (needs the `git` command).
    #[arg(long)]
    pub git: bool,
    /// Walk directories without honouring `.gitignore`, `.ignore` and git's
    /// excludes.
    #[arg(long)]
    pub no_ignore: bool,
    /// Custom rule file (replaces `detect.custom_rules` of the configuration).
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Skip files larger than this many bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    pub max_file_size: u64,
    /// Files or directories (scanned recursively) to scan; `-` or none for standard input.
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Runs `gateway scan`: exit status 1 when secrets were found, 0 when none,
/// 2 on errors. Secrets are shown only as fingerprints and redacted previews.
pub fn run(config: &Config, args: &ScanArgs) -> anyhow::Result<ExitCode> {
    Ok(scan(config, args))
}

fn scan(config: &Config, args: &ScanArgs) -> ExitCode {
    let mut detect: DetectConfig = config.detect.clone();
    if let Some(rules) = &args.rules {
        detect.custom_rules = Some(rules.clone());
    }
    let detector = match Detector::new(&detect) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("gateway scan: {e}");
            return ExitCode::from(2);
        }
    };
    let key = match FingerprintKey::load(&config.state_dir) {
        Ok(Some(key)) => key,
        Ok(None) | Err(_) => {
            eprintln!(
                "gateway scan: fingerprint key in {} not readable; using an ephemeral key (fingerprints will not match the gateway's findings)",
                config.state_dir.display()
            );
            FingerprintKey::ephemeral()
        }
    };
    let masker = match Masker::new(detector.clone(), &MaskSpec::default()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("gateway scan: {e}");
            return ExitCode::from(2);
        }
    };
    let stdout = std::io::stdout();
    let format = if args.json { OutputFormat::Json } else { args.format };
    let mut scan = Scan {
        detector,
        masker,
        key,
        format,
        max_file_size: args.max_file_size,
        ignore: !args.no_ignore,
        limits: BodyLimits::default(),
        out: stdout.lock(),
        sarif: Vec::new(),
        found: 0,
        errors: 0,
    };
    if args.git {
        let repos = if args.paths.is_empty() { vec![PathBuf::from(".")] } else { args.paths.clone() };
        for repo in &repos {
            git::scan_history(&mut scan, repo);
        }
    } else {
        let paths = if args.paths.is_empty() { vec![PathBuf::from("-")] } else { args.paths.clone() };
        for path in &paths {
            if path.as_os_str() == "-" {
                scan.stdin();
            } else {
                scan.path(path);
            }
        }
    }
    scan.finish();
    if scan.out.flush().is_err() {
        return ExitCode::from(2);
    }
    if scan.errors > 0 {
        ExitCode::from(2)
    } else if scan.found > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Where a secret was found.
pub(crate) struct Place<'a> {
    /// The file (or `<stdin>`), as given or walked.
    pub path: &'a str,
    /// 1-based line and byte column.
    pub line: u64,
    pub column: u64,
    /// The commit that added it (`--git`).
    pub commit: Option<&'a str>,
    /// Where in an HTTP message or HAR entry (`header:authorization`,
    /// `entries[2].request.body:$.token`).
    pub location: Option<String>,
}

pub(crate) struct Scan<W: Write> {
    pub detector: Arc<Detector>,
    /// Masks keys in the places printed (a key used as a query parameter's
    /// or a JSON field's name is in its location).
    masker: Masker,
    key: FingerprintKey,
    format: OutputFormat,
    max_file_size: u64,
    ignore: bool,
    pub limits: BodyLimits,
    out: W,
    /// SARIF results, printed as one log at the end.
    sarif: Vec<Value>,
    found: usize,
    errors: usize,
}

impl<W: Write> Scan<W> {
    /// Scans a named file, or walks a named directory.
    fn path(&mut self, path: &Path) {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) => return self.error(path, &e),
        };
        if !meta.is_dir() {
            return self.file(path, meta.len());
        }
        let mut walk = ignore::WalkBuilder::new(path);
        walk.hidden(false)
            .git_ignore(self.ignore)
            .git_exclude(self.ignore)
            .git_global(self.ignore)
            .ignore(self.ignore)
            .parents(self.ignore)
            .require_git(false)
            // Git's object store is compressed; history is `--git`'s job.
            .filter_entry(|e| e.file_name() != ".git")
            .sort_by_file_name(|a, b| a.cmp(b));
        for entry in walk.build() {
            match entry {
                Ok(e) if e.file_type().is_some_and(|t| t.is_file()) => {
                    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                    self.file(e.path(), len);
                }
                // Directories, symlinks (not followed), sockets, devices.
                Ok(_) => {}
                Err(e) => {
                    eprintln!("gateway scan: {}", safe(&e.to_string()));
                    self.errors += 1;
                }
            }
        }
    }

    fn file(&mut self, path: &Path, len: u64) {
        if len > self.max_file_size {
            eprintln!(
                "gateway scan: {}: skipped, larger than {} bytes",
                safe(&path.display().to_string()),
                self.max_file_size
            );
            return;
        }
        let data = match std::fs::read(path) {
            Ok(data) => data,
            Err(e) => return self.error(path, &e),
        };
        self.contents(path, &data);
    }

    /// Scans a file's contents: as HAR, as a saved HTTP message, or as text.
    fn contents(&mut self, path: &Path, data: &[u8]) {
        let name = path.display().to_string();
        if message::is_har(path, data) {
            match message::scan_har(self, &name, data) {
                Ok(()) => return,
                Err(why) => eprintln!("gateway scan: {}: not read as HAR ({why}); scanned as text", safe(&name)),
            }
        }
        // Before the binary check: a saved message's body may be compressed.
        if message::is_http_message(data) && message::scan_http_message(self, &name, data).is_ok() {
            return;
        }
        if is_binary(data) {
            return;
        }
        self.text(&name, None, data, 1);
    }

    /// Scans `data` as plain text whose first line is line `first_line`.
    pub(crate) fn text(&mut self, name: &str, commit: Option<&str>, data: &[u8], first_line: u64) {
        let detections = self.detector.scan(data);
        let mut lines = LineIndex::default();
        lines.push(0, data);
        for d in detections {
            let (line, column) = lines.position(d.start);
            let place = Place { path: name, line: line + first_line - 1, column, commit, location: None };
            self.report(&place, &d);
        }
    }

    fn stdin(&mut self) {
        let mut scanner = self.detector.stream();
        let mut lines = LineIndex::default();
        let mut input = std::io::stdin().lock();
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return self.error(Path::new("<stdin>"), &e),
            };
            lines.push(scanner.offset(), &buf[..n]);
            for d in scanner.feed(&buf[..n]) {
                self.report_at("<stdin>", &lines, &d);
            }
            lines.prune(scanner.retained_from());
        }
        for d in scanner.finish() {
            self.report_at("<stdin>", &lines, &d);
        }
    }

    fn report_at(&mut self, name: &str, lines: &LineIndex, d: &Detection) {
        let (line, column) = lines.position(d.start);
        self.report(&Place { path: name, line, column, commit: None, location: None }, d);
    }

    /// Prints one secret (fingerprint and preview only).
    pub(crate) fn report(&mut self, place: &Place<'_>, d: &Detection) {
        self.report_masked(place, d, &[(d.secret.as_bytes(), &d.rule_id)]);
    }

    /// Prints what one file (an HTTP message, a HAR file) was found to
    /// hold. Every location is masked with every key found in the file, not
    /// only its own: a key found in the body may also stand in a query
    /// parameter's name, glued to other characters (so not found there),
    /// which another finding's location prints.
    pub(crate) fn report_found(&mut self, found: &[(Place<'_>, Detection)]) {
        let mut keys: Vec<(&[u8], &str)> = found.iter().map(|(_, d)| (d.secret.as_bytes(), &*d.rule_id)).collect();
        // Longest first: a key inside a longer one is masked with it.
        keys.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(b.0)));
        keys.dedup_by(|a, b| a.0 == b.0);
        for (place, d) in found {
            self.report_masked(place, d, &keys);
        }
    }

    /// [`Self::report`], its location masked as the gateway stores a
    /// finding's location (keys the masker finds), and each of `keys`
    /// replaced wherever it stands (the detector may not find it again in
    /// the location's text, say glued to other characters).
    fn report_masked(&mut self, place: &Place<'_>, d: &Detection, keys: &[(&[u8], &str)]) {
        self.found += 1;
        let fingerprint = d.secret.fingerprint(&self.key);
        let preview = d.secret.preview();
        let Place { path, line, column, commit, location } = place;
        let location = location.as_deref().map(|l| {
            let mut masked = self.masker.mask_text(l).into_owned();
            for (key, rule) in keys {
                if let Ok(key) = std::str::from_utf8(key) {
                    if !key.is_empty() && masked.contains(key) {
                        masked = masked.replace(key, &format!("[MASKED:{rule}]"));
                    }
                }
            }
            masked
        });
        let result = match self.format {
            OutputFormat::Json => {
                let obj = json!({
                    "path": path,
                    "line": line,
                    "column": column,
                    "commit": commit,
                    "location": location,
                    "offset": d.start,
                    "rule_id": &*d.rule_id,
                    "rule_name": self.detector.rule_name(&d.rule_id),
                    "confidence": d.confidence,
                    "fingerprint": fingerprint,
                    "preview": preview,
                });
                writeln!(self.out, "{obj}")
            }
            OutputFormat::Text => {
                // File names come from the scanned tree, which may be a job's.
                let commit = commit.map(|c| format!("{c}:")).unwrap_or_default();
                let location = location.as_ref().map(|l| format!(" at {}", safe(l))).unwrap_or_default();
                writeln!(
                    self.out,
                    "{commit}{}:{line}:{column}: {} ({}) {fingerprint} {}{location}",
                    safe(path),
                    d.rule_id,
                    d.confidence,
                    safe(&preview)
                )
            }
            OutputFormat::Sarif => {
                let mut result = json!({
                    "ruleId": &*d.rule_id,
                    "level": "error",
                    "message": { "text": format!(
                        "Static key {preview} ({}){}{}.",
                        d.rule_id,
                        location.as_ref().map(|l| format!(" at {l}")).unwrap_or_default(),
                        commit.map(|c| format!(" added in commit {c}")).unwrap_or_default(),
                    ) },
                    "locations": [{
                        "physicalLocation": {
                            "artifactLocation": { "uri": path },
                            "region": { "startLine": line, "startColumn": column },
                        }
                    }],
                    "partialFingerprints": { "staticKeyHmac/v1": fingerprint },
                    "properties": { "confidence": d.confidence, "preview": preview },
                });
                if let Some(c) = commit {
                    result["properties"]["commit"] = json!(c);
                }
                if let Some(l) = location {
                    result["locations"][0]["logicalLocations"] = json!([{ "name": l, "kind": "resource" }]);
                }
                self.sarif.push(result);
                Ok(())
            }
        };
        if result.is_err() {
            self.errors += 1;
        }
    }

    /// Prints what is printed once, at the end (the SARIF log).
    fn finish(&mut self) {
        if self.format != OutputFormat::Sarif {
            return;
        }
        let mut ids: Vec<String> = self.sarif.iter().filter_map(|r| r["ruleId"].as_str().map(str::to_owned)).collect();
        ids.sort_unstable();
        ids.dedup();
        for r in &mut self.sarif {
            let index = r["ruleId"].as_str().and_then(|id| ids.iter().position(|x| x == id)).unwrap_or(0);
            r["ruleIndex"] = json!(index);
        }
        let rules = ids
            .iter()
            .map(|id| {
                json!({
                    "id": id,
                    "name": self.detector.rule_name(id).unwrap_or(id),
                    "shortDescription": { "text": format!("Hard-coded secret ({id})") },
                    "defaultConfiguration": { "level": "error" },
                })
            })
            .collect();
        let log = crate::findings::sarif_log(rules, std::mem::take(&mut self.sarif));
        let written = serde_json::to_writer_pretty(&mut self.out, &log).map_err(std::io::Error::from);
        if written.and_then(|()| self.out.write_all(b"\n")).is_err() {
            self.errors += 1;
        }
    }

    pub(crate) fn error(&mut self, path: &Path, e: &dyn std::fmt::Display) {
        eprintln!("gateway scan: {}: {e}", safe(&path.display().to_string()));
        self.errors += 1;
    }
}

/// What `gateway scan --json` prints for a file named `path` holding
/// `data` (read as HAR, a saved HTTP message or text, as for a file on
/// disk), fingerprinted with `key` (the fuzz target's own, so that it can
/// tell which of its keys were reported). For `crate::fuzzing::scan_saved`.
pub(crate) fn json_report(detector: Arc<Detector>, key: FingerprintKey, path: &Path, data: &[u8]) -> Vec<u8> {
    let Ok(masker) = Masker::new(detector.clone(), &MaskSpec::default()) else {
        return Vec::new();
    };
    let mut scan = Scan {
        detector,
        masker,
        key,
        format: OutputFormat::Json,
        max_file_size: u64::MAX,
        ignore: true,
        limits: BodyLimits::default(),
        out: Vec::new(),
        sarif: Vec::new(),
        found: 0,
        errors: 0,
    };
    scan.contents(path, data);
    scan.out
}

fn is_binary(data: &[u8]) -> bool {
    data[..data.len().min(BINARY_SNIFF)].contains(&0)
}

/// 1-based line and byte column of `offset` in `data`.
pub(crate) fn position(data: &[u8], offset: usize) -> (u64, u64) {
    let before = &data[..offset.min(data.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
    let start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    (line, (offset - start) as u64 + 1)
}

/// Line starts of the part of the input that detections can still refer to.
#[derive(Default)]
struct LineIndex {
    /// Newlines before the first one in `newlines`.
    dropped: u64,
    /// Offset just past the last dropped newline (start of its line).
    dropped_line_start: u64,
    newlines: VecDeque<u64>,
}

impl LineIndex {
    fn push(&mut self, base: u64, data: &[u8]) {
        self.newlines.extend(data.iter().enumerate().filter(|(_, &b)| b == b'\n').map(|(i, _)| base + i as u64));
    }

    fn prune(&mut self, keep_from: u64) {
        while self.newlines.front().is_some_and(|&nl| nl < keep_from) {
            if let Some(nl) = self.newlines.pop_front() {
                self.dropped += 1;
                self.dropped_line_start = nl + 1;
            }
        }
    }

    /// 1-based line and column (in bytes) of `offset`.
    fn position(&self, offset: u64) -> (u64, u64) {
        let before = self.newlines.partition_point(|&nl| nl < offset);
        let line_start = before.checked_sub(1).map_or(self.dropped_line_start, |i| self.newlines[i] + 1);
        (self.dropped + before as u64 + 1, offset - line_start + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_positions() {
        let mut idx = LineIndex::default();
        idx.push(0, b"ab\ncd\n");
        idx.push(6, b"efg\n");
        assert_eq!(idx.position(0), (1, 1));
        assert_eq!(idx.position(4), (2, 2));
        assert_eq!(idx.position(8), (3, 3));
        idx.prune(6);
        assert_eq!(idx.position(8), (3, 3));
        assert_eq!(position(b"ab\ncd\nefg\n", 8), (3, 3));
        assert_eq!(position(b"ab", 0), (1, 1));
    }
}
