//! End-to-end tests against real processes: attestation through /proc and
//! resolution through a real mapping file. They need root (to run a child
//! as another uid) and fail loudly without it rather than skip.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use gateway_common::ConnRecord;
use sha2::{Digest, Sha256};

use super::*;

/// Kills and reaps the child when the test ends, pass or fail.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

fn spawn(exe: &Path, env: &[(&str, &str)], uid: Option<u32>) -> Proc {
    let mut cmd = Command::new(exe);
    cmd.env_clear().stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
    if exe.ends_with("sleep") || exe.to_string_lossy().contains("sleeper") {
        cmd.arg("600");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(uid) = uid {
        assert!(nix::unistd::geteuid().is_root(), "this test must run as root to start a child as uid {uid}");
        cmd.uid(uid).gid(uid);
    }
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {}: {e}", exe.display()));
    wait_for_exec(child.id(), exe);
    Proc(child)
}

/// spawn() can return before the child has exec'd: a record taken then is
/// (rightly) refused as "exec since connect", so wait for the new image.
fn wait_for_exec(pid: u32, exe: &Path) {
    let want = std::fs::canonicalize(exe).unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
    let name: String = want.file_name().map(|n| n.to_string_lossy().chars().take(15).collect()).unwrap_or_default();
    // Generous: on a loaded machine a fork+exec can take seconds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let exe_now = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // execve switches comm and exe before it sets up argv and the
        // environment; a real connect() only comes once the program runs.
        let argv_ready = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty());
        if exe_now.as_deref() == Some(want.as_path()) && comm.trim_end() == name && argv_ready {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!("child {pid} did not exec {} within 60 s", want.display());
}

/// Waits until `pid` has died but is not reaped yet (state `Z`).
fn wait_for_zombie(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesised comm, which may hold spaces.
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        if state == Some('Z') {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "child {pid} did not die after SIGKILL: {stat}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn sha256_of(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    hex::encode(Sha256::digest(&bytes))
}

fn require_file(p: &str) -> PathBuf {
    let path = std::fs::canonicalize(p).unwrap_or_else(|e| panic!("test precondition: {p} must exist: {e}"));
    assert!(path.is_file(), "test precondition: {p} must be a file");
    path
}

fn attestor() -> Attestor {
    Attestor::new(&AttestConfig { env_allowlist: vec!["EXTRA_TAG".into()], ..AttestConfig::default() })
}

fn config() -> IdentityConfig {
    IdentityConfig { trust_domain: "ci.test".into(), env_allowlist: vec!["EXTRA_TAG".into()], ..Default::default() }
}

fn record(pid: u32) -> ConnRecord {
    record_for_live_pid(pid).unwrap_or_else(|e| panic!("record for {pid}: {e}"))
}

fn attested(att: &Attestation) -> &Attested {
    match att {
        Attestation::Attested(a) => a,
        Attestation::Unattested { reason } => panic!("expected attested, got unattested: {reason}"),
    }
}

fn unattested_reason(att: &Attestation) -> &str {
    match att {
        Attestation::Unattested { reason } => reason,
        Attestation::Attested(a) => panic!("expected unattested, got {a:?}"),
    }
}

fn resolver_with(text: &str) -> (IdentityResolver, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mappings.yaml");
    std::fs::write(&path, text).expect("write mappings");
    let r = IdentityResolver::new(&config());
    if let Err(errors) = r.reload(&path) {
        panic!("mapping file rejected: {errors:#?}");
    }
    (r, dir)
}

fn mappings(sleep_sha: &str) -> String {
    format!(
        r#"
require_trusted: true
rules:
  - name: sleep-repo-ab
    match:
      exe_sha256: {sleep_sha}
      env:
        GITHUB_REPOSITORY: "a/*"
    identity: "spiffe://{{trust_domain}}/repo/{{env.GITHUB_REPOSITORY}}/uid/{{uid}}"
    labels:
      repo: "{{env.GITHUB_REPOSITORY}}"
  - name: sleep-repo-cd
    match:
      exe_sha256: [{sleep_sha}]
      env:
        GITHUB_REPOSITORY: "c/*"
    identity: "spiffe://ci.test/other/{{env.GITHUB_REPOSITORY}}"
  - name: nobody
    match:
      user: nobody
    identity: "spiffe://ci.test/nobody/{{user}}"
  - name: cat-tool
    match:
      exe: /usr/bin/cat
    identity: "spiffe://ci.test/tool/{{comm}}"
  - name: tmp-binaries
    match:
      exe: "/tmp/**/idtest-*"
      comm: "idtest-*"
    identity: "spiffe://ci.test/should-never-match"
"#
    )
}

#[test]
fn real_processes_get_the_identities_their_rules_grant() {
    let sleep = require_file("/bin/sleep");
    let cat = require_file("/bin/cat");
    let sleep_sha = sha256_of(&sleep);
    let (resolver, _dir) = resolver_with(&mappings(&sleep_sha));
    let attestor = attestor();

    let ab = spawn(&sleep, &[("GITHUB_REPOSITORY", "a/b"), ("AWS_SECRET_ACCESS_KEY", "hunter2")], None);
    let cd = spawn(&sleep, &[("GITHUB_REPOSITORY", "c/d")], None);
    let nobody = spawn(&sleep, &[], Some(65534));
    let catp = spawn(&cat, &[], None);

    let att = attestor.attest(&record(ab.pid()));
    let a = attested(&att);
    assert_eq!(a.exe.path, sleep.to_string_lossy());
    assert_eq!(a.exe.sha256, sleep_sha);
    assert!(a.exe.root_owned, "{} should be root-owned", a.exe.path);
    assert_eq!(a.cmdline, vec![sleep.to_string_lossy().into_owned(), "600".into()]);
    assert_eq!(a.env.get("GITHUB_REPOSITORY").map(String::as_str), Some("a/b"));
    assert!(!a.env.contains_key("AWS_SECRET_ACCESS_KEY"), "secrets must never be kept");
    assert_eq!(a.ancestors.first().map(|p| p.pid), Some(std::process::id()));
    assert!(a.cgroup.is_some());
    let id = resolver.resolve(&att);
    assert_eq!(id.uri, "spiffe://ci.test/repo/a%2Fb/uid/0");
    assert_eq!(id.rule.as_deref(), Some("sleep-repo-ab"));
    assert_eq!(id.labels.get("repo").map(String::as_str), Some("a/b"));
    assert!(id.attested);

    let id = resolver.resolve(&attestor.attest(&record(cd.pid())));
    assert_eq!((id.uri.as_str(), id.rule.as_deref()), ("spiffe://ci.test/other/c%2Fd", Some("sleep-repo-cd")));

    let att = attestor.attest(&record(nobody.pid()));
    assert_eq!(attested(&att).uid, 65534);
    let id = resolver.resolve(&att);
    assert_eq!((id.uri.as_str(), id.rule.as_deref()), ("spiffe://ci.test/nobody/nobody", Some("nobody")));

    let id = resolver.resolve(&attestor.attest(&record(catp.pid())));
    assert_eq!((id.uri.as_str(), id.rule.as_deref()), ("spiffe://ci.test/tool/cat", Some("cat-tool")));
}

#[test]
fn unmatched_and_untrusted_processes_are_unmapped() {
    let sleep = require_file("/bin/sleep");
    let (resolver, _dir) = resolver_with(&mappings(&sha256_of(&sleep)));
    let tmp = tempfile::tempdir().expect("tempdir");
    let copy = tmp.path().join("idtest-sleeper");
    std::fs::copy(&sleep, &copy).expect("copy sleep");
    let plain = spawn(&sleep, &[("GITHUB_REPOSITORY", "zzz/none")], None);
    let job_binary = spawn(&copy, &[], None);

    let id = resolver.resolve(&attestor().attest(&record(plain.pid())));
    assert_eq!(
        id,
        Identity { uri: "spiffe://ci.test/unmapped".into(), labels: Default::default(), rule: None, attested: true }
    );

    // Path and comm match the tmp rule, but /tmp is writable by anyone, so
    // nothing trustworthy matched and the rule (require_trusted) refuses.
    let att = attestor().attest(&record(job_binary.pid()));
    assert!(!attested(&att).exe.root_owned);
    let ex = resolver.explain(&att);
    assert_eq!(ex.identity.uri, "spiffe://ci.test/unmapped");
    let tmp_rule = ex.rules.iter().find(|r| r.rule == "tmp-binaries").expect("rule explained");
    assert!(matches!(tmp_rule.outcome, RuleOutcome::Untrusted { .. }), "{tmp_rule:?}");
    let first = &ex.rules[0];
    assert!(
        matches!(&first.outcome, RuleOutcome::SelectorFailed { selector, reason } if selector == "env.GITHUB_REPOSITORY" && reason.contains("not set")),
        "{first:?}"
    );
}

#[test]
fn env_only_evidence_needs_require_trusted_false() {
    let sleep = require_file("/bin/sleep");
    let text = r#"
rules:
  - name: env-only
    require_trusted: false
    match:
      env: { EXTRA_TAG: "yes" }
    identity: spiffe://ci.test/tagged
"#;
    let (resolver, _dir) = resolver_with(text);
    let p = spawn(&sleep, &[("EXTRA_TAG", "yes")], None);
    let att = attestor().attest(&record(p.pid()));
    assert_eq!(resolver.resolve(&att).uri, "spiffe://ci.test/tagged");

    // The same rule with the secure default is refused at load time.
    let strict = text.replace("    require_trusted: false\n", "");
    let errors = MappingFile::parse_with(Path::new("m.yaml"), &strict, &config()).expect_err("must be rejected");
    assert!(errors[0].message.contains("require_trusted"), "{errors:?}");
    assert_eq!((errors[0].line, errors[0].column), (4, 5));
}

#[test]
fn env_cannot_inject_path_segments() {
    let sleep = require_file("/bin/sleep");
    let text =
        "rules:\n  - match: { exe: /usr/bin/sleep }\n    identity: spiffe://ci.test/repo/{env.GITHUB_REPOSITORY}/ci\n";
    let (resolver, _dir) = resolver_with(text);
    let evil = spawn(&sleep, &[("GITHUB_REPOSITORY", "x/../../admin\u{1}/")], None);
    let id = resolver.resolve(&attestor().attest(&record(evil.pid())));
    assert_eq!(id.uri, "spiffe://ci.test/unmapped", "control char must be refused");
    let evil = spawn(&sleep, &[("GITHUB_REPOSITORY", "x/../../admin")], None);
    let att = attestor().attest(&record(evil.pid()));
    let id = resolver.resolve(&att);
    assert_eq!(id.uri, "spiffe://ci.test/repo/x%2F..%2F..%2Fadmin/ci", "{:?}", resolver.explain(&att));
    let dots = spawn(&sleep, &[("GITHUB_REPOSITORY", "..")], None);
    let att = attestor().attest(&record(dots.pid()));
    assert_eq!(resolver.resolve(&att).uri, "spiffe://ci.test/unmapped");
    assert!(
        matches!(&resolver.explain(&att).rules[0].outcome, RuleOutcome::TemplateFailed { reason } if reason.contains("unsafe"))
    );
}

#[test]
fn pid_reuse_is_detected() {
    let sleep = require_file("/bin/sleep");
    let p = spawn(&sleep, &[], None);
    let mut rec = record(p.pid());
    // Pretend the connect happened a second before this process started.
    let stat = procfs::ProcDir::open(p.pid()).and_then(|d| d.stat(&mut Vec::new())).expect("stat");
    let start_boot_ns = stat.start_ticks * (1_000_000_000 / procfs::clock_ticks_per_sec());
    rec.ts_ns = start_boot_ns.saturating_sub(procfs::suspend_offset_ns()).saturating_sub(1_000_000_000);
    let att = attestor().attest(&rec);
    assert!(unattested_reason(&att).contains("reused"), "{att:?}");
    let id = IdentityResolver::new(&config()).resolve(&att);
    assert_eq!((id.uri.as_str(), id.attested), ("spiffe://ci.test/unattested", false));
    // The genuine connect time passes.
    attested(&attestor().attest(&record(p.pid())));
}

#[test]
fn exited_processes_are_unattested() {
    let sleep = require_file("/bin/sleep");
    let mut p = spawn(&sleep, &[], None);
    let rec = record(p.pid());
    p.0.kill().expect("kill");
    // Not yet reaped: a zombie still has /proc entries but no exe. SIGKILL
    // takes effect when the child is next scheduled: wait for the zombie.
    wait_for_zombie(p.pid());
    assert!(unattested_reason(&attestor().attest(&rec)).contains("exited"));
    p.0.wait().expect("reap");
    assert!(unattested_reason(&attestor().attest(&rec)).contains("exited"));
}

#[test]
fn credential_and_comm_mismatch_are_unattested() {
    let sleep = require_file("/bin/sleep");
    let p = spawn(&sleep, &[], None);
    let mut rec = record(p.pid());
    rec.uid = 4242;
    assert!(unattested_reason(&attestor().attest(&rec)).contains("uid"));
    let mut rec = record(p.pid());
    rec.comm = [0; gateway_common::COMM_LEN];
    rec.comm[..4].copy_from_slice(b"bash");
    assert!(unattested_reason(&attestor().attest(&rec)).contains("exec"));
}

#[test]
fn broken_reload_keeps_old_mappings_and_locates_the_error() {
    let sleep = require_file("/bin/sleep");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.yaml");
    std::fs::write(&path, "rules:\n  - match: { uid: 0 }\n    identity: spiffe://ci.test/v1\n").expect("write");
    let r = IdentityResolver::from_config(&IdentityConfig { mappings: Some(path.clone()), ..config() })
        .unwrap_or_else(|e| panic!("{e:?}"));
    let p = spawn(&sleep, &[], None);
    let att = attestor().attest(&record(p.pid()));
    assert_eq!(r.resolve(&att).uri, "spiffe://ci.test/v1");

    let mut f = std::fs::File::create(&path).expect("rewrite");
    f.write_all(b"rules:\n  - match: { uid: 0 }\n    identity: spiffe://ci.test/v2\n  - match:\n      exe: \"/usr/[bin\"\n    identity: spiffe://ci.test/v3\n")
        .expect("write");
    drop(f);
    let errors = r.reload(&path).expect_err("broken file must be refused");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!((errors[0].line, errors[0].column, errors[0].rule), (5, 12, Some(1)), "{}", errors[0]);
    assert!(errors[0].to_string().starts_with(&format!("{}:5:12: bad glob", path.display())), "{}", errors[0]);
    assert_eq!(r.resolve(&att).uri, "spiffe://ci.test/v1", "old mappings stay in force");

    std::fs::write(&path, "rules: [ {match: {uid: 0}, identity: 'spiffe://ci.test/v2'} ]\nbogus: 1\n").expect("write");
    let errors = r.reload(&path).expect_err("unknown key");
    assert_eq!(errors[0].line, 2, "{errors:?}");
    std::fs::write(&path, "rules:\n  - match: { uid: 0 }\n    identity: spiffe://ci.test/v2\n").expect("write");
    r.reload(&path).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(r.resolve(&att).uri, "spiffe://ci.test/v2");
}

#[test]
fn cli_check_exit_codes() {
    use crate::cli::identity::{check_with, explain};
    let cli_check = |path: &Path| check_with(&IdentityConfig::default(), path);
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "rules:\n  - match: { uid: 0 }\n    identity: spiffe://ci.test/root\n").expect("write");
    assert_eq!(cli_check(&good), std::process::ExitCode::SUCCESS);
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "rules:\n  - match: { uid: 0 }\n    identity: nope\n").expect("write");
    assert_eq!(cli_check(&bad), std::process::ExitCode::from(2));
    let p = spawn(&require_file("/bin/sleep"), &[], None);
    let cfg = IdentityConfig { mappings: Some(good), ..config() };
    assert_eq!(explain(&cfg, p.pid(), true), std::process::ExitCode::SUCCESS);
}

