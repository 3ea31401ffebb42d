//! The fleet's central store, end to end: a real PostgreSQL server (Debian's
//! PostgreSQL 15, TLS only, SCRAM only) and real gateways (each its own
//! state directory, cgroup, ports and host id) whose jobs make clean and
//! keyed requests through TLS interception to a real HTTPS upstream.
//!
//! * Three gateways: `gateway store migrate` creates the schema; every
//!   session, record and finding each host recorded reaches the central
//!   store (one finding per key, with sightings from every host; an
//!   approval with its decision; a reviewer's status change), the listings
//!   read it (`sessions list --store`, `findings list --store`), the
//!   chains verify there (`sessions verify --store`), an edited and a
//!   deleted central record are each named by the verification, the
//!   central dump holds none of the keys, and a gateway started against a
//!   newer schema refuses to ship and says so.
//! * Outages: PostgreSQL stopped for a while during traffic (the backlog
//!   grows, the alarm fires, nothing is refused) and started again: the
//!   backlog drains, nothing lost, nothing twice; then a gateway SIGKILLed
//!   while it ships a backlog: after its restart, the same.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::Output,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use gateway_tests::{
    gateway_bin, keys,
    pg::{ok, pki, PgServer},
    unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "api.test.internal";
const UPSTREAM_IP: &str = "127.0.0.41";
const CENTRAL_IP: &str = "127.0.0.42";
/// The console user of the fleet console test (an approver, signed in at
/// the stand-in identity provider of deploy/compose/idp.py).
const CONSOLE_APPROVER: &str = "carol@example.com";

const POLICY: &str = r#"version: 1
rules:
  - name: held
    match: { request: { path: "/approve/**" } }
    action: require_approval
    approval: { group: release, min_approvals: 1, timeout: 120s }
defaults:
  action: allow
  record: metadata
  static_keys: flag
"#;

/// The central store, an upstream, and the files the gateways share.
struct Central {
    server: PgServer,
    _upstream: Upstream,
    upstream_port: u16,
    upstream_ca: PathBuf,
    ca_file: PathBuf,
    password_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Central {
    fn start() -> Central {
        gateway_tests::require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = pki(&[CENTRAL_IP]);
        let server = PgServer::start(&[CENTRAL_IP], unique_port(), &pki);
        let password = keys::random(24);
        server.admin_sql(&format!("CREATE ROLE gateway LOGIN PASSWORD '{password}'"));
        server.admin_sql("CREATE DATABASE fleet OWNER gateway");
        let ca_file = dir.path().join("central-ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).expect("write ca");
        let password_file = dir.path().join("fleet-password");
        std::fs::write(&password_file, &password).expect("write password");
        std::fs::set_permissions(&password_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        let test_pki = TestPki::new(dir.path(), &[HOST]);
        let upstream_port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{upstream_port}").parse().expect("addr"), &test_pki);
        Central {
            server,
            _upstream: upstream,
            upstream_port,
            upstream_ca: test_pki.ca_path.clone(),
            ca_file,
            password_file,
            dir,
        }
    }

    /// The connection string (no password: it comes from the credential file).
    fn url(&self) -> String {
        format!("postgres://gateway@{CENTRAL_IP}:{}/fleet", self.server.port)
    }

    fn fleet_yaml(&self, host_id: &str, extra: &str) -> String {
        format!(
            "fleet:\n  store: \"host={CENTRAL_IP} port={port} dbname=fleet user=gateway\"\n  password: {{file: {pw}}}\n\
             \x20 tls: {{ca_file: {ca}}}\n  host_id: {host_id}\n  ship_interval: 200ms\n{extra}",
            port = self.server.port,
            pw = self.password_file.display(),
            ca = self.ca_file.display(),
        )
    }

    /// `gateway store migrate` with a configuration of its own (no gateway runs).
    fn migrate(&self) -> String {
        let config = self.dir.path().join("migrate.yaml");
        let state = self.dir.path().join("migrate-state");
        std::fs::write(&config, format!("state_dir: {}\n{}", state.display(), self.fleet_yaml("migrator", "")))
            .expect("write config");
        let out = std::process::Command::new(gateway_bin())
            .arg("--config")
            .arg(&config)
            .args(["store", "migrate", "--store", &self.url()])
            .output()
            .expect("run gateway store migrate");
        ok("gateway store migrate", &out)
    }

    fn gateway(&self, name: &str, host_id: &str, fleet_extra: &str) -> TestGateway {
        self.gateway_with(name, host_id, fleet_extra, "")
    }

    /// [`Central::gateway`] with more `record:` settings.
    fn gateway_with(&self, name: &str, host_id: &str, fleet_extra: &str, record_extra: &str) -> TestGateway {
        self.gateway_full(name, host_id, fleet_extra, record_extra, "")
    }

    /// [`Central::gateway_with`] with more top-level configuration (`more`).
    fn gateway_full(
        &self,
        name: &str,
        host_id: &str,
        fleet_extra: &str,
        record_extra: &str,
        more: &str,
    ) -> TestGateway {
        let mut opts =
            GatewayOptions::new(name, &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{}]}}", self.upstream_port)]);
        opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
        opts.policy_yaml = Some(POLICY.into());
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{ca}]\nrecord:\n  flush_interval: 50ms\n{record_extra}\
             findings:\n  default_action: flag\napprovals:\n  groups: {{ release: [alice, bob, root, {CONSOLE_APPROVER}] }}\n\
             {fleet}{more}",
            ca = self.upstream_ca.display(),
            fleet = self.fleet_yaml(host_id, fleet_extra),
        );
        let gw = TestGateway::start(opts);
        let out = gw.cli(&["ca", "export", "--out", gw.dir.path().join("gateway-ca.pem").to_str().expect("utf8")]);
        ok("ca export", &out);
        gw
    }

    /// One SQL query's rows (`psql -At`), as the superuser.
    fn sql(&self, query: &str) -> String {
        self.server.admin_sql_in("fleet", query)
    }

    fn count(&self, query: &str) -> u64 {
        self.sql(query).trim().parse().unwrap_or_else(|e| panic!("{query}: not a count ({e})"))
    }

    /// `gateway sessions verify --store` through `gw`'s configuration.
    fn verify(&self, gw: &TestGateway) -> (bool, String) {
        let out = gw.cli(&["sessions", "verify", "--store", &self.url()]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}

/// curl in `gw`'s cgroup with an optional bearer key: the HTTP status.
fn curl(central: &Central, gw: &TestGateway, key: Option<&str>) -> u16 {
    let out: Output = curl_command(central, gw, key, "/v1/models").output().expect("curl");
    gateway_tests::curl_reply(&out.stdout).0
}

/// The curl command of [`curl`], for `path`.
fn curl_command(central: &Central, gw: &TestGateway, key: Option<&str>, path: &str) -> std::process::Command {
    let mut cmd = gw.command_in_cgroup("curl");
    cmd.args(["-sS", "--max-time", "20", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", central.upstream_port)])
        .arg("--cacert")
        .arg(gw.dir.path().join("gateway-ca.pem"))
        .args(gateway_tests::CURL_STATUS);
    if let Some(key) = key {
        cmd.args(["-H", &format!("Authorization: Bearer {key}")]);
    }
    cmd.arg(format!("https://{HOST}:{}{path}", central.upstream_port));
    cmd
}

fn cli_json(gw: &TestGateway, args: &[&str]) -> Value {
    let out = gw.cli(args);
    let text = ok(&format!("gateway {args:?}"), &out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("gateway {args:?}: not JSON ({e}): {text}"))
}

/// A host's sessions as (id, records, ended), locally and centrally.
type Chains = BTreeSet<(String, u64, bool)>;

fn local_chains(gw: &TestGateway) -> Chains {
    let listed = cli_json(gw, &["sessions", "list", "--limit", "100000", "--json"]);
    listed
        .as_array()
        .expect("array")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().expect("id").to_owned(),
                s["records"].as_u64().expect("records"),
                s["ended"].as_str().is_some() || s["ended"].is_number(),
            )
        })
        .collect()
}

