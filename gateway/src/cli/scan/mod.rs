//! `gateway scan`: the detector as a command-line secret scanner.

use std::{
    collections::VecDeque,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use crate::{
    config::Config,
    detect::{DetectConfig, Detection, Detector, FingerprintKey},
    term::safe,
};

/// Bytes checked for NUL to decide that a file is binary.
const BINARY_SNIFF: usize = 8192;
const STDIN_CHUNK: usize = 1 << 20;

/// Arguments of `gateway scan`.
#[derive(Debug, clap::Args)]
pub struct ScanArgs {
    /// Print one JSON object per finding instead of one line.
    #[arg(long)]
    pub json: bool,
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
    let stdout = std::io::stdout();
    let mut scan = Scan {
        detector,
        key,
        json: args.json,
        max_file_size: args.max_file_size,
        out: stdout.lock(),
        found: 0,
        errors: 0,
    };
    let paths = if args.paths.is_empty() { vec![PathBuf::from("-")] } else { args.paths.clone() };
    for path in &paths {
        if path.as_os_str() == "-" {
            scan.stdin();
        } else {
            scan.path(path, true);
        }
    }
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

struct Scan<W: Write> {
    detector: Arc<Detector>,
    key: FingerprintKey,
    json: bool,
    max_file_size: u64,
    out: W,
    found: usize,
    errors: usize,
}

impl<W: Write> Scan<W> {
    fn path(&mut self, path: &Path, named: bool) {
        let meta = match if named { std::fs::metadata(path) } else { std::fs::symlink_metadata(path) } {
            Ok(m) => m,
            Err(e) => return self.error(path, &e),
        };
        if meta.is_dir() {
            // Git's object store is compressed and its history is out of scope.
            if !named && path.file_name().is_some_and(|n| n == ".git") {
                return;
            }
            let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(e) => return self.error(path, &e),
            };
            entries.sort();
            for entry in entries {
                self.path(&entry, false);
            }
        } else if meta.is_file() {
            if meta.len() > self.max_file_size {
                eprintln!(
                    "gateway scan: {}: skipped, larger than {} bytes",
                    safe(&path.display().to_string()),
                    self.max_file_size
                );
                return;
            }
            match std::fs::read(path) {
                Ok(data) if is_binary(&data) => {}
                Ok(data) => {
                    let detections = self.detector.scan(&data);
                    let mut lines = LineIndex::default();
                    lines.push(0, &data);
                    for d in detections {
                        self.report(&path.display().to_string(), &lines, &d);
                    }
                }
                Err(e) => self.error(path, &e),
            }
        }
        // Sockets, devices and (unnamed) symlinks are not scanned.
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
                self.report("<stdin>", &lines, &d);
            }
            lines.prune(scanner.retained_from());
        }
        for d in scanner.finish() {
            self.report("<stdin>", &lines, &d);
        }
    }

    fn report(&mut self, name: &str, lines: &LineIndex, d: &Detection) {
        self.found += 1;
        let (line, column) = lines.position(d.start);
        let fingerprint = d.secret.fingerprint(&self.key);
        let preview = d.secret.preview();
        let result = if self.json {
            let obj = serde_json::json!({
                "path": name,
                "line": line,
                "column": column,
                "offset": d.start,
                "rule_id": &*d.rule_id,
                "rule_name": self.detector.rule_name(&d.rule_id),
                "confidence": d.confidence,
                "fingerprint": fingerprint,
                "preview": preview,
            });
            writeln!(self.out, "{obj}")
        } else {
            // File names come from the scanned tree, which may be a job's.
            writeln!(
                self.out,
                "{}:{line}:{column}: {} ({}) {fingerprint} {}",
                safe(name),
                d.rule_id,
                d.confidence,
                safe(&preview)
            )
        };
        if result.is_err() {
            self.errors += 1;
        }
    }

    fn error(&mut self, path: &Path, e: &std::io::Error) {
        eprintln!("gateway scan: {}: {e}", safe(&path.display().to_string()));
        self.errors += 1;
    }
}

fn is_binary(data: &[u8]) -> bool {
    data[..data.len().min(BINARY_SNIFF)].contains(&0)
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
    }
}
