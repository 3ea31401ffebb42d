//! Machine identity cost per new connection: attestation of a real process
//! (cold: the executable is hashed; cached) and rule matching for 10, 100
//! and 1,000 rules (match at the end, or no match); and the per-connection
//! path: full attestation, and an attestation kept for the same process
//! while the kernel reports no exec or exit. Target: cached attestation +
//! matching of 100 rules under 20 µs. Needs root (loads eBPF tracepoints).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gateway::identity::{
    record_for_live_pid, AttestConfig, Attestation, AttestationCache, Attested, Attestor, ExeInfo, IdentityConfig,
    IdentityResolver, MappingFile,
};

struct Sleeper(Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sleeper() -> Sleeper {
    let child = Command::new("/bin/sleep")
        .arg("3600")
        .env_clear()
        .env("GITHUB_REPOSITORY", "org/repo")
        .env("GITHUB_WORKFLOW", "build")
        .env("SECRET_TOKEN", "not-collected")
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning /bin/sleep: {e}"));
    // spawn() can return before the child has exec'd; a record taken then
    // would (rightly) be refused as "exec since connect".
    let comm = format!("/proc/{}/comm", child.id());
    for _ in 0..1000 {
        let argv = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
        if std::fs::read_to_string(&comm).is_ok_and(|c| c.trim_end() == "sleep") && !argv.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Sleeper(child)
}

/// `n` rules, each with an env and an exe-glob selector so every rule does
/// real work; the last one matches `/usr/bin/sleep` when `match_last`.
fn rules(n: usize, match_last: bool) -> String {
    let mut text = String::from("rules:\n");
    for i in 0..n {
        let exe = if match_last && i + 1 == n { "/usr/bin/sl*".to_owned() } else { format!("/opt/tools/t{i}/**") };
        text.push_str(&format!(
            "  - name: r{i}\n    match:\n      env: {{ GITHUB_REPOSITORY: \"org/*\" }}\n      exe: \"{exe}\"\n    identity: \"spiffe://ci.example/repo/{{env.GITHUB_REPOSITORY}}/wf/{{env.GITHUB_WORKFLOW}}\"\n    labels: {{ rule: r{i} }}\n"
        ));
    }
    text
}

fn resolver(n: usize, match_last: bool) -> IdentityResolver {
    let config = IdentityConfig::default();
    let file = MappingFile::parse_with(Path::new("bench.yaml"), &rules(n, match_last), &config)
        .unwrap_or_else(|e| panic!("bench rules rejected: {e:?}"));
    let r = IdentityResolver::new(&config);
    r.replace(file);
    r
}

fn synthetic() -> Attestation {
    let mut a = Attested {
        pid: 4242,
        uid: 1001,
        comm: "sleep".into(),
        exe: ExeInfo { path: "/usr/bin/sleep".into(), sha256: "ab".repeat(32), root_owned: true, deleted: false },
        cgroup: Some("/system.slice/runner.service".into()),
        ..Default::default()
    };
    a.env.insert("GITHUB_REPOSITORY".into(), "org/repo".into());
    a.env.insert("GITHUB_WORKFLOW".into(), "build".into());
    Attestation::Attested(Box::new(a))
}

fn bench_attest(c: &mut Criterion) {
    let child = sleeper();
    let record = record_for_live_pid(child.0.id()).unwrap_or_else(|e| panic!("record: {e}"));
    let config = AttestConfig::default();
    let mut g = c.benchmark_group("identity/attest");
    g.bench_function("cold (hash exe)", |b| {
        b.iter(|| {
            let attestor = Attestor::new(&config);
            black_box(attestor.attest(black_box(&record)))
        })
    });
    let attestor = Attestor::new(&config);
    assert!(matches!(attestor.attest(&record), Attestation::Attested(_)), "bench child must attest");
    g.bench_function("cached", |b| b.iter(|| black_box(attestor.attest(black_box(&record)))));
    g.finish();
}

fn bench_match(c: &mut Criterion) {
    let att = synthetic();
    let mut g = c.benchmark_group("identity/match");
    for n in [10usize, 100, 1000] {
        let hit = resolver(n, true);
        assert!(hit.resolve(&att).rule.is_some(), "last rule must match");
        g.bench_with_input(BenchmarkId::new("match-last", n), &n, |b, _| {
            b.iter(|| black_box(hit.resolve(black_box(&att))))
        });
        let miss = resolver(n, false);
        assert!(miss.resolve(&att).rule.is_none());
        g.bench_with_input(BenchmarkId::new("no-match", n), &n, |b, _| {
            b.iter(|| black_box(miss.resolve(black_box(&att))))
        });
    }
    g.finish();
}

fn bench_end_to_end(c: &mut Criterion) {
    let child = sleeper();
    let record = record_for_live_pid(child.0.id()).unwrap_or_else(|e| panic!("record: {e}"));
    let attestor = Attestor::new(&AttestConfig::default());
    let r = resolver(100, true);
    let att = attestor.attest(&record);
    let warm = r.resolve(&att);
    assert_eq!(warm.uri, "spiffe://ci.example/repo/org%2Frepo/wf/build", "{att:?}");
    // What the proxy does per connection: collect only what the rules use.
    let needs = r.needs();
    assert!(!needs.ancestors, "the bench rules use no ancestor selector");
    c.bench_function("identity/fresh attestation (exe hash cached) + 100 rules", |b| {
        b.iter(|| black_box(r.resolve(&attestor.attest_with(black_box(&record), needs))))
    });
    // A later connection of a process whose attestation is kept while the
    // kernel's exec/exit tracepoints vouch it is unchanged (what the proxy
    // does from the second connection of a process on).
    let watch = gateway::intercept::ExecWatch::load()
        .unwrap_or_else(|e| panic!("loading the exec/exit tracepoints (run as root): {e:#?}"));
    let cache = AttestationCache::new(std::sync::Arc::new(watch));
    assert!(matches!(cache.attest(&attestor, &record, needs), Attestation::Attested(_)));
    let later = record_for_live_pid(child.0.id()).unwrap_or_else(|e| panic!("record: {e}"));
    let kept = cache.lookup(&later, needs).expect("the second connection is a hit");
    assert_eq!(r.resolve(&Attestation::Attested(Box::new(kept))).uri, warm.uri);
    c.bench_function("identity/kept attestation (same process) + 100 rules", |b| {
        b.iter(|| {
            let kept = cache.lookup(black_box(&later), needs).expect("hit");
            black_box(r.resolve(&Attestation::Attested(Box::new(kept))))
        })
    });
    // Baselines in the same run: one /proc file read (the unit attestation
    // cost is made of), and everything `identity explain` collects.
    let stat_path = format!("/proc/{}/stat", child.0.id());
    c.bench_function("identity/baseline: read one /proc file", |b| {
        b.iter(|| black_box(std::fs::read(black_box(&stat_path)).map(|v| v.len())))
    });
    c.bench_function("identity/full attestation (explain) + 100 rules", |b| {
        b.iter(|| black_box(r.resolve(&attestor.attest(black_box(&record)))))
    });
}

criterion_group!(benches, bench_attest, bench_match, bench_end_to_end);
criterion_main!(benches);