fn central_chains(central: &Central, host_id: &str) -> Chains {
    central
        .sql(&format!(
            "SELECT s.id, (SELECT count(*) FROM records r WHERE r.host_id = s.host_id AND r.session = s.id), s.ended IS NOT NULL
             FROM sessions s WHERE s.host_id = '{host_id}'"
        ))
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut f = l.split('|');
            let id = f.next().expect("id").to_owned();
            let n = f.next().and_then(|n| n.parse().ok()).expect("count");
            (id, n, f.next() == Some("t"))
        })
        .collect()
}

/// Waits until every session and record of `gw` is in the central store,
/// as many as locally (so: none lost, none twice), and its backlog is 0.
fn wait_shipped(central: &Central, gw: &TestGateway, host_id: &str) -> Chains {
    wait_for(&format!("{host_id}: the central store holds what the host recorded"), || {
        let local = local_chains(gw);
        let remote = central_chains(central, host_id);
        let backlog = &gw.status()["fleet"]["backlog"]["total"];
        if local == remote && !local.is_empty() && backlog == 0 {
            Ok(local)
        } else {
            Err(format!(
                "{} local sessions, {} central; only local: {:?}; only central: {:?}; backlog {backlog}",
                local.len(),
                remote.len(),
                local.difference(&remote).collect::<Vec<_>>(),
                remote.difference(&local).collect::<Vec<_>>(),
            ))
        }
    })
}

/// Gives `gw` the fingerprint key of `from` (a fleet shares one, so that a
/// key seen on two hosts has one fingerprint) and restarts it.
fn share_fingerprint_key(from: &TestGateway, gw: &mut TestGateway) {
    gw.stop(nix::sys::signal::Signal::SIGTERM);
    let name = "detect-fingerprint.key";
    std::fs::copy(from.dir.path().join("state").join(name), gw.dir.path().join("state").join(name))
        .expect("copy the fingerprint key");
    gw.spawn(false);
}