#[test]
fn trimmed_attestation_keeps_every_guard_and_skips_only_what_rules_cannot_use() {
    let sleep = require_file("/bin/sleep");
    let p = spawn(&sleep, &[("GITHUB_REPOSITORY", "a/b")], None);
    let needs = AttestNeeds { ancestors: false, cmdline: false };
    let a = attestor();
    let full = attested(&a.attest(&record(p.pid()))).clone();
    let trimmed = attested(&a.attest_with(&record(p.pid()), needs)).clone();
    assert!(!full.ancestors.is_empty() && !full.cmdline.is_empty(), "{full:?}");
    assert!(trimmed.ancestors.is_empty() && trimmed.cmdline.is_empty() && trimmed.cwd.is_none());
    assert_eq!((&trimmed.exe, &trimmed.env, trimmed.uid), (&full.exe, &full.env, full.uid));
    // The path comes from the cgroup id cache the second time; both agree with /proc.
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid())).expect("cgroup");
    let want = cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned);
    assert!(record(p.pid()).cgroup_id != 0, "record_for_live_pid resolves the cgroup id");
    assert_eq!((&trimmed.cgroup, &full.cgroup), (&want, &want));

    let mut rec = record(p.pid());
    rec.uid = 4242;
    assert!(unattested_reason(&a.attest_with(&rec, needs)).contains("uid"));
    let mut rec = record(p.pid());
    rec.comm = [0; gateway_common::COMM_LEN];
    rec.comm[..4].copy_from_slice(b"bash");
    assert!(unattested_reason(&a.attest_with(&rec, needs)).contains("exec"));

    let (with_parent, _d) =
        resolver_with("rules:\n  - match: { parent_exe: \"/**\", uid: 0 }\n    identity: spiffe://ci.test/p\n");
    assert!(with_parent.needs().ancestors);
    let (without, _d2) = resolver_with("rules:\n  - match: { uid: 0 }\n    identity: spiffe://ci.test/u\n");
    assert_eq!(without.needs(), needs);
}

