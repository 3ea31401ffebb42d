//! Static-key detector throughput, per core, over a generated corpus of mixed
//! HTTP traffic (request heads, JSON and form bodies, a few keys sprinkled in):
//!
//! * `hyperscan-detector`: the gateway's `Detector::scan` (prefilter and
//!   confirmation), one call per message, as the proxy uses it;
//! * `regex-set`: the Rust `regex` crate's `RegexSet` over the same rules'
//!   prefilter patterns, one `matches` call per message. It only prefilters,
//!   so the comparison favours it.
//!
//! Run with `cargo bench -p gateway-benches --bench detect`. Criterion reports
//! MiB/s; a summary with the ratio is printed at the end. With
//! `DETECT_BENCH_BASELINE_RULES=<rule file>` (e.g. an earlier `builtin.yaml`),
//! a third function, `hyperscan-baseline-rules`, scans the same corpus with
//! that rule set in the same run, so what new rules cost is measured under
//! the same load.

use std::time::{Duration, Instant};

use criterion::{black_box, Criterion, Throughput};
use gateway::detect::Detector;
use regex::bytes::{RegexSet, RegexSetBuilder};

/// Messages in the corpus (about 2.5 KiB each).
const MESSAGES: usize = 2000;
/// One message in this many carries a key.
const KEY_EVERY: usize = 250;

/// A small deterministic generator, so runs are comparable.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.next() as usize % items.len()]
    }

    fn token(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len).map(|_| alphabet[self.next() as usize % alphabet.len()] as char).collect()
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const HEX: &[u8] = b"0123456789abcdef";
const WORDS: &[&str] = &[
    "build", "artifact", "pipeline", "status", "commit", "branch", "release", "deploy", "package", "version", "runner",
    "cache", "result", "metadata", "checksum", "module", "target", "config", "report", "coverage",
];

fn message(rng: &mut Lcg, with_key: bool) -> Vec<u8> {
    let method = rng.pick(&["GET", "POST", "PUT", "PATCH"]);
    let host = rng.pick(&["api.github.com", "registry.npmjs.org", "pypi.org", "api.openai.com", "s3.amazonaws.com"]);
    let mut m = format!(
        "{method} /v1/{}/{}?page={}&per_page=100 HTTP/1.1\r\nhost: {host}\r\nuser-agent: ci-runner/2.3 (linux; x86_64)\r\naccept: application/json\r\naccept-encoding: gzip, br\r\nx-request-id: {}\r\ncookie: session={}; theme=dark\r\ncontent-type: application/json\r\n\r\n",
        rng.pick(WORDS),
        rng.token(HEX, 12),
        rng.next() % 50,
        rng.token(HEX, 32),
        rng.token(ALNUM, 24),
    );
    m.push('{');
    let fields = 20 + rng.next() as usize % 30;
    for i in 0..fields {
        let key = rng.pick(WORDS);
        let value = match rng.next() % 5 {
            0 => format!("{}", rng.next()),
            1 => format!("\"{}\"", rng.token(HEX, 40)),
            2 => format!("\"{} {} {}\"", rng.pick(WORDS), rng.pick(WORDS), rng.pick(WORDS)),
            3 => "true".to_string(),
            _ => format!("\"https://{host}/{}/{}\"", rng.pick(WORDS), rng.token(ALNUM, 10)),
        };
        if i > 0 {
            m.push(',');
        }
        m.push_str(&format!("\"{key}_{i}\":{value}"));
    }
    if with_key {
        let key = match rng.next() % 4 {
            0 => format!("key_{}", rng.token(HEX, 64)),
            1 => format!("AKIA{}", rng.token(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16)),
            2 => format!("sk_live_{}", rng.token(ALNUM, 40)),
            _ => format!(
                "xoxb-{}-{}-{}",
                rng.token(b"0123456789", 12),
                rng.token(b"0123456789", 13),
                rng.token(ALNUM, 24)
            ),
        };
        m.push_str(&format!(",\"credentials\":{{\"api_key\":\"{key}\"}}"));
    }
    m.push_str("}\n");
    m.into_bytes()
}

fn corpus() -> Vec<Vec<u8>> {
    let mut rng = Lcg(0x5eed);
    (0..MESSAGES).map(|i| message(&mut rng, i % KEY_EVERY == KEY_EVERY / 2)).collect()
}

fn regex_set(detector: &Detector) -> RegexSet {
    RegexSetBuilder::new(detector.patterns())
        .unicode(false)
        .size_limit(256 << 20)
        .dfa_size_limit(256 << 20)
        .build()
        .unwrap_or_else(|e| panic!("RegexSet over the rules' patterns: {e}"))
}

/// Wall-clock MB/s (10^6 bytes) of `f` over the corpus, best of a few rounds.
fn mbps(corpus: &[Vec<u8>], bytes: usize, mut f: impl FnMut(&[u8]) -> usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let mut n = 0;
        for m in corpus {
            n += f(m);
        }
        black_box(n);
        best = best.min(start.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e6
}

fn main() {
    let detector = Detector::builtin().unwrap_or_else(|e| panic!("built-in rules: {e}"));
    let set = regex_set(&detector);
    let corpus = corpus();
    let bytes: usize = corpus.iter().map(Vec::len).sum();
    let found: usize = corpus.iter().map(|m| detector.scan(m).len()).sum();
    println!(
        "corpus: {} messages, {:.1} MiB, {} rules, {found} detections",
        corpus.len(),
        bytes as f64 / (1 << 20) as f64,
        detector.rule_count()
    );

    let baseline = std::env::var_os("DETECT_BENCH_BASELINE_RULES").map(|path| {
        let path = std::path::PathBuf::from(path);
        let specs = gateway::detect::rules::load_rule_file(&path)
            .unwrap_or_else(|e| panic!("DETECT_BENCH_BASELINE_RULES={}: {e}", path.display()));
        let named: Vec<_> = specs.into_iter().map(|s| (path.display().to_string(), s)).collect();
        let det = Detector::from_specs(&named).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        println!("baseline: {} rules from {}", det.rule_count(), path.display());
        det
    });

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut group = c.benchmark_group("detect");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("hyperscan-detector", |b| {
        b.iter(|| corpus.iter().map(|m| detector.scan(black_box(m)).len()).sum::<usize>())
    });
    if let Some(base) = &baseline {
        group.bench_function("hyperscan-baseline-rules", |b| {
            b.iter(|| corpus.iter().map(|m| base.scan(black_box(m)).len()).sum::<usize>())
        });
    }
    group.bench_function("regex-set", |b| {
        b.iter(|| corpus.iter().map(|m| set.matches(black_box(m)).iter().count()).sum::<usize>())
    });
    group.finish();

    let hs = mbps(&corpus, bytes, |m| detector.scan(m).len());
    let rs = mbps(&corpus, bytes, |m| set.matches(m).iter().count());
    println!("summary (one core): hyperscan detector {hs:.0} MB/s, regex RegexSet {rs:.0} MB/s, ratio {:.1}x", hs / rs);
    if let Some(base) = &baseline {
        let bs = mbps(&corpus, bytes, |m| base.scan(m).len());
        println!("baseline rules (one core): {bs:.0} MB/s; the built-in rules run at {:.0}% of that", 100.0 * hs / bs);
    }
    c.final_summary();
}