#[test]
fn three_gateways_ship_to_one_central_store_that_verifies() {
    let central = Central::start();
    let said = central.migrate();
    assert!(said.contains("migrated from version 0 to 3"), "{said}");
    let said = central.migrate();
    assert!(said.contains("up to date (version 3)"), "{said}");
    assert_eq!(central.count("SELECT max(version) FROM schema_version"), 3);

    let hosts = ["runner-1", "runner-2", "runner-3"];
    let mut gws: Vec<TestGateway> =
        hosts.iter().enumerate().map(|(i, h)| central.gateway(&format!("fleet-{i}"), h, "")).collect();
    let (first, rest) = gws.split_at_mut(1);
    for gw in rest {
        share_fingerprint_key(&first[0], gw);
    }

    let shared = keys::openai_key();
    let own: Vec<String> = hosts.iter().map(|_| keys::github_token()).collect();
    for (gw, own) in gws.iter().zip(&own) {
        assert_eq!(curl(&central, gw, None), 200, "a clean request");
        assert_eq!(curl(&central, gw, Some(&shared)), 200, "a flagged key passes");
        assert_eq!(curl(&central, gw, Some(own)), 200, "a flagged key passes");
        assert_eq!(curl(&central, gw, None), 200, "a clean request");
    }
    // A request held for approval on runner-1: shipped while pending, then
    // again once approved, with the decision.
    let mut held = curl_command(&central, &gws[0], None, "/approve/deploy");
    let held = std::thread::spawn(move || held.output().expect("curl"));
    let pending = wait_for("the request is held for approval", || {
        let list = cli_json(&gws[0], &["approvals", "list", "--json"]);
        list.as_array().and_then(|a| a.first().cloned()).ok_or_else(|| format!("nothing pending: {list}"))
    });
    let approval = pending["id"].as_str().expect("approval id").trim_start_matches("A-").to_owned();
    wait_for("the pending approval is central", || {
        match central.sql("SELECT state FROM approvals WHERE host_id = 'runner-1'").trim() {
            "pending" => Ok(()),
            other => Err(format!("state {other:?}")),
        }
    });
    ok("approve", &gws[0].cli(&["approvals", "approve", pending["id"].as_str().expect("id"), "--by", "alice"]));
    let out = held.join().expect("held curl");
    assert_eq!(gateway_tests::curl_reply(&out.stdout).0, 200, "the approved request went through");
    wait_for("the decision is central", || {
        let said = central.sql(
            "SELECT a.local_id, a.state, d.approver FROM approvals a JOIN decisions d
             ON d.host_id = a.host_id AND d.approval_local_id = a.local_id WHERE a.host_id = 'runner-1'",
        );
        if said.trim() == format!("{approval}|approved|alice") {
            Ok(())
        } else {
            Err(said)
        }
    });

    let mut total_sessions = 0;
    for (gw, host) in gws.iter().zip(hosts) {
        let chains = wait_shipped(&central, gw, host);
        assert!(chains.len() >= 4, "{host}: {chains:?}");
        assert!(chains.iter().all(|(_, records, ended)| *records >= 3 && *ended), "{host}: {chains:?}");
        total_sessions += chains.len();
    }

    // Findings: one central finding per key, with every host's sightings.
    let findings = cli_json(&gws[0], &["findings", "list", "--json"]);
    let shared_fp = findings
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["rule_id"].as_str().is_some_and(|r| r.contains("openai")))
        .and_then(|f| f["fingerprint"].as_str())
        .unwrap_or_else(|| panic!("no OpenAI finding on runner-1: {findings:#}"))
        .to_owned();
    wait_for("every host's sightings of the shared key are central", || {
        let hosts = central.count(&format!(
            "SELECT count(DISTINCT s.host_id) FROM sightings s JOIN findings f ON f.id = s.finding_id WHERE f.fingerprint = '{shared_fp}'"
        ));
        if hosts == 3 {
            Ok(())
        } else {
            Err(format!("sightings from {hosts} hosts"))
        }
    });
    // One central finding per key and rule, whatever host saw it.
    let mut keys_seen = BTreeSet::new();
    let mut host_findings = 0;
    for gw in &gws {
        for f in cli_json(gw, &["findings", "list", "--json"]).as_array().expect("findings") {
            keys_seen.insert((f["fingerprint"].to_string(), f["rule_id"].to_string()));
            host_findings += 1;
        }
    }
    assert!(keys_seen.len() >= 4 && host_findings >= 6, "{keys_seen:?}");
    assert_eq!(
        central.count("SELECT count(*) FROM findings"),
        keys_seen.len() as u64,
        "{}",
        central.sql("SELECT * FROM findings")
    );
    assert_eq!(central.count("SELECT count(DISTINCT fingerprint) FROM findings"), 4, "the shared key and one per host");
    assert_eq!(central.count("SELECT count(*) FROM host_findings"), host_findings);
    assert_eq!(central.count("SELECT count(DISTINCT host_id) FROM fleet_hosts"), 3);
    // The hosts share one fingerprint key, and `store status` says so; a
    // host registered with another key is named.
    let said = ok("store status", &gws[0].cli(&["store", "status"]));
    assert!(said.contains("fingerprint keys: one (") && said.contains("shared by 3 hosts"), "{said}");
    assert!(!gws[0].log().contains("fingerprint_key_mismatch"), "the hosts share their key");
    central.sql("UPDATE fleet_hosts SET fingerprint_key_id = '0123456789abcdef' WHERE host_id = 'runner-3'");
    let said = ok("store status", &gws[0].cli(&["store", "status"]));
    assert!(said.contains("fingerprint keys: 2 DIFFERENT") && said.contains("0123456789abcdef: runner-3"), "{said}");
    for (gw, host) in gws.iter().zip(hosts) {
        let local: u64 = cli_json(gw, &["findings", "list", "--json"])
            .as_array()
            .expect("findings")
            .iter()
            .map(|f| f["count"].as_u64().expect("count"))
            .sum();
        assert_eq!(central.count(&format!("SELECT count(*) FROM sightings WHERE host_id = '{host}'")), local, "{host}");
    }

    // A reviewer's status change on runner-1 reaches the store: the host's
    // view of the finding and its review history.
    let shared_local = findings
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["fingerprint"] == shared_fp.as_str())
        .and_then(|f| f["id"].as_str())
        .expect("the shared key's local id")
        .to_owned();
    ok("findings ack", &gws[0].cli(&["findings", "ack", &shared_local, "--by", "sam", "--comment", "rotating"]));
    wait_for("the review is central", || {
        let said = central.sql(
            "SELECT h.status, r.to_status, r.changed_by FROM host_findings h JOIN finding_reviews r
             ON r.host_id = h.host_id AND r.local_finding_id = h.local_id
             WHERE h.host_id = 'runner-1' AND r.changed_by = 'sam'",
        );
        if said.trim() == "acknowledged|acknowledged|sam" {
            Ok(())
        } else {
            Err(said)
        }
    });

    // The chains verify centrally.
    let (intact, said) = central.verify(&gws[0]);
    assert!(intact, "{said}");
    assert!(said.contains(&format!("{total_sessions} sessions verified in the central store, 0 broken")), "{said}");

    // Reviewers read the fleet: every session with its host, each finding
    // with the hosts that saw it.
    let listed = cli_json(&gws[1], &["sessions", "list", "--store", &central.url(), "--limit", "100000", "--json"]);
    let listed = listed.as_array().expect("sessions");
    assert_eq!(listed.len(), total_sessions);
    for host in hosts {
        assert!(listed.iter().any(|s| s["host_id"] == host && s["records"].as_u64() >= Some(3)), "{host}");
    }
    let listed = cli_json(&gws[1], &["findings", "list", "--store", &central.url(), "--json"]);
    let shared_central = listed
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["fingerprint"] == shared_fp.as_str())
        .unwrap_or_else(|| panic!("the shared key's finding is not listed: {listed:#}"));
    let seen_by: Vec<&str> =
        shared_central["hosts"].as_array().expect("hosts").iter().filter_map(|h| h["host_id"].as_str()).collect();
    assert_eq!(seen_by, hosts, "{shared_central:#}");
    assert_eq!(shared_central["sightings"], 3, "{shared_central:#}");
    let table = ok("findings list --store", &gws[1].cli(&["findings", "list", "--store", &central.url()]));
    assert!(table.contains("runner-1 (F-") && table.contains("runner-3 (F-"), "{table}");

    // No key in the central store, in any table.
    let dump = central.server.dump("fleet");
    assert!(dump.contains(&shared_fp), "the dump holds the findings (else the check below proves nothing)");
    for key in own.iter().chain([&shared]) {
        assert!(!dump.contains(key.as_str()), "a key is in the central store");
    }

    // An edited record and a deleted one are each named.
    let sessions: Vec<String> = central
        .sql("SELECT id FROM sessions WHERE host_id = 'runner-2' ORDER BY started")
        .lines()
        .map(str::to_owned)
        .collect();
    let (edited, deleted) = (&sessions[0], &sessions[1]);
    central.sql(&format!(
        "UPDATE records SET ts = ts + 1 WHERE host_id = 'runner-2' AND session = '{edited}' AND seq = 1"
    ));
    central.sql(&format!("DELETE FROM records WHERE host_id = 'runner-2' AND session = '{deleted}' AND seq = 1"));
    let (intact, said) = central.verify(&gws[2]);
    assert!(!intact, "verification passed a tampered store:\n{said}");
    assert!(said.contains(&format!("runner-2/{edited}  BROKEN at record 1: hash mismatch")), "{said}");
    assert!(said.contains(&format!("runner-2/{deleted}  BROKEN at record 1: record 1 is missing")), "{said}");
    assert!(said.contains("2 broken"), "{said}");

    // A schema newer than the gateway knows: it refuses to ship, and says so.
    central.sql("INSERT INTO schema_version (version, description) VALUES (4, 'from a newer gateway')");
    let gw = &mut gws[2];
    gw.stop(nix::sys::signal::Signal::SIGTERM);
    gw.spawn(false);
    wait_for("the gateway reports the unknown schema", || {
        let log = gw.log();
        if log.lines().any(|l| l.contains("\"kind\":\"schema_unknown\"") && l.contains("schema version 4")) {
            Ok(())
        } else {
            Err("no schema_unknown event yet".to_owned())
        }
    });
    assert_eq!(curl(&central, gw, None), 200, "the gateway itself keeps working");
    let out = gw.cli(&["store", "status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "store status flags the mismatch");
}

#[test]
fn nothing_is_lost_or_doubled_when_the_store_stops_or_the_gateway_is_killed() {
    let central = Central::start();
    central.migrate();
    let host = "runner-outage";
    let mut gw = central.gateway("fleet-outage", host, "  backlog_alarm: 20\n  batch_size: 2\n");
    assert_eq!(curl(&central, &gw, None), 200);
    wait_shipped(&central, &gw, host);

    // Traffic all along, from another thread.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let curl_cmd = {
            let mut args = vec![
                "-sS".to_owned(),
                "--max-time".into(),
                "20".into(),
                "--resolve".into(),
                format!("{HOST}:{}:{UPSTREAM_IP}", central.upstream_port),
                "--cacert".into(),
                gw.dir.path().join("gateway-ca.pem").display().to_string(),
                "-w".into(),
                "\n%{http_code}".into(),
            ];
            args.push(format!("https://{HOST}:{}/v1/models", central.upstream_port));
            args
        };
        let cgroup = gw.cgroup_dir.clone();
        let key = keys::openai_key();
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut cmd = std::process::Command::new("curl");
                gateway_tests::in_cgroup_pre_exec(&mut cmd, &cgroup);
                cmd.args(&curl_cmd);
                if n.is_multiple_of(3) {
                    cmd.args(["-H", &format!("Authorization: Bearer {key}")]);
                }
                let out = cmd.output().expect("curl");
                let code = gateway_tests::curl_reply(&out.stdout).0;
                if code != 200 {
                    failures.push(code);
                }
                n += 1;
                sent.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
            (failures, key)
        })
    };

    // (b) The store goes away for a while: recording goes on, the backlog
    // grows past the alarm, and drains once the store is back.
    std::thread::sleep(Duration::from_secs(1));
    central.server.halt();
    let halted = Instant::now();
    wait_for("the outage is reported", || {
        if gw.log().contains("\"kind\":\"store_unreachable\"") {
            Ok(())
        } else {
            Err("no store_unreachable event")
        }
    });
    wait_for("the backlog alarm fires", || {
        if gw.log().contains("\"kind\":\"backlog_alarm\"") {
            Ok(())
        } else {
            Err(format!("backlog {}", gw.status()["fleet"]["backlog"]["total"]))
        }
    });
    let status = gw.status();
    assert_eq!(status["fleet"]["alarm"], true, "{status:#}");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(halted.elapsed()));
    central.server.resume();
    let outage = halted.elapsed();
    let during = sent.load(Ordering::Relaxed);
    assert!(during >= 20, "traffic went on during the outage ({during} requests)");
    wait_for("the store is reported back", || {
        if gw.log().contains("\"kind\":\"store_reachable\"") {
            Ok(())
        } else {
            Err("no store_reachable event")
        }
    });

    // (c) Killed while shipping that backlog (batches of 2 rows): after the
    // restart the outbox resumes from its cursor.
    let before = central.count(&format!("SELECT count(*) FROM records WHERE host_id = '{host}'"));
    wait_for("shipping is under way", || {
        let now = central.count(&format!("SELECT count(*) FROM records WHERE host_id = '{host}'"));
        if now > before {
            Ok(())
        } else {
            Err(format!("{now} records central"))
        }
    });
    gw.stop(nix::sys::signal::Signal::SIGKILL);
    let backlog_at_kill = gateway::fleet::backlog(&load_config(&gw)).expect("backlog").total;
    gw.spawn(false);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (failures, key) = traffic.join().expect("traffic thread");
    assert!(failures.iter().all(|c| *c == 200 || *c == 0), "requests failed: {failures:?}");

    let chains = wait_shipped(&central, &gw, host);
    assert!(gw.log().contains("\"kind\":\"backlog_cleared\""), "the alarm is cleared once drained");
    let records: u64 = chains.iter().map(|(_, n, _)| n).sum();
    assert_eq!(central.count(&format!("SELECT count(*) FROM records WHERE host_id = '{host}'")), records);
    assert_eq!(
        central.count(&format!("SELECT count(DISTINCT local_id) FROM records WHERE host_id = '{host}'")),
        records,
        "no record twice"
    );
    let local_sightings: u64 = cli_json(&gw, &["findings", "list", "--json"])
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["count"].as_u64().expect("count"))
        .sum();
    assert!(local_sightings > 3, "the keyed requests were flagged");
    assert_eq!(central.count(&format!("SELECT count(*) FROM sightings WHERE host_id = '{host}'")), local_sightings);
    let (intact, said) = central.verify(&gw);
    assert!(intact, "{said}");
    assert!(!central.server.dump("fleet").contains(&key), "the key is in the central store");
    eprintln!(
        "fleet outage: {during} requests during a {}s outage, backlog {backlog_at_kill} rows at the SIGKILL, {} sessions / {records} records shipped",
        outage.as_secs(),
        chains.len()
    );
}