#[test]
fn container_name_and_image_select_but_never_count_as_trusted_evidence() {
    let id = "c".repeat(64);
    let text = format!(
        r#"
rules:
  - name: gitlab-build
    match:
      container: "{id}"
      container_name: "runner-*-build"
      container_image: ["registry.example/ci/*", "alpine:*"]
    identity: spiffe://ci.test/build/{{container.name}}
  - name: image-only
    require_trusted: true
    match:
      uid: 0
      container_image: "alpine:*"
    identity: spiffe://ci.test/alpine
"#
    );
    let (resolver, _dir) = resolver_with(&text);
    let mut container = parse_container(&format!("/ci/jobs/{id}")).expect("a container");
    let mut a = Attested { uid: 1000, cgroup: Some(format!("/ci/jobs/{id}")), ..Default::default() };
    a.container = Some(container.clone());
    // Not confirmed by the runtime (no name, no image): the rule cannot match.
    let att = Attestation::Attested(Box::new(a.clone()));
    assert_eq!(resolver.resolve(&att).uri, "spiffe://ci.test/unmapped");
    let why = resolver.explain(&att);
    assert!(
        matches!(&why.rules[0].outcome, RuleOutcome::SelectorFailed { selector, .. } if selector == "container_name"),
        "{why:?}"
    );

    container.name = Some("runner-abc-build".into());
    container.image = Some("alpine:3.20".into());
    a.container = Some(container);
    let identity = resolver.resolve(&Attestation::Attested(Box::new(a.clone())));
    assert_eq!(identity.uri, "spiffe://ci.test/build/runner-abc-build");

    // Name and image alone are no trusted evidence.
    let only = "rules:\n  - match: { container_name: x, container_image: y }\n    identity: spiffe://ci.test/x\n";
    let errors = MappingFile::parse_with(Path::new("m.yaml"), only, &config()).expect_err("must be rejected");
    assert!(errors[0].message.contains("require_trusted"), "{errors:?}");
}
