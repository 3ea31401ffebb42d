//! Response masking throughput, per core: a 1 MiB JSON response (with a few
//! keys in it) fed in 16 KiB chunks, as the proxy would stream it:
//!
//! * `copy`: copying each chunk into a fresh buffer (the floor);
//! * `detector-scan`: one `Detector::scan` per chunk (the pass masking adds);
//! * `mask-identity`: `BodyMasker` with all detector rules;
//! * `mask-identity-json-patterns`: the same plus two JSON fields and a regex;
//! * `mask-gzip`: a gzip response decoded, masked and re-encoded;
//! * `mask-identity-1k`: all rules, 1 KiB chunks (per-chunk overhead).
//!
//! And what recording one exchange costs (`Masker::mask_bytes` and
//! `mask_headers` with all rules, as the recorder and approvals use them):
//!
//! * `record-body-64k`: a 64 KiB JSON body (the default `max_body_bytes`);
//! * `record-url`: a request target with a query string;
//! * `record-headers`: twelve typical request headers.
//!
//! Run with `cargo bench -p gateway-benches --bench mask`. A MB/s summary is
//! printed at the end.

use std::{
    io::Write,
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{black_box, Criterion, Throughput};
use gateway::{
    detect::Detector,
    mask::{MaskPattern, MaskRules, MaskSpec, Masker},
};

const BODY: usize = 1 << 20;
const CHUNK: usize = 16 << 10;

/// A small deterministic generator, so runs are comparable.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn token(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len).map(|_| alphabet[self.next() as usize % alphabet.len()] as char).collect()
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const HEX: &[u8] = b"0123456789abcdef";

/// A JSON array of build records; one record in 200 carries a key.
fn body() -> Vec<u8> {
    let mut rng = Lcg(0x6d61736b);
    let mut out = b"[".to_vec();
    let mut i = 0;
    while out.len() < BODY {
        if i > 0 {
            out.push(b',');
        }
        let secret =
            if i % 200 == 100 { format!(",\"token\":\"sk_live_{}\"", rng.token(ALNUM, 32)) } else { String::new() };
        out.extend_from_slice(
            format!(
                "{{\"id\":{i},\"sha\":\"{}\",\"status\":\"success\",\"url\":\"https://ci.example.org/builds/{}\",\"duration\":{},\"message\":\"Merge branch feature-{} into main\"{secret}}}\n",
                rng.token(HEX, 40),
                rng.token(ALNUM, 12),
                rng.next() % 5000,
                rng.next() % 900,
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.push(b']');
    out
}

fn stream(masker: &Arc<Masker>, encoding: Option<&str>, data: &[u8], chunk: usize) -> usize {
    let mut body = masker.body(encoding).unwrap_or_else(|e| panic!("body masker: {e}"));
    let mut n = 0;
    for c in data.chunks(chunk) {
        n += body.push(c).unwrap_or_else(|e| panic!("push: {e}")).len();
    }
    n + body.finish().unwrap_or_else(|e| panic!("finish: {e}")).len()
}

/// Wall-clock MB/s (10^6 bytes of plaintext) of `f`, best of a few rounds.
fn mbps(bytes: usize, mut f: impl FnMut() -> usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        black_box(f());
        best = best.min(start.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e6
}

/// Body bytes a recording keeps by default (`record.max_body_bytes`).
const RECORD_BODY: usize = 64 << 10;

/// Typical request headers of an API client.
fn request_headers() -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (name, value) in [
        ("host", "gitlab.example.org"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("content-type", "application/json; charset=utf-8"),
        ("content-length", "1834"),
        ("x-request-id", "3f2c9a4e-5b1d-4c8e-9f0a-7e6d5c4b3a21"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjaSJ9.c2lnbmF0dXJlLW5vdC1yZWFs"),
        ("cookie", "session=3a1f9c7e2b; theme=dark"),
        ("x-gitlab-ci-job-id", "918273645"),
        ("if-none-match", "W/\"5e1b2c3d4e5f\""),
    ] {
        h.append(http::HeaderName::from_static(name), http::HeaderValue::from_static(value));
    }
    h
}

/// Wall-clock microseconds per call of `f`, best of a few rounds.
fn micros(mut f: impl FnMut() -> usize) -> f64 {
    const CALLS: u32 = 200;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..CALLS {
            black_box(f());
        }
        best = best.min(start.elapsed().as_secs_f64() / f64::from(CALLS));
    }
    best * 1e6
}

fn main() {
    let detector = Arc::new(Detector::builtin().unwrap_or_else(|e| panic!("built-in rules: {e}")));
    let all =
        Arc::new(Masker::new(Arc::clone(&detector), &MaskSpec::default()).unwrap_or_else(|e| panic!("masker: {e}")));
    let rich = Arc::new(
        Masker::new(
            Arc::clone(&detector),
            &MaskSpec {
                rules: MaskRules::All,
                patterns: vec![MaskPattern { name: "internal".into(), regex: r"int_[0-9a-f]{32}".into() }],
                json_fields: vec!["token".into(), "password".into()],
            },
        )
        .unwrap_or_else(|e| panic!("masker: {e}")),
    );
    let data = body();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap_or_else(|e| panic!("gzip: {e}"));
        e.finish().unwrap_or_else(|e| panic!("gzip: {e}"))
    };
    let (masked, found) = all.mask_bytes(&data);
    println!(
        "body: {:.2} MiB JSON ({} KiB gzip), {} chunks of {} KiB, {} replacements, max hold-back {} bytes",
        data.len() as f64 / (1 << 20) as f64,
        gz.len() >> 10,
        data.len().div_ceil(CHUNK),
        CHUNK >> 10,
        found.len(),
        all.max_hold_back()
    );
    assert!(masked.len() < data.len(), "nothing was masked");

    let copy = |chunk: usize| data.chunks(chunk).map(|c| black_box(c.to_vec()).len()).sum::<usize>();
    let scan = || data.chunks(CHUNK).map(|c| detector.scan(black_box(c)).len()).sum::<usize>();

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut group = c.benchmark_group("mask");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("copy", |b| b.iter(|| copy(CHUNK)));
    group.bench_function("detector-scan", |b| b.iter(scan));
    group.bench_function("mask-identity", |b| b.iter(|| stream(&all, None, &data, CHUNK)));
    group.bench_function("mask-identity-json-patterns", |b| b.iter(|| stream(&rich, None, &data, CHUNK)));
    group.bench_function("mask-gzip", |b| b.iter(|| stream(&all, Some("gzip"), &gz, CHUNK)));
    group.bench_function("mask-identity-1k", |b| b.iter(|| stream(&all, None, &data, 1024)));
    group.finish();

    // One recorded exchange: its body, URL and headers.
    let record_body = &data[..RECORD_BODY];
    let url = "/api/v4/projects/1234/pipelines?ref=main&per_page=50&page=2&scope=finished&order_by=updated_at";
    let headers = request_headers();
    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Bytes(record_body.len() as u64));
    group.bench_function("record-body-64k", |b| b.iter(|| all.mask_bytes(black_box(record_body)).0.len()));
    group.throughput(Throughput::Elements(1));
    group.bench_function("record-url", |b| b.iter(|| all.mask_bytes(black_box(url.as_bytes())).0.len()));
    group.bench_function("record-headers", |b| {
        b.iter(|| {
            let mut h = headers.clone();
            all.mask_headers(black_box(&mut h)).len()
        })
    });
    group.finish();

    let n = data.len();
    println!(
        "summary (one core, MB/s of plaintext): copy {:.0}, detector scan {:.0}, mask {:.0}, \
         mask + json + pattern {:.0}, mask gzip {:.0}, mask 1 KiB chunks {:.0}",
        mbps(n, || copy(CHUNK)),
        mbps(n, scan),
        mbps(n, || stream(&all, None, &data, CHUNK)),
        mbps(n, || stream(&rich, None, &data, CHUNK)),
        mbps(n, || stream(&all, Some("gzip"), &gz, CHUNK)),
        mbps(n, || stream(&all, None, &data, 1024)),
    );
    println!(
        "recording (one core): 64 KiB body {:.1} µs, URL {:.2} µs, 12 headers {:.2} µs",
        micros(|| all.mask_bytes(record_body).0.len()),
        micros(|| all.mask_bytes(url.as_bytes()).0.len()),
        micros(|| {
            let mut h = headers.clone();
            all.mask_headers(&mut h).len()
        }),
    );
    c.final_summary();
}