/// `gw`'s configuration, as the gateway loads it.
fn load_config(gw: &TestGateway) -> gateway::config::Config {
    gateway::config::Config::load_chosen(Some(&gw.config_path)).expect("load the gateway's configuration").0
}

/// A request held on `gw` for approval, in a thread: its curl output and
/// when curl returned.
fn hold(central: &Central, gw: &TestGateway) -> std::thread::JoinHandle<(Output, std::time::SystemTime)> {
    let mut cmd = curl_command(central, gw, None, "/approve/deploy");
    std::thread::spawn(move || {
        let out = cmd.output().expect("curl");
        (out, std::time::SystemTime::now())
    })
}

/// Waits until `gw` holds a pending request other than `seen`: its local id.
fn held_id(gw: &TestGateway, seen: &[i64]) -> i64 {
    wait_for("a request is held for approval", || {
        let list = cli_json(gw, &["approvals", "list", "--json"]);
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["id"].as_str()?.trim_start_matches("A-").parse::<i64>().ok())
            .find(|id| !seen.contains(id))
            .ok_or_else(|| format!("nothing new pending: {list}"))
    })
}

/// The central state of `host`'s request `id`.
fn central_state(central: &Central, host: &str, id: i64) -> String {
    central.sql(&format!("SELECT state FROM approvals WHERE host_id = '{host}' AND local_id = {id}")).trim().to_owned()
}

