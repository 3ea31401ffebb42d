//! Detection breadth and precision on other scanners' published examples.
//!
//! Builds a corpus from local source trees of Nosey Parker, gitleaks and
//! trufflehog (see `gateway_benches::corpus` for what is extracted and how
//! samples are labelled ambiguous), scans every sample with the gateway's
//! built-in detector exactly as `gateway scan` scans a file
//! (`Detector::scan` on its bytes), and prints recall and false-positive
//! rates per project and per provider family. The samples stay outside this
//! repository, and nothing here prints a sample: misses and false positives
//! are listed by their place in the source project only.
//!
//! ```text
//! git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/np   # one per project
//! NOSEYPARKER_SRC=/tmp/np GITLEAKS_SRC=/tmp/gl TRUFFLEHOG_SRC=/tmp/th \
//!   cargo bench -p gateway-benches --bench detect_corpus [-- --list]
//! ```
//!
//! Any of the three variables may be left out; at least one is needed.
//! `--dump FILE` writes those samples' text to FILE for rule authors (keep
//! it outside the repository). `--rules FILE` scans with the rules of FILE
//! instead of the built-in set (a rule author's draft, read at run time:
//! no rebuild between edits). `--gitleaks-rules FILE` (gitleaks'
//! `config/gitleaks.toml`) also applies gitleaks' default rules to the same
//! samples, the way gitleaks applies them (see `gateway_benches::gitleaks`
//! for what is approximated), and prints its figures beside ours. `--list` prints the origin (`path:line`) and rule of every unambiguous
//! miss and false positive. A detection counts as found when any rule
//! reports it; "blocking" counts only rules of medium or high confidence
//! (what blocks by default), and the false-positive rate is given both ways.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode, time::Instant};

use gateway::detect::{Confidence, Detector};
use gateway_benches::{
    corpus::{self, Extracted, Sample},
    gitleaks::GitleaksRules,
};

/// Reads one project's samples from its source tree.
type Extractor = fn(&std::path::Path) -> anyhow::Result<Extracted>;

#[derive(Default, Clone, Copy)]
struct Tally {
    pos: usize,
    found: usize,
    found_blocking: usize,
    neg: usize,
    fp: usize,
    fp_blocking: usize,
    ambiguous: usize,
}

impl Tally {
    fn add(&mut self, s: &Sample, any: bool, blocking: bool) {
        if s.ambiguous.is_some() {
            self.ambiguous += 1;
        } else if s.positive {
            self.pos += 1;
            self.found += usize::from(any);
            self.found_blocking += usize::from(blocking);
        } else {
            self.neg += 1;
            self.fp += usize::from(any);
            self.fp_blocking += usize::from(blocking);
        }
    }

