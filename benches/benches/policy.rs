//! Policy evaluation cost per request for 10, 100 and 1,000 rules with
//! mixed selectors (identity globs, hosts, ports, paths, methods, labels,
//! claims, RPC, headers), the deciding rule second to last; plus the
//! no-match case (every rule checked, then the default), a `tcp`
//! connection, and compiling a 1,000-rule file (the cost of a reload).
//! Also the per-request path normalisation the gate does before it asks
//! the policy: an already-canonical path, and one that must be rewritten.

use std::collections::BTreeMap;
use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gateway::policy::{normalize, HttpRequestFacts, Policy, RequestFacts};
use http::{HeaderMap, HeaderValue};

/// `n` rules cycling through the selector kinds; rule `n - 2` decides for
/// the request below, the last rule for nothing it is sent.
fn policy_text(n: usize) -> String {
    let mut s = String::from("version: 1\nrules:\n");
    for i in 0..n {
        let m = if i + 2 == n {
            "identity: { uri: \"spiffe://ci.example/repo/acme/*\", labels: { team: web } }\n      destination: { host: \"*.target.example.com\", port: 443 }\n      request: { path: \"/v1/items/*\", method: POST }".to_owned()
        } else {
            match i % 8 {
                0 => format!("identity: {{ uri: \"spiffe://ci.example/repo/team{i}/*\" }}"),
                1 => format!(
                    "destination: {{ host: [\"*.svc{i}.internal\", \"api{i}.example.com\"], port: [443, 8443] }}"
                ),
                2 => format!("request: {{ path: \"/v{i}/admin/**\", method: [POST, PUT] }}"),
                3 => {
                    format!("identity: {{ labels: {{ team: \"team{i}*\" }}, claims: {{ repository: \"org{i}/*\" }} }}")
                }
                4 => format!("destination: {{ protocol: grpc }}\n      request: {{ rpc: \"acme.svc{i}.v1.*/Get*\" }}"),
                5 => format!("request: {{ headers: {{ present: [x-debug-{i}] }} }}"),
                6 => format!(
                    "destination: {{ host: \"db{i}.internal\", port: {}, cidr: [\"10.{}.0.0/16\", \"fd00:{i:x}::/32\"] }}",
                    1000 + i,
                    i % 256
                ),
                _ => format!("identity: {{ unmapped: true }}\n      destination: {{ host: \"*.{i}.example.com\" }}"),
            }
        };
        s.push_str(&format!("  - name: r{i}\n    match:\n      {m}\n    action: deny\n"));
    }
    s.push_str("defaults:\n  action: allow\n  mask: { rules: all }\n");
    s
}

fn bench(c: &mut Criterion) {
    let labels = BTreeMap::from([("team".to_owned(), "web".to_owned())]);
    let claims = BTreeMap::from([("repository".to_owned(), "acme/web".to_owned())]);
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("user-agent", HeaderValue::from_static("curl/8.5.0"));
    let (items, other) = (normalize("/v1/items/42").unwrap(), normalize("/v9/other").unwrap());
    let facts = |host, path| RequestFacts {
        identity_uri: "spiffe://ci.example/repo/acme/web",
        labels: &labels,
        claims: &claims,
        unmapped: false,
        host,
        addr: std::net::IpAddr::from([10, 1, 2, 3]),
        port: 443,
        tls: true,
        request: Some(HttpRequestFacts { method: "POST", path, headers: &headers }),
    };
    let decided = facts("api.target.example.com", &items);
    let unmatched = facts("api.elsewhere.example.org", &other);
    let tcp = RequestFacts { request: None, port: 5432, ..facts("db.internal", &other) };

    let mut group = c.benchmark_group("policy/evaluate");
    for n in [10, 100, 1000] {
        let policy = Policy::parse(Path::new("bench.yaml"), &policy_text(n)).unwrap_or_else(|e| panic!("{e:?}"));
        let d = policy.evaluate(&decided);
        assert_eq!((d.index, policy.evaluate(&unmatched).index), (Some(n - 2), None));
        group.bench_with_input(BenchmarkId::new("decided_near_end", n), &n, |b, _| {
            b.iter(|| black_box(policy.evaluate(black_box(&decided))))
        });
        group.bench_with_input(BenchmarkId::new("no_match", n), &n, |b, _| {
            b.iter(|| black_box(policy.evaluate(black_box(&unmatched))))
        });
        group.bench_with_input(BenchmarkId::new("tcp", n), &n, |b, _| {
            b.iter(|| black_box(policy.evaluate(black_box(&tcp))))
        });
        if n == 1000 {
            eprintln!("policy/{n} rules: compiled form ~{} KiB", policy.memory_usage() / 1024);
        }
    }
    group.finish();

    let mut group = c.benchmark_group("policy/normalize");
    let canonical = "/api/v4/projects/1234/repository/files/src-main.rs/raw?ref=main";
    let rewritten = "/api/v4//projects/./1234/x/../repository/%66iles/src-main.rs/raw?ref=main";
    assert!(normalize(canonical).unwrap().is_unchanged());
    assert_eq!(normalize(rewritten).unwrap().as_str(), normalize(canonical).unwrap().as_str());
    group.bench_function("canonical", |b| b.iter(|| black_box(normalize(black_box(canonical)))));
    group.bench_function("rewritten", |b| b.iter(|| black_box(normalize(black_box(rewritten)))));
    group.finish();

    let text = policy_text(1000);
    let mut group = c.benchmark_group("policy/compile");
    group.sample_size(10);
    group.bench_function("1000", |b| b.iter(|| black_box(Policy::parse(Path::new("bench.yaml"), black_box(&text)))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