/// `approvals approve|deny` on `gw` through the central store, for the
/// request `id` held on `host`: the CLI's output.
fn decide_central(central: &Central, gw: &TestGateway, verb: &str, host: &str, id: i64, by: &str) -> Output {
    let id = format!("A-{id}");
    gw.cli(&["approvals", verb, &id, "--store", &central.url(), "--host-id", host, "--by", by])
}

/// One unlabelled sample from `gw`'s `/metrics`.
fn metric(gw: &TestGateway, name: &str) -> f64 {
    let url = format!("http://127.0.0.1:{}/metrics", gw.api_port);
    let out = std::process::Command::new("curl").args(["-sS", "--fail", &url]).output().expect("run curl");
    let body = ok(&format!("curl {url}"), &out);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} sample in /metrics:\n{body}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_request_held_on_one_host_is_decided_from_another_through_the_store() {
    let central = Central::start();
    let said = central.migrate();
    assert!(said.contains("to 3"), "{said}");
    // Host A keeps sessions locally for 3 s only (pruned every 500 ms),
    // unless they have not reached the store.
    let a = central.gateway_with("central-a", "runner-a", "", "  retention: 3s\n  prune_interval: 500ms\n");
    let b = central.gateway("central-b", "runner-b", "");
    wait_for("runner-a listens for central decisions", || {
        let status = a.status();
        match status["fleet"]["central_approvals"]["state"].as_str() {
            Some("available") => Ok(()),
            other => Err(format!("{other:?}: {}", status["fleet"])),
        }
    });
    let said = ok("store status", &a.cli(&["store", "status", "--store", &central.url()]));
    assert!(said.contains("schema version:  3") && said.contains("central approvals: on (0 decisions"), "{said}");

    // (a) Held on A, approved on B's CLI: released within a second.
    let held = hold(&central, &a);
    let first = held_id(&a, &[]);
    let pending_at = Instant::now();
    wait_for("the held request is central at once", || match central_state(&central, "runner-a", first).as_str() {
        "pending" => Ok(()),
        other => Err(format!("state {other:?}")),
    });
    println!("held request central {} ms after it was listed locally", pending_at.elapsed().as_millis());

    let listed = cli_json(&b, &["approvals", "list", "--store", &central.url(), "--json"]);
    assert!(
        listed
            .as_array()
            .is_some_and(|l| l.iter().any(|r| r["host_id"] == "runner-a" && r["id"] == format!("A-{first}"))),
        "{listed}"
    );

    // A forged central decision (inserted by hand, as anyone who can write
    // the store could): root is behind the request, so A refuses it. With
    // the notification trigger off, A finds it by polling (the fallback for
    // a lost notification), within fleet.approval_poll (2 s).
    let requesters = cli_json(&a, &["approvals", "show", &format!("A-{first}"), "--json"])["requesters"].clone();
    assert!(requesters.as_array().is_some_and(|r| r.iter().any(|n| n == "root")), "{requesters}");
    central.sql("ALTER TABLE central_decisions DISABLE TRIGGER central_decisions_notify");
    central.sql(&format!(
        "INSERT INTO central_decisions (host_id, approval_local_id, verdict, approver, uid, decided_on, decided_at)
         VALUES ('runner-a', {first}, 'approve', 'root', 0, 'psql', 0)"
    ));
    let forged_at = Instant::now();
    wait_for("runner-a rejects the forged decision", || {
        let outcome = central.sql("SELECT outcome, outcome_reason FROM central_decisions WHERE decided_on = 'psql'");
        if outcome.starts_with("rejected|") && outcome.contains("as requester") {
            Ok(())
        } else {
            Err(outcome)
        }
    });
    let polled = forged_at.elapsed();
    println!("forged decision found by polling and rejected in {} ms", polled.as_millis());
    assert!(polled < Duration::from_secs(5), "the poll fallback took {polled:?}");
    central.sql("ALTER TABLE central_decisions ENABLE TRIGGER central_decisions_notify");
    let events = a.log_messages_with("kind", "central_decision_rejected");
    assert_eq!(events.len(), 1, "{}", a.log());
    assert!(!held.is_finished(), "a forged decision released the request");
    assert_eq!(cli_json(&a, &["approvals", "show", &format!("A-{first}"), "--json"])["state"], "pending");

    // Self-approval through the CLI is refused before anything is written.
    let out = decide_central(&central, &b, "approve", "runner-a", first, "root");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("root is behind") && text(&out).contains("as requester"), "{}", text(&out));
    // A non-member too.
    let out = decide_central(&central, &b, "approve", "runner-a", first, "mallory");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not a member"), "{}", text(&out));
    assert_eq!(central.count("SELECT count(*) FROM central_decisions WHERE decided_on = 'runner-b'"), 0);

    let out = decide_central(&central, &b, "approve", "runner-a", first, "alice");
    let said = ok("approve through the store", &out);
    assert!(said.contains("runner-a/A-") && said.contains("runner-a applied it"), "{said}");
    let (curl_out, released) = held.join().expect("held curl");
    assert_eq!(gateway_tests::curl_reply(&curl_out.stdout).0, 200, "the approved request went through");
    let decided_at: i64 = central
        .sql(&format!(
            "SELECT decided_at FROM central_decisions WHERE decided_on = 'runner-b' AND approval_local_id = {first}"
        ))
        .trim()
        .parse()
        .expect("decided_at");
    let released = released.duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as i64;
    let latency = Duration::from_nanos(u64::try_from(released - decided_at).unwrap_or(0));
    println!("central decision to release on runner-a: {} ms", latency.as_millis());
    assert!(latency < Duration::from_secs(1), "released {latency:?} after the central decision");
    let view = cli_json(&a, &["approvals", "show", &format!("A-{first}"), "--json"]);
    assert_eq!(view["state"], "approved");
    assert_eq!(view["decisions"][0]["recorded_as"], "alice (central, on runner-b)", "{view:#}");
    // The local decision ships back as the host's own record; no new
    // central decision comes of it (no loop).
    wait_for("the decision is central as runner-a recorded it", || {
        let said = central.sql(&format!(
            "SELECT a.state, d.recorded_as FROM approvals a JOIN decisions d
             ON d.host_id = a.host_id AND d.approval_local_id = a.local_id
             WHERE a.host_id = 'runner-a' AND a.local_id = {first}"
        ));
        if said.trim() == "approved|alice (central, on runner-b)" {
            Ok(())
        } else {
            Err(said)
        }
    });
    assert_eq!(central.count("SELECT count(*) FROM central_decisions"), 2, "the forged row and alice's");

    // (b) Denied on B: refused on A at once.
    let held = hold(&central, &a);
    let second = held_id(&a, &[first]);
    wait_for("the second request is central", || match central_state(&central, "runner-a", second).as_str() {
        "pending" => Ok(()),
        other => Err(format!("state {other:?}")),
    });
    let said = ok("deny through the store", &decide_central(&central, &b, "deny", "runner-a", second, "bob"));
    assert!(said.contains("denied by bob") && said.contains("runner-a applied it"), "{said}");
    let (curl_out, _) = held.join().expect("held curl");
    let (code, body) = gateway_tests::curl_reply(&curl_out.stdout);
    assert_ne!(code, 200, "a denied request went through: {body}");
    assert_eq!(cli_json(&a, &["approvals", "show", &format!("A-{second}"), "--json"])["state"], "denied");
    // Deciding it again is refused (finished).
    let out = decide_central(&central, &b, "approve", "runner-a", second, "alice");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // (c) The store goes away: A says central approvals are unavailable,
    // its local approval path works, and unshipped sessions outlive the
    // local retention.
    // (Not wait_shipped: with a 3 s retention, shipped sessions may already
    // be gone locally.)
    let shipped_ids = |central: &Central| -> BTreeSet<String> {
        central_chains(central, "runner-a").into_iter().map(|(id, _, _)| id).collect()
    };
    let shipped = wait_for("runner-a has shipped everything", || {
        let local = local_chains(&a);
        let central_ids = shipped_ids(&central);
        let backlog = a.status()["fleet"]["backlog"]["total"].clone();
        if backlog == 0 && local.iter().all(|(id, _, ended)| *ended && central_ids.contains(id)) {
            Ok(central_ids)
        } else {
            Err(format!("backlog {backlog}, local {local:?}"))
        }
    });
    central.server.halt();
    wait_for("runner-a reports central approvals unavailable", || {
        let status = a.status();
        match status["fleet"]["central_approvals"]["state"].as_str() {
            Some("unavailable") => Ok(()),
            other => Err(format!("{other:?}: {}", status["fleet"])),
        }
    });
    assert!(!a.log_messages_with("kind", "central_approvals_unavailable").is_empty());
    let said = ok("status", &a.cli(&["status"]));
    assert!(said.contains("central approvals: UNAVAILABLE"), "{said}");
    let held = hold(&central, &a);
    let third = held_id(&a, &[first, second]);
    ok("local approve", &a.cli(&["approvals", "approve", &format!("A-{third}"), "--by", "alice"]));
    let (curl_out, _) = held.join().expect("held curl");
    assert_eq!(gateway_tests::curl_reply(&curl_out.stdout).0, 200, "approved locally while the store is down");
    assert_eq!(curl(&central, &a, None), 200);
    let unshipped = wait_for("the sessions recorded during the outage have ended", || {
        let local = local_chains(&a);
        let new: Chains = local.into_iter().filter(|(id, _, _)| !shipped.contains(id)).collect();
        if new.len() >= 2 && new.iter().all(|(_, _, ended)| *ended) {
            Ok(new)
        } else {
            Err(format!("{new:?}"))
        }
    });
    std::thread::sleep(Duration::from_secs(4));
    let status = a.status();
    let backlog = &status["fleet"]["backlog"];
    assert!(backlog["total"].as_u64() > Some(0), "{status}");
    assert!(backlog["oldest_age_seconds"].as_f64() > Some(3.0), "{backlog}");
    let age = metric(&a, "gateway_outbox_oldest_age_seconds");
    assert!(age > 3.0, "gateway_outbox_oldest_age_seconds {age}");
    assert!(metric(&a, "gateway_outbox_backlog_records") > 0.0);
    let kept: Chains = local_chains(&a).into_iter().filter(|(id, _, _)| !shipped.contains(id)).collect();
    assert_eq!(kept, unshipped, "sessions not yet shipped were pruned locally");

    central.server.resume();
    wait_for("runner-a reports central approvals available again", || {
        match a.status()["fleet"]["central_approvals"]["state"].as_str() {
            Some("available") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // Once shipped, the sessions past the retention go (the newest stays).
    wait_for("shipped sessions past the retention are pruned locally", || {
        let local = local_chains(&a);
        let shipped = a.status()["fleet"]["backlog"]["total"] == 0;
        if shipped && local.len() <= 1 {
            Ok(())
        } else {
            Err(format!("{} local sessions, shipped: {shipped}", local.len()))
        }
    });
    assert_eq!(metric(&a, "gateway_outbox_oldest_age_seconds"), 0.0, "nothing waits");
    let central_chains_now = central_chains(&central, "runner-a");
    for session in &unshipped {
        assert!(central_chains_now.contains(session), "{session:?} was pruned before it reached the store");
    }
    assert_eq!(central_state(&central, "runner-a", third), "approved");
}

/// The quick start's stand-in identity provider (deploy/compose/idp.py),
/// run for one console; killed on drop.
struct StandInIdp {
    child: std::process::Child,
    env: Vec<(&'static str, String)>,
}

impl StandInIdp {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/idp.py")
    }

    fn start(dir: &std::path::Path, console_port: u16, email: &str, groups: &str) -> (StandInIdp, PathBuf) {
        let port = unique_port();
        let key = dir.join("idp.key");
        let out = std::process::Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .expect("run openssl genrsa");
        ok("openssl genrsa", &out);
        let secret = dir.join("console-oidc-secret");
        std::fs::write(&secret, keys::random(32)).expect("write secret");
        let env = vec![
            ("IDP_PORT", port.to_string()),
            ("IDP_CLIENT_ID", "fleet-console".to_owned()),
            ("IDP_REDIRECT_URI", format!("http://127.0.0.1:{console_port}/auth/callback")),
            ("IDP_SECRET_FILE", secret.display().to_string()),
            ("IDP_KEY_FILE", key.display().to_string()),
            ("IDP_EMAIL", email.to_owned()),
            ("IDP_GROUPS", groups.to_owned()),
        ];
        let child = std::process::Command::new("python3")
            .arg(Self::script())
            .arg("serve")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the stand-in identity provider");
        wait_for("the stand-in identity provider listens", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).map(drop).map_err(|e| e.to_string())
        });
        (StandInIdp { child, env }, secret)
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.env[0].1)
    }

    /// Signs in to the console at `page` as a browser does: the session
    /// cookie and CSRF token.
    fn session(&self, page: &str) -> (String, String) {
        let out = std::process::Command::new("python3")
            .arg(Self::script())
            .args(["session", page])
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run idp.py session");
        let said: Value = serde_json::from_str(&ok("idp.py session", &out)).expect("session JSON");
        (said["cookie"].as_str().expect("cookie").to_owned(), said["csrf"].as_str().expect("csrf").to_owned())
    }
}