    fn line(&self, name: &str) -> String {
        let pct = |a: usize, b: usize| {
            if b == 0 {
                "   -  ".to_string()
            } else {
                format!("{:5.1}%", 100.0 * a as f64 / b as f64)
            }
        };
        format!(
            "{name:<26} {:>5} {} {} {:>5} {} {} {:>5}",
            self.pos,
            pct(self.found, self.pos),
            pct(self.found_blocking, self.pos),
            self.neg,
            pct(self.fp, self.neg),
            pct(self.fp_blocking, self.neg),
            self.ambiguous
        )
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("detect_corpus: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let list = args.iter().any(|a| a == "--list");
    // For rule authors: the text of unambiguous misses and false positives
    // goes to this file (never to the terminal), one JSON object a line.
    let dump_path = args.iter().position(|a| a == "--dump").and_then(|i| args.get(i + 1)).map(PathBuf::from);
    let mut dump = Vec::new();
    let sources: [(&str, Extractor); 3] = [
        ("NOSEYPARKER_SRC", corpus::noseyparker),
        ("GITLEAKS_SRC", corpus::gitleaks),
        ("TRUFFLEHOG_SRC", corpus::trufflehog),
    ];
    let mut samples = Vec::new();
    let mut any = false;
    for (var, extract) in sources {
        let Some(dir) = std::env::var_os(var).map(PathBuf::from) else {
            eprintln!("{var} not set: that project is left out");
            continue;
        };
        any = true;
        let got = extract(&dir).map_err(|e| anyhow::anyhow!("{var}={}: {e:#}", dir.display()))?;
        if got.samples.is_empty() {
            anyhow::bail!("{var}={}: no samples found; is it a source tree of that project?", dir.display());
        }
        eprintln!(
            "{var}: {} samples, {} sample expressions not understood (skipped)",
            got.samples.len(),
            got.unextracted
        );
        samples.extend(got.samples);
    }
    if !any {
        anyhow::bail!(
            "set NOSEYPARKER_SRC, GITLEAKS_SRC and/or TRUFFLEHOG_SRC to source trees of those projects \
             (e.g. `git clone --depth 1 https://github.com/gitleaks/gitleaks`); see docs/detection.md"
        );
    }
    corpus::ambiguity(&mut samples)?;

    let detector = match args.iter().position(|a| a == "--rules").and_then(|i| args.get(i + 1)) {
        Some(path) => {
            let specs = gateway::detect::rules::load_rule_file(std::path::Path::new(path))?;
            Detector::from_specs(&specs.into_iter().map(|s| (path.clone(), s)).collect::<Vec<_>>())?
        }
        None => Detector::builtin()?,
    };
    let gitleaks = match args.iter().position(|a| a == "--gitleaks-rules").and_then(|i| args.get(i + 1)) {
        Some(path) => {
            let rules = GitleaksRules::load(std::path::Path::new(path))?;
            eprintln!(
                "gitleaks rules: {} loaded, {} path-only (never apply to a sample), {} regexes skipped: {:?}",
                rules.len(),
                rules.path_only,
                rules.skipped.len(),
                rules.skipped
            );
            Some(rules)
        }
        None => None,
    };
    let mut gl_by_source: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut gl_by_family: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut gl_total = Tally::default();
    let started = Instant::now();
    let mut by_source: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut by_family: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut by_provider: BTreeMap<(String, &str), Tally> = BTreeMap::new();
    let mut total = Tally::default();
    let mut listed = Vec::new();
    let mut bytes = 0usize;
    for s in &samples {
        bytes += s.text.len();
        let found = detector.scan(s.text.as_bytes());
        let hit = !found.is_empty();
        let blocking = found.iter().any(|d| d.confidence >= Confidence::Medium);
        let fam = corpus::family(&s.provider);
        by_source.entry(s.source.as_str()).or_default().add(s, hit, blocking);
        by_family.entry(fam).or_default().add(s, hit, blocking);
        by_provider.entry((s.provider.clone(), s.source.as_str())).or_default().add(s, hit, blocking);
        total.add(s, hit, blocking);
        if dump_path.is_some() && s.ambiguous.is_none() && (s.positive != hit) {
            let rules: Vec<&str> = found.iter().map(|d| &*d.rule_id).collect();
            let obj = serde_json::json!({"source": s.source.as_str(), "origin": s.origin, "provider": s.provider,
                "positive": s.positive, "rules": rules, "text": s.text});
            dump.push(obj.to_string());
        }
        if list && s.ambiguous.is_none() && (s.positive != hit) {
            let rules: Vec<String> = found.iter().map(|d| format!("{}({})", d.rule_id, d.confidence)).collect();
            let what = if s.positive { "MISS" } else { "FP  " };
            listed.push(format!("{what} {} {} {}", s.source.as_str(), s.origin, rules.join(",")));
        }
    }
    let elapsed = started.elapsed();
    if let Some(gl) = &gitleaks {
        for s in &samples {
            // gitleaks has no confidence levels: every finding counts both ways.
            let hit = !gl.scan(&s.text).is_empty();
            gl_by_source.entry(s.source.as_str()).or_default().add(s, hit, hit);
            gl_by_family.entry(corpus::family(&s.provider)).or_default().add(s, hit, hit);
            gl_total.add(s, hit, hit);
        }
        println!("-- gitleaks' default rules on the same samples (reproduced with the regex crate)");
        for (k, t) in &gl_by_source {
            println!("{}", t.line(k));
        }
        println!("{}", gl_total.line("all"));
        println!("-- gitleaks by family");
        for (k, t) in &gl_by_family {
            println!("{}", t.line(k));
        }
    }

    let header = format!(
        "{:<26} {:>5} {:>6} {:>6} {:>5} {:>6} {:>6} {:>5}",
        "", "pos", "recall", "block", "neg", "fp", "fp-blk", "ambig"
    );
    println!("{header}\n-- by project");
    for (k, t) in &by_source {
        println!("{}", t.line(k));
    }
    println!("{}", total.line("all"));
    println!("-- by family");
    for (k, t) in &by_family {
        println!("{}", t.line(k));
    }
    let mut ambig: BTreeMap<String, usize> = BTreeMap::new();
    for s in &samples {
        if let Some(a) = s.ambiguous {
            *ambig.entry(format!("{a:?} {}", if s.positive { "positive" } else { "negative" })).or_default() += 1;
        }
    }
    println!("-- ambiguous (not counted): {ambig:?}");
    println!("-- providers with the most unambiguous misses (provider/project: missed of positives)");
    let mut worst: Vec<_> = by_provider.iter().filter(|(_, t)| t.pos > t.found).collect();
    worst.sort_by_key(|(_, t)| std::cmp::Reverse(t.pos - t.found));
    let line: Vec<String> =
        worst.iter().take(40).map(|((p, src), t)| format!("{p}/{src}: {} of {}", t.pos - t.found, t.pos)).collect();
    println!("{}", line.join(", "));
    println!(
        "scanned {} samples ({} KiB) in {:.1} ms with {} rules",
        samples.len(),
        bytes / 1024,
        elapsed.as_secs_f64() * 1e3,
        detector.rule_count()
    );
    if let Some(p) = dump_path {
        std::fs::write(&p, dump.join("\n") + "\n").map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    for l in listed {
        println!("{l}");
    }
    Ok(())
}