impl Drop for StandInIdp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A console page (GET) or form (POST, `form` fields): status and body.
fn console_call(url: &str, cookie: &str, form: &[(&str, &str)]) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}", "-H", &format!("Cookie: {cookie}")]);
    for (k, v) in form {
        cmd.args(["--data-urlencode", &format!("{k}={v}")]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    let text = ok(&format!("curl {url}"), &out);
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (status.trim().parse().expect("status"), body.to_owned())
}

#[test]
fn the_console_shows_the_fleet_and_releases_a_request_held_on_another_host() {
    let central = Central::start();
    central.migrate();
    let console_port = unique_port();
    let (idp, secret) = StandInIdp::start(central.dir.path(), console_port, CONSOLE_APPROVER, "release-managers");
    let console = format!(
        "console:\n  listen: 127.0.0.1:{console_port}\n  oidc:\n    issuer: {issuer}\n    client_id: fleet-console\n\
         \x20   client_secret_file: {secret}\n    redirect_url: http://127.0.0.1:{console_port}/auth/callback\n\
         \x20   roles: {{ release-managers: approver }}\n",
        issuer = idp.issuer(),
        secret = secret.display(),
    );
    let a = central.gateway("fleet-console-a", "runner-a", "");
    let b = central.gateway_full("fleet-console-b", "runner-b", "", "", &console);
    wait_for("runner-a listens for central decisions", || {
        match a.status()["fleet"]["central_approvals"]["state"].as_str() {
            Some("available") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // A keyed request on A: its finding and session reach the store.
    let key = keys::github_token();
    assert_eq!(curl(&central, &a, Some(&key)), 200, "flagged, not blocked");
    let held = hold(&central, &a);
    let id = held_id(&a, &[]);
    wait_for("the held request is central", || match central_state(&central, "runner-a", id).as_str() {
        "pending" => Ok(()),
        other => Err(format!("state {other:?}")),
    });
    wait_for("runner-a's finding is central", || {
        match central.count("SELECT count(*) FROM host_findings WHERE host_id = 'runner-a'") {
            0 => Err("none yet"),
            _ => Ok(()),
        }
    });

    // Signed in on B's console: A's request is in the fleet's queue.
    let base = format!("http://127.0.0.1:{console_port}");
    let (cookie, csrf) = idp.session(&format!("{base}/fleet/approvals"));
    let (status, page) = console_call(&format!("{base}/fleet/approvals"), &cookie, &[]);
    assert_eq!(status, 200, "{page}");
    let action = format!("/fleet/approvals/runner-a/A-{id}/decide");
    assert!(page.contains("runner-a") && page.contains(&action), "{page}");
    assert!(page.contains(r#"href="/fleet/approvals""#), "the navigation links the fleet: {page}");

    // Without the session's CSRF token nothing is decided.
    let (status, page) = console_call(&format!("{base}{action}"), &cookie, &[("csrf", "0"), ("verdict", "approve")]);
    assert_eq!(status, 403, "{page}");
    assert_eq!(central.count("SELECT count(*) FROM central_decisions"), 0);

    // Approved in the console: A releases the request.
    let (status, page) = console_call(
        &format!("{base}{action}"),
        &cookie,
        &[("csrf", &csrf), ("verdict", "approve"), ("comment", "release window")],
    );
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("runner-a applied it"), "{page}");
    let (curl_out, _) = held.join().expect("held curl");
    assert_eq!(gateway_tests::curl_reply(&curl_out.stdout).0, 200, "the approved request went through");
    let view = cli_json(&a, &["approvals", "show", &format!("A-{id}"), "--json"]);
    assert_eq!(view["state"], "approved", "{view:#}");
    assert_eq!(view["decisions"][0]["recorded_as"], format!("{CONSOLE_APPROVER} (central, on runner-b)"), "{view:#}");
    assert_eq!(view["decisions"][0]["comment"], "release window", "{view:#}");
    let logged = b.log_messages("central approval decision recorded");
    assert_eq!(logged.len(), 1, "{}", b.log());

    // The fleet's findings and sessions, each with its host; no key in clear.
    let (status, findings) = console_call(&format!("{base}/fleet/findings"), &cookie, &[]);
    assert_eq!(status, 200, "{findings}");
    assert!(findings.contains("runner-a: F-1 (open)") && findings.contains("github"), "{findings}");
    let (status, sessions) = console_call(&format!("{base}/fleet/sessions?host_id=runner-a"), &cookie, &[]);
    assert_eq!(status, 200, "{sessions}");
    assert!(sessions.contains("runner-a") && sessions.contains(HOST), "{sessions}");
    assert!(!sessions.contains("<td>runner-b</td>"), "filtered to runner-a: {sessions}");
    for page in [&findings, &sessions] {
        assert!(!page.contains(&key), "a fleet page holds the key in clear");
    }

    // Retention: ended sessions go whole (records with them, the chains
    // left verify), the approved request stays until it expires, answered
    // central decisions go, findings stay; a dry run counts and keeps.
    wait_for("runner-a's ended sessions are central", || {
        match central.count("SELECT count(*) FROM sessions WHERE host_id = 'runner-a' AND ended IS NOT NULL") {
            n if n >= 2 => Ok(()),
            n => Err(format!("{n} ended")),
        }
    });
    std::thread::sleep(Duration::from_millis(1100));
    let totals = || {
        ["sessions", "records", "approvals", "central_decisions", "findings"]
            .map(|t| central.count(&format!("SELECT count(*) FROM {t}")))
    };
    let before = totals();
    let dry = cli_json(&b, &["store", "prune", "--before", "1s", "--dry-run", "--json"]);
    assert_eq!(totals(), before, "a dry run deleted something: {dry}");
    assert!(dry["pruned"]["sessions"].as_u64().is_some_and(|n| n >= 2), "{dry}");
    assert_eq!(dry["pruned"]["central_decisions"], 1, "{dry}");
    assert_eq!(dry["pruned"]["approvals"], 0, "the approved request has not expired: {dry}");
    let pruned = cli_json(&b, &["store", "prune", "--before", "1s", "--json"])["pruned"].clone();
    let after = totals();
    assert!(pruned["sessions"].as_u64() >= dry["pruned"]["sessions"].as_u64(), "{pruned} {dry}");
    assert_eq!(before[0] - after[0], pruned["sessions"].as_u64().expect("sessions"), "{pruned}");
    assert_eq!(before[1] - after[1], pruned["records"].as_u64().expect("records"), "{pruned}");
    assert_eq!((after[2], after[3], after[4]), (before[2], 0, before[4]), "{pruned}");
    assert_eq!(
        central.count(
            "SELECT count(*) FROM records r WHERE NOT EXISTS
             (SELECT 1 FROM sessions s WHERE s.host_id = r.host_id AND s.id = r.session)"
        ),
        0,
        "records of pruned sessions were left"
    );
    let (verified, said) = central.verify(&b);
    assert!(verified, "{said}");

    // The store down: the page says so instead of showing a stale list.
    central.server.halt();
    let (status, page) = console_call(&format!("{base}/fleet/findings"), &cookie, &[]);
    assert_eq!(status, 502, "{page}");
    assert!(page.contains("central store cannot be read"), "{page}");
}
