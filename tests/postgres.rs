//! PostgreSQL through the gateway, end to end: a real server (Debian's
//! PostgreSQL 15, initialised here in a temporary directory, SCRAM-SHA-256
//! only, TLS only, on loopback addresses) and real clients nobody here
//! wrote (psql, pgbench, psycopg 3; and in a second scene asyncpg,
//! node-postgres, tokio-postgres and pgjdbc) in the intercepted cgroup.
//!
//! One server listens on three addresses the gateway intercepts, each
//! with its own static-key action (`findings.actions`): `block`, `flag`
//! (where GitHub tokens still block) and `swap` (the gateway logs in
//! upstream with the credential it holds). The test checks what each
//! client sees, what the server saw (`current_user`), the findings, the
//! recording, and that no password appears anywhere the gateway wrote.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use gateway_tests::{
    keys,
    pg::{ok, pki, PgServer},
    unique_port, wait_for, GatewayOptions, TestGateway,
};
use serde_json::Value;

const BLOCK_IP: &str = "127.0.0.21";
const FLAG_IP: &str = "127.0.0.22";
const SWAP_IP: &str = "127.0.0.23";

struct Scene {
    gw: TestGateway,
    server: PgServer,
    gateway_ca: PathBuf,
    /// The CA of the server's own certificate (for clients that go direct).
    server_ca: PathBuf,
    /// The password hard-coded in the job (the `ci` role's real one).
    job_password: String,
    /// The password of `ci_swap`, which only the gateway holds.
    swap_password: String,
    _dir: tempfile::TempDir,
}

impl Scene {
    /// Starts a server and a gateway named `name` (its cgroup and pins are
    /// named after it, so two scenes run side by side in one test binary).
    fn start(name: &str) -> Scene {
        Scene::with_rules(name, "")
    }

    /// [`Scene::start`] with more policy `rules` (YAML list items) after
    /// the scene's own, before its default.
    fn with_rules(name: &str, rules: &str) -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let ips = [BLOCK_IP, FLAG_IP, SWAP_IP];
        let pki = pki(&ips);
        let port = unique_port();
        let server = PgServer::start(&ips, port, &pki);
        let job_password = format!("job-{}", keys::random(24));
        let swap_password = format!("held-{}", keys::random(24));
        server.admin_sql(&format!(
            "CREATE ROLE ci LOGIN PASSWORD '{job_password}'; CREATE ROLE ci_swap LOGIN PASSWORD '{swap_password}' IN ROLE ci;"
        ));
        server.admin_sql("CREATE DATABASE app OWNER ci;");

        let ca_path = dir.path().join("server-ca.pem");
        std::fs::write(&ca_path, &pki.ca_pem).expect("write ca");
        let held = dir.path().join("held-password");
        std::fs::write(&held, &swap_password).expect("write credential");
        std::fs::set_permissions(&held, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        let destinations: Vec<String> = ips.iter().map(|ip| format!("{{cidr: {ip}/32, ports: [{port}]}}")).collect();
        let destinations: Vec<&str> = destinations.iter().map(String::as_str).collect();
        let mut opts = GatewayOptions::new(name, &destinations);
        opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
        // Statement rules (judged with PostgreSQL's own grammar); everything
        // else allowed, findings.actions deciding static keys.
        opts.policy_yaml = Some(format!(
            "version: 1\nrules:\n\
             \x20 - name: bounded-deletes\n    match: {{ postgres: {{ kind: [update, delete], where: false }} }}\n\
             \x20   action: deny\n    reason: \"UPDATE and DELETE need a WHERE clause\"\n\
             \x20 - name: no-fastpath\n    match: {{ postgres: {{ kind: call }} }}\n\
             \x20   action: deny\n    reason: \"function calls are not for CI\"\n\
             \x20 - name: vault\n    match: {{ postgres: {{ relations: [vault_keys, public.vault_keys] }} }}\n\
             \x20   action: deny\n    reason: \"the vault is off limits to CI\"\n\
             {rules}defaults: {{ action: allow }}\n"
        ));
        opts.extra_yaml = format!(
            "tls:\n  extra_upstream_cas: [{ca}]\n\
             findings:\n  default_action: flag\n  actions:\n\
             \x20   - {{host: \"{BLOCK_IP}\", action: block}}\n\
             \x20   - {{host: \"{FLAG_IP}\", rule: \"github-*\", action: block}}\n\
             \x20   - {{host: \"{FLAG_IP}\", action: flag}}\n\
             \x20   - {{host: \"{SWAP_IP}\", action: swap}}\n\
             credentials:\n  credentials:\n\
             \x20   - identity: \"**\"\n      host: \"{SWAP_IP}\"\n      source: {{file: {held}}}\n\
             \x20     inject: {{postgres: {{user: ci_swap, password: \"{{credential}}\"}}}}\n\
             approvals:\n  groups: {{ dba: [alice] }}\n\
             record:\n  flush_interval: 50ms\n",
            ca = ca_path.display(),
            held = held.display(),
        );
        let gw = TestGateway::start(opts);
        let gateway_ca = dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        ok("ca export", &out);
        Scene { gw, server, gateway_ca, server_ca: ca_path, job_password, swap_password, _dir: dir }
    }

    fn conninfo(&self, ip: &str) -> String {
        format!(
            "host={ip} port={} user=ci dbname=app sslmode=verify-full sslrootcert={} connect_timeout=30",
            self.server.port,
            self.gateway_ca.display()
        )
    }

    /// psql in the intercepted cgroup with `password`, running `commands`
    /// (each a `-c`) in one session.
    fn psql(&self, ip: &str, password: &str, commands: &[&str]) -> Output {
        let mut cmd = self.gw.command_in_cgroup("psql");
        cmd.env("PGPASSWORD", password).args(["-X", "-At", &self.conninfo(ip)]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        run(cmd)
    }

    fn pgbench(&self, ip: &str, args: &[&str]) -> Output {
        let mut cmd = self.gw.command_in_cgroup("pgbench");
        cmd.env("PGPASSWORD", &self.job_password).args(args).arg(self.conninfo(ip));
        run(cmd)
    }

    /// A Python script with psycopg 3 in the intercepted cgroup; `DSN`
    /// and `PASSWORD` are in its environment.
    fn python(&self, ip: &str, script: &str) -> Output {
        let python = gateway_tests::python_named(self.gw.dir.path(), "pgclient");
        let mut cmd = self.gw.command_in_cgroup(python);
        cmd.env("DSN", self.conninfo(ip)).env("PGPASSWORD", &self.job_password).args(["-c", script]);
        run(cmd)
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.gw.cli(args);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", ok("cli", &out)))
    }

    fn findings(&self) -> Vec<Value> {
        self.cli_json(&["findings", "list", "--json"]).as_array().cloned().unwrap_or_default()
    }

    /// Waits for a pending approval of a job process named `comm`, other
    /// than those in `seen`.
    fn next_approval(&self, comm: &str, seen: &[String]) -> Value {
        wait_for(&format!("a pending approval of {comm}"), || {
            let list = self.cli_json(&["approvals", "list", "--json"]);
            list.as_array()
                .into_iter()
                .flatten()
                .find(|a| {
                    a["state"] == "pending"
                        && a["process"]["comm"] == comm
                        && !seen.iter().any(|s| a["id"].as_str() == Some(s.as_str()))
                })
                .cloned()
                .ok_or_else(|| format!("none yet: {list}"))
        })
    }

    /// An approver (`alice`, of group `dba`) approves or denies (`verb`).
    fn decide(&self, id: &str, verb: &str) -> Output {
        self.gw.cli(&["approvals", verb, id, "--by", "alice", "--comment", "e2e"])
    }

    fn findings_of(&self, rule: &str, host: &str) -> Vec<Value> {
        self.findings().into_iter().filter(|f| f["rule_id"] == rule && f.to_string().contains(host)).collect()
    }
}

/// Runs `cmd` for at most [`CLIENT_PATIENCE`]: a client that hangs fails
/// the test (and is killed) instead of hanging it.
fn run(mut cmd: Command) -> Output {
    use std::process::Stdio;
    // Only the program is named on failure: arguments and environment
    // carry passwords and keys.
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn client");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(CLIENT_PATIENCE) {
        Ok(out) => out.expect("client output"),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("{program} did not finish within {CLIENT_PATIENCE:?}");
        }
    }
}

/// How long one client run may take.
const CLIENT_PATIENCE: Duration = Duration::from_secs(120);

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn postgres_through_the_gateway() {
    gateway_tests::require_root();
    let scene = Scene::start("postgres");
    let port = scene.server.port;

    // --- block: the hard-coded password never reaches the server.
    let out = scene.psql(BLOCK_IP, &scene.job_password, &["select current_user"]);
    let said = text(&out);
    assert!(!out.status.success(), "a blocked password must fail the login:\n{said}");
    assert!(said.contains("postgres-password") && said.contains("blocked"), "the error names the finding:\n{said}");
    let blocked = wait_for("the blocked password's finding", || {
        let f = scene.findings_of("postgres-password", BLOCK_IP);
        if f.is_empty() {
            Err("none yet")
        } else {
            Ok(f)
        }
    });
    assert_eq!(blocked[0]["action"], "block", "{blocked:?}");
    let id = blocked[0]["id"].as_str().expect("finding id");
    assert!(said.contains(id), "the client is told finding {id}:\n{said}");

    // --- flag: the job's own password goes upstream; the finding is recorded.
    let out = scene.psql(FLAG_IP, &scene.job_password, &["select current_user"]);
    assert_eq!(ok("psql through flag", &out).trim(), "ci");
    let flagged = scene.findings_of("postgres-password", FLAG_IP);
    assert!(flagged.iter().any(|f| f["action"] == "flag"), "flag finding: {flagged:?}");
    assert!(
        flagged[0].to_string().contains("user=ci") && flagged[0].to_string().contains("database=app"),
        "{flagged:?}"
    );

    // --- PostgreSQL 17's direct TLS (ALPN `postgresql`, no SSLRequest),
    // with psycopg's libpq (18).
    let script = r#"
import os, psycopg
conn = psycopg.connect(os.environ["DSN"] + " sslnegotiation=direct")
print("direct", conn.execute("select current_user").fetchone()[0], conn.pgconn.ssl_in_use)
"#;
    let out = scene.python(FLAG_IP, script);
    assert_eq!(ok("direct TLS", &out).trim(), "direct ci True");

    // --- statement policy: each statement of a query judged on its own, a
    // denied one answered 42501 with the rule's reason, the session going on.
    let out = scene.psql(
        FLAG_IP,
        &scene.job_password,
        &[
            "create table if not exists scratch (a int); insert into scratch values (1), (2)",
            "delete from scratch",
            "select count(*) from scratch",
            "with gone as (delete from scratch returning a) select count(*) from gone",
            "select 1; select * from vault_keys",
            "delete from scratch where a = 1",
            "select count(*) from scratch",
        ],
    );
    let said = text(&out);
    assert!(
        said.contains("UPDATE and DELETE need a WHERE clause"),
        "a bare DELETE is refused with the reason:\n{said}"
    );
    assert!(said.contains("the vault is off limits"), "a statement touching the vault is refused:\n{said}");
    let counts: Vec<&str> = said.lines().filter(|l| l.trim().parse::<u32>().is_ok()).collect();
    assert_eq!(counts, ["2", "1"], "the refused statements never ran; the bounded one did:\n{said}");
    // A query PostgreSQL's grammar rejects is refused by the gateway (42601),
    // never sent on for the server to interpret.
    let out = scene.psql(FLAG_IP, &scene.job_password, &["selec 1", "select 42"]);
    let said = text(&out);
    assert!(said.contains("does not parse as PostgreSQL SQL"), "refused by the gateway:\n{said}");
    assert!(said.lines().any(|l| l.trim() == "42"), "the session goes on:\n{said}");
    let explained = scene.gw.cli(&[
        "policy",
        "explain",
        "--host",
        FLAG_IP,
        "--port",
        &port.to_string(),
        "--database",
        "app",
        "--sql",
        "delete from scratch",
    ]);
    let explained = ok("policy explain --sql", &explained);
    assert!(explained.contains("bounded-deletes"), "explain names the deciding rule:\n{explained}");

    // --- replication connections are refused (WAL cannot be judged).
    let mut cmd = scene.gw.command_in_cgroup("psql");
    cmd.env("PGPASSWORD", &scene.job_password).args([
        "-X",
        "-At",
        &format!("{} replication=database", scene.conninfo(FLAG_IP)),
        "-c",
        "IDENTIFY_SYSTEM",
    ]);
    let out = run(cmd);
    let said = text(&out);
    assert!(!out.status.success() && said.contains("replication"), "a replication connection is refused:\n{said}");

    // --- swap: a wrong (old) password in the job, the held one upstream.
    let out = scene.psql(SWAP_IP, "an-old-password-that-no-longer-works", &["select current_user"]);
    assert_eq!(ok("psql through swap", &out).trim(), "ci_swap", "the server saw the gateway-held login");
    let swapped = scene.findings_of("postgres-password", SWAP_IP);
    assert!(swapped.iter().any(|f| f["action"] == "swap"), "swap finding: {swapped:?}");

    // --- queries, simple and extended: pgbench (its initialisation uses COPY).
    let init = scene.pgbench(FLAG_IP, &["-i", "-s", "1", "-q"]);
    ok("pgbench -i", &init);
    for mode in ["simple", "extended", "prepared"] {
        let run = scene.pgbench(FLAG_IP, &["-c", "2", "-j", "2", "-t", "40", "-M", mode, "-n"]);
        let report = ok(&format!("pgbench -M {mode}"), &run);
        assert!(report.contains("number of transactions actually processed: 80/80"), "pgbench -M {mode}:\n{report}");
        assert!(report.contains("number of failed transactions: 0"), "pgbench -M {mode}:\n{report}");
    }
    // Throughput, for information (debug build, loaded host: not asserted):
    // select-only through the gateway and directly (outside the cgroup).
    let select_only = ["-S", "-c", "4", "-j", "2", "-T", "5", "-n", "-M", "prepared"];
    let through = tps(&ok("pgbench -S through", &scene.pgbench(FLAG_IP, &select_only)));
    let mut direct = Command::new("pgbench");
    direct
        .env("PGPASSWORD", &scene.job_password)
        .args(select_only)
        .arg(format!("host={FLAG_IP} port={port} user=ci dbname=app sslmode=require"));
    let direct = tps(&ok("pgbench -S direct", &run(direct)));
    eprintln!(
        "pgbench select-only, 4 clients: {through:.0} tps through the gateway, {direct:.0} tps direct ({:.2}x)",
        through / direct
    );
    let counted = scene.psql(FLAG_IP, &scene.job_password, &["select count(*) from pgbench_accounts"]);
    assert_eq!(ok("count", &counted).trim(), "100000", "COPY through the gateway loaded every row");

    // --- keys in SQL: flagged ones pass as findings, blocked ones are refused
    // with 42501 and the session goes on.
    let openai = keys::openai_key();
    let github = keys::github_token();
    let out = scene.psql(
        FLAG_IP,
        &scene.job_password,
        &[&format!("select length('{openai}')"), &format!("select '{github}'"), "select 41 + 1"],
    );
    let said = text(&out);
    assert!(said.contains(&openai.len().to_string()), "the flagged key's query ran:\n{said}");
    assert!(said.contains("blocked") && said.contains("github-pat"), "the blocked key's query was refused:\n{said}");
    assert!(said.contains("42\n") || said.ends_with("42"), "the session went on after the refusal:\n{said}");
    assert!(!said.contains(&github), "the blocked key is not echoed back");
    let sql_findings = scene.findings_of("openai-project-key", FLAG_IP);
    assert!(
        sql_findings.iter().any(|f| f["location"] == "postgres:query" && f["action"] == "flag"),
        "{sql_findings:?}"
    );
    assert!(!scene.server.log().contains(&github), "the blocked key never reached the server");

    // --- a key in a bind parameter (psycopg binds server-side: extended
    // protocol); refused, then the same connection goes on.
    let script = format!(
        r#"
import os, psycopg
conn = psycopg.connect(os.environ["DSN"], autocommit=True)
print("bound", conn.execute("select %s::text", ("{openai}",)).fetchone()[0] == "{openai}")
try:
    conn.execute("select %s::text", ("{github}",))
    print("NOT REFUSED")
except psycopg.errors.InsufficientPrivilege as e:
    print("refused", e.sqlstate, "github-pat" in str(e))
print("after", conn.execute("select %s::int + 1", (41,)).fetchone()[0])
with conn.transaction():
    conn.execute("create temp table t (v text)")
    with conn.cursor().copy("copy t from stdin") as copy:
        for i in range(1000):
            copy.write_row((f"row {{i}}",))
print("copied", conn.execute("select count(*) from t").fetchone()[0])
"#
    );
    let out = scene.python(FLAG_IP, &script);
    let said = ok("psycopg", &out);
    assert!(said.contains("bound True"), "{said}");
    assert!(said.contains("refused 42501 True"), "{said}");
    assert!(said.contains("after 42"), "{said}");
    assert!(said.contains("copied 1000"), "{said}");
    let bind_findings = scene.findings_of("openai-project-key", FLAG_IP);
    assert!(bind_findings.iter().any(|f| f["location"] == "postgres:bind:$1"), "{bind_findings:?}");

    // --- cancel: pg_sleep cancelled through the gateway's cancel key.
    let script = r#"
import os, threading, time, psycopg
conn = psycopg.connect(os.environ["DSN"])
def later():
    time.sleep(1.5)
    conn.cancel_safe()
threading.Thread(target=later).start()
t = time.time()
try:
    conn.execute("select pg_sleep(60)")
    print("NOT CANCELLED")
except psycopg.errors.QueryCanceled:
    print("cancelled after", round(time.time() - t))
"#;
    let started = Instant::now();
    let out = scene.python(FLAG_IP, script);
    let said = ok("psycopg cancel", &out);
    assert!(said.contains("cancelled after"), "{said}");
    assert!(started.elapsed() < Duration::from_secs(30), "the cancel took effect at once");

    // --- a malformed message (an unknown type after login) is refused.
    let script = format!(
        r#"
import socket, struct
s = socket.create_connection(("{FLAG_IP}", {port}))
def msg(t, body): return t + struct.pack("!I", len(body) + 4) + body
params = b"user\0ci\0database\0app\0\0"
s.sendall(struct.pack("!II", len(params) + 8, 196608) + params)
def read():
    t = s.recv(1)
    if not t: return None, b""
    n = struct.unpack("!I", s.recv(4, socket.MSG_WAITALL))[0]
    return t, s.recv(n - 4, socket.MSG_WAITALL) if n > 4 else b""
t, b = read(); assert t == b"R" and b == struct.pack("!I", 3), (t, b)
import os
s.sendall(msg(b"p", os.environ["PGPASSWORD"].encode() + b"\0"))
while True:
    t, b = read()
    assert t is not None and t != b"E", b
    if t == b"Z": break
# A fastpath FunctionCall (int4abs(-5), oid looked up first) names no SQL:
# judged as a `call`, which the policy denies.
s.sendall(msg(b"Q", b"select 'int4abs'::regproc::oid\0"))
oid = None
while True:
    t, b = read()
    assert t is not None and t != b"E", b
    if t == b"D": oid = int(b[6:])
    if t == b"Z": break
s.sendall(msg(b"F", struct.pack("!IhhI", oid, 0, 1, 2) + b"-5" + struct.pack("!h", 0)))
answers = []
while True:
    t, b = read()
    answers.append(t)
    if t == b"E": print("call refused", b"42501" in b, b"function calls are not for CI" in b)
    if t == b"Z": break
print("call answers", b"".join(answers).decode())
s.sendall(msg(b"z", b"garbage"))
t, b = read()
print("answer", t.decode(), b"08P01" in b, b"unexpected message type" in b)
print("closed", read()[0] is None)
"#
    );
    let out = scene.python(FLAG_IP, &script);
    let said = ok("raw client", &out);
    assert!(said.contains("call refused True True"), "a fastpath call is judged as `call`: {said}");
    assert!(said.contains("call answers EZ"), "refused, never run (no FunctionCallResponse): {said}");
    assert!(said.contains("answer E True True"), "{said}");
    assert!(said.contains("closed True"), "{said}");

    // --- recording: sessions as postgres, statements and results, replayable.
    let export = |sessions: &[Value]| {
        let mut exported = String::new();
        for s in sessions {
            let id = s["session"].as_str().or(s["id"].as_str()).expect("session id");
            exported.push_str(&String::from_utf8_lossy(&scene.gw.cli(&["sessions", "export", id]).stdout));
        }
        exported
    };
    // The malformed client's session is the last to end.
    let (sessions, exported) = wait_for("the recorded sessions", || {
        let all = scene.cli_json(&["sessions", "list", "--json"]).as_array().cloned().unwrap_or_default();
        let exported = export(&all);
        if exported.contains("unexpected message type 'z'") {
            Ok((all, exported))
        } else {
            Err(format!("{} sessions so far, the refused one not yet", all.len()))
        }
    });
    let mut replayed = String::new();
    for s in &sessions {
        let id = s["session"].as_str().or(s["id"].as_str()).expect("session id");
        let out = scene.gw.cli(&["sessions", "replay", id]);
        replayed.push_str(&ok("sessions replay", &out));
        let out = scene.gw.cli(&["sessions", "verify", id]);
        ok("sessions verify", &out);
    }
    let tail = |s: &str| s.chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect::<String>();
    assert!(replayed.contains("=> select current_user"), "statements are replayed:\n{}", tail(&replayed));
    assert!(
        replayed.contains("server TLSv1_3 SCRAM-SHA-256-PLUS"),
        "the gateway logged in over TLS with SCRAM and channel binding:\n{}",
        tail(&replayed)
    );
    assert!(replayed.contains("   SELECT 1"), "command tags are replayed:\n{}", tail(&replayed));
    assert!(!replayed.contains(&github) && !replayed.contains(&openai), "keys are masked in recordings");

    // --- no password in clear anywhere the gateway wrote.
    let findings = serde_json::to_string(&scene.findings()).expect("json");
    assert!(
        exported.contains("unexpected message type 'z'") && exported.contains("\\\"uninspectable\\\""),
        "the refused message is recorded as a refusal: {}",
        exported.lines().filter(|l| l.contains("refused")).collect::<Vec<_>>().join("\n")
    );
    assert!(!exported.contains(&github) && !exported.contains(&openai), "keys are masked in exports");
    let log = scene.gw.log();
    let mut files = Vec::new();
    collect_files(&scene.gw.dir.path().join("state"), &mut files);
    for (name, secret) in [("the job's password", &scene.job_password), ("the held password", &scene.swap_password)] {
        assert!(!log.contains(secret.as_str()), "{name} is in the gateway's log");
        assert!(!findings.contains(secret.as_str()), "{name} is in the findings");
        assert!(!exported.contains(secret.as_str()), "{name} is in a session export");
        assert!(!replayed.contains(secret.as_str()), "{name} is in a replay");
        for (path, bytes) in &files {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "{name} is in {}", path.display());
        }
    }
    let events = scene.gw.connection_events();
    assert!(events.iter().any(|e| e["protocol"] == "postgres"), "connection events say postgres");
}

/// The `tps = …` figure of a pgbench report.
fn tps(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in the pgbench report:\n{report}"))
}

fn collect_files(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
}

/// A PostgreSQL driver nobody here wrote, run in the intercepted cgroup
/// against `FLAG_IP`. Each runs the same script (see [`CLIENT_SCRIPT_LINES`])
/// with `HOST`, `PORT`, `CA` (the gateway's CA), `PGPASSWORD` (the job's
/// password), `KEY_FLAG` (a key the gateway flags), `KEY_BLOCK` (one it
/// blocks) and `TABLE` in its environment; with `LOGIN_ONLY` set it stops
/// after printing `user <current_user>`; with `CANCEL` set it cancels a
/// long query through the gateway and prints `cancelled true`; with
/// `APPROVE` set it executes one UPDATE twice, each execution held for
/// approval (see [`APPROVED_LINES`]); with `COPY` set it copies rows in,
/// one of them with `KEY_BLOCK` (see [`COPIED_LINES`]).
#[derive(Debug, Clone, Copy)]
enum Driver {
    /// asyncpg (PyPI): its own protocol code, binary formats, its own SCRAM.
    Asyncpg,
    /// node-postgres (`pg` from npm).
    NodePg,
    /// pgjdbc (Debian's `libpostgresql-jdbc-java`).
    Jdbc,
    /// tokio-postgres (tests/bin/pg_tokio_client.rs): binary formats,
    /// rustls.
    TokioPostgres,
}

/// Every driver, in the order the test runs them.
const DRIVERS: [Driver; 4] = [Driver::Asyncpg, Driver::NodePg, Driver::TokioPostgres, Driver::Jdbc];

/// What every driver prints when everything goes as it should (`denied`
/// is followed by the driver's error text).
const CLIENT_SCRIPT_LINES: [&str; 6] =
    ["user ci", "bound true", "refused 42501 true false", "after 42", "denied 42501 ", "count 2"];

/// What every driver prints in `APPROVE` mode: the first execution
/// approved (two rows updated), the second denied by the approver (the
/// driver's error says so), and the session going on.
const APPROVED_LINES: [&str; 4] = ["user ci", "approved 2", "rejected 42501 true", "after 2"];

/// What every driver prints in `COPY` mode: two clean rows copied in, a row
/// carrying a blocked key refused (the server ends the COPY with the
/// gateway's CopyFail: 57014), and nothing of it in the table.
const COPIED_LINES: [&str; 4] = ["user ci", "copied 2", "copy refused 57014 true", "count 2"];

/// Updates with a WHERE clause need a DBA's approval (each execution).
const APPROVAL_RULES: &str =
    "\x20 - name: updates-need-approval\n    match: { postgres: { kind: [update], where: true } }\n\
                              \x20   action: require_approval\n    reason: \"updates need a DBA\"\n\
                              \x20   approval: { group: dba, min_approvals: 1, timeout: 60s }\n";

const ASYNCPG_SCRIPT: &str = r#"
import asyncio, os, ssl, time, asyncpg
async def main():
    ctx = ssl.create_default_context(cafile=os.environ["CA"])
    conn = await asyncpg.connect(host=os.environ["HOST"], port=int(os.environ["PORT"]), user="ci",
                                 database="app", password=os.environ["PGPASSWORD"], ssl=ctx)
    table = os.environ["TABLE"]
    print("user", await conn.fetchval("select current_user"))
    if os.environ.get("LOGIN_ONLY"):
        await conn.close()
        return
    if os.environ.get("CANCEL"):
        # On a timeout asyncpg cancels the query (a CancelRequest on a new
        # connection); the next query only answers once the sleep is gone.
        t = time.monotonic()
        try:
            await conn.fetchval("select pg_sleep(60)", timeout=1)
        except asyncio.TimeoutError:
            pass
        print("cancelled", str(await conn.fetchval("select 1") == 1 and time.monotonic() - t < 20).lower())
        await conn.close()
        return
    if os.environ.get("COPY"):
        # asyncpg's COPY is in binary format.
        t = table + "_copy"
        await conn.execute(f"create table {t} (v text)")
        await conn.copy_records_to_table(t, records=[("clean one",), ("clean two",)])
        print("copied", await conn.fetchval(f"select count(*) from {t}"))
        try:
            await conn.copy_records_to_table(t, records=[("deploy " + os.environ["KEY_BLOCK"],)])
            print("NOT REFUSED")
        except asyncpg.PostgresError as e:
            print("copy refused", e.sqlstate, str("CI gateway" in str(e)).lower())
        print("count", await conn.fetchval(f"select count(*) from {t}"))
        await conn.close()
        return
    if os.environ.get("APPROVE"):
        # asyncpg prepares the statement once and binds it twice: each
        # execution is held on its own.
        q, flag = f"update {table} set a = a + 10 where a > $1 and $2::text <> ''", os.environ["KEY_FLAG"]
        print("approved", (await conn.execute(q, 0, flag)).split()[-1])
        try:
            await conn.execute(q, 100, flag)
            print("NOT HELD")
        except asyncpg.exceptions.InsufficientPrivilegeError as e:
            print("rejected", e.sqlstate, str("approval" in str(e).lower()).lower())
        print("after", await conn.fetchval(f"select count(*) from {table} where a > 10"))
        await conn.close()
        return
    flag, block = os.environ["KEY_FLAG"], os.environ["KEY_BLOCK"]
    print("bound", str(await conn.fetchval("select $1::text", flag) == flag).lower())
    try:
        await conn.fetchval("select $1::text", block)
        print("NOT REFUSED")
    except asyncpg.exceptions.InsufficientPrivilegeError as e:
        print("refused", e.sqlstate, str("github-pat" in str(e)).lower(), str(block in str(e)).lower())
    print("after", await conn.fetchval("select $1::int + 1", 41))
    await conn.execute(f"create table {table} (a int)")
    await conn.execute(f"insert into {table} values (1), (2)")
    try:
        await conn.execute(f"delete from {table}")
        print("NOT DENIED")
    except asyncpg.exceptions.InsufficientPrivilegeError as e:
        print("denied", e.sqlstate, str(e))
    print("count", await conn.fetchval(f"select count(*) from {table}"))
    await conn.close()
asyncio.run(main())
"#;

const NODE_PG_SCRIPT: &str = r#"
const { Client } = require('pg');
const fs = require('fs');
const env = process.env;
(async () => {
  const c = new Client({ host: env.HOST, port: Number(env.PORT), user: 'ci', database: 'app',
                         password: env.PGPASSWORD, ssl: { ca: fs.readFileSync(env.CA) } });
  await c.connect();
  console.log('user', (await c.query('select current_user as u')).rows[0].u);
  if (env.LOGIN_ONLY) { await c.end(); return; }
  if (env.COPY) {
    const { from } = require('pg-copy-streams');
    const t = `${env.TABLE}_copy`;
    await c.query(`create table ${t} (v text)`);
    const copy = (rows) => new Promise((resolve, reject) => {
      const stream = c.query(from(`copy ${t} from stdin`));
      stream.on('error', reject);
      stream.on('finish', resolve);
      stream.end(rows);
    });
    await copy('clean one\nclean two\n');
    console.log('copied', (await c.query(`select count(*)::int as n from ${t}`)).rows[0].n);
    try {
      await copy(`deploy ${env.KEY_BLOCK}\n`);
      console.log('NOT REFUSED');
    } catch (e) {
      console.log('copy refused', e.code, e.message.includes('CI gateway'));
    }
    console.log('count', (await c.query(`select count(*)::int as n from ${t}`)).rows[0].n);
    await c.end();
    return;
  }
  if (env.APPROVE) {
    const q = `update ${env.TABLE} set a = a + 10 where a > $1 and $2::text <> ''`;
    console.log('approved', (await c.query(q, [0, env.KEY_FLAG])).rowCount);
    try {
      await c.query(q, [100, env.KEY_FLAG]);
      console.log('NOT HELD');
    } catch (e) {
      console.log('rejected', e.code, e.message.toLowerCase().includes('approval'));
    }
    console.log('after', (await c.query(`select count(*)::int as n from ${env.TABLE} where a > 10`)).rows[0].n);
    await c.end();
    return;
  }
  const bound = await c.query('select $1::text as v', [env.KEY_FLAG]);
  console.log('bound', bound.rows[0].v === env.KEY_FLAG);
  try {
    await c.query('select $1::text as v', [env.KEY_BLOCK]);
    console.log('NOT REFUSED');
  } catch (e) {
    console.log('refused', e.code, e.message.includes('github-pat'), e.message.includes(env.KEY_BLOCK));
  }
  console.log('after', (await c.query('select $1::int + 1 as v', [41])).rows[0].v);
  await c.query(`create table ${env.TABLE} (a int)`);
  await c.query(`insert into ${env.TABLE} values (1), (2)`);
  try {
    await c.query(`delete from ${env.TABLE}`);
    console.log('NOT DENIED');
  } catch (e) {
    console.log('denied', e.code, e.message);
  }
  console.log('count', (await c.query(`select count(*)::int as n from ${env.TABLE}`)).rows[0].n);
  await c.end();
})().catch((e) => { console.error('client error', e.code, e.message); process.exit(1); });
"#;

const JDBC_SOURCE: &str = r#"
import java.sql.*;
import java.util.Properties;

public class PgClient {
    public static void main(String[] args) throws Exception {
        var env = System.getenv();
        String url = "jdbc:postgresql://" + env.get("HOST") + ":" + env.get("PORT")
            + "/app?sslmode=verify-full&sslrootcert=" + env.get("CA");
        Properties props = new Properties();
        props.setProperty("user", "ci");
        props.setProperty("password", env.get("PGPASSWORD"));
        String table = env.get("TABLE"), flag = env.get("KEY_FLAG"), block = env.get("KEY_BLOCK");
        try (Connection c = DriverManager.getConnection(url, props); Statement s = c.createStatement()) {
            try (ResultSet r = s.executeQuery("select current_user")) {
                r.next();
                System.out.println("user " + r.getString(1));
            }
            if (env.get("LOGIN_ONLY") != null) return;
            if (env.get("CANCEL") != null) {
                long t = System.nanoTime();
                new Thread(() -> {
                    try { Thread.sleep(1000); s.cancel(); } catch (Exception e) { e.printStackTrace(); }
                }).start();
                try {
                    s.execute("select pg_sleep(60)");
                    System.out.println("NOT CANCELLED");
                } catch (SQLException e) {
                    System.out.println("cancelled " + ("57014".equals(e.getSQLState()) && System.nanoTime() - t < 20_000_000_000L));
                }
                return;
            }
            if (env.get("COPY") != null) {
                String t = table + "_copy";
                s.execute("create table " + t + " (v text)");
                var copy = new org.postgresql.copy.CopyManager(c.unwrap(org.postgresql.core.BaseConnection.class));
                copy.copyIn("copy " + t + " from stdin", new java.io.StringReader("clean one\nclean two\n"));
                try (ResultSet r = s.executeQuery("select count(*) from " + t)) {
                    r.next();
                    System.out.println("copied " + r.getLong(1));
                }
                try {
                    copy.copyIn("copy " + t + " from stdin", new java.io.StringReader("deploy " + block + "\n"));
                    System.out.println("NOT REFUSED");
                } catch (SQLException e) {
                    System.out.println("copy refused " + e.getSQLState() + " " + String.valueOf(e.getMessage()).contains("CI gateway"));
                }
                try (ResultSet r = s.executeQuery("select count(*) from " + t)) {
                    r.next();
                    System.out.println("count " + r.getLong(1));
                }
                return;
            }
            if (env.get("APPROVE") != null) {
                String q = "update " + table + " set a = a + 10 where a > ? and ?::text <> ''";
                try (PreparedStatement p = c.prepareStatement(q)) {
                    p.setInt(1, 0);
                    p.setString(2, flag);
                    System.out.println("approved " + p.executeUpdate());
                    p.setInt(1, 100);
                    try {
                        p.executeUpdate();
                        System.out.println("NOT HELD");
                    } catch (SQLException e) {
                        String m = String.valueOf(e.getMessage()).toLowerCase();
                        System.out.println("rejected " + e.getSQLState() + " " + m.contains("approval"));
                    }
                }
                try (ResultSet r = s.executeQuery("select count(*) from " + table + " where a > 10")) {
                    r.next();
                    System.out.println("after " + r.getLong(1));
                }
                return;
            }
            try (PreparedStatement p = c.prepareStatement("select ?::text")) {
                p.setString(1, flag);
                try (ResultSet r = p.executeQuery()) {
                    r.next();
                    System.out.println("bound " + flag.equals(r.getString(1)));
                }
            }
            try (PreparedStatement p = c.prepareStatement("select ?::text")) {
                p.setString(1, block);
                p.executeQuery();
                System.out.println("NOT REFUSED");
            } catch (SQLException e) {
                String m = String.valueOf(e.getMessage());
                System.out.println("refused " + e.getSQLState() + " " + m.contains("github-pat") + " " + m.contains(block));
            }
            try (PreparedStatement p = c.prepareStatement("select ?::int + 1")) {
                p.setInt(1, 41);
                try (ResultSet r = p.executeQuery()) {
                    r.next();
                    System.out.println("after " + r.getInt(1));
                }
            }
            s.execute("create table " + table + " (a int)");
            s.execute("insert into " + table + " values (1), (2)");
            try {
                s.execute("delete from " + table);
                System.out.println("NOT DENIED");
            } catch (SQLException e) {
                System.out.println("denied " + e.getSQLState() + " " + e.getMessage());
            }
            try (ResultSet r = s.executeQuery("select count(*) from " + table)) {
                r.next();
                System.out.println("count " + r.getLong(1));
            }
        }
    }
}
"#;

/// Where `cargo xtask setup` installs node-postgres (`npm install pg`):
/// `$HOME/.cache/ci-gateway/npm/node_modules`.
fn node_modules() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/ci-gateway/npm/node_modules")
}

/// Debian's pgjdbc jar.
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

impl Driver {
    /// The table this driver creates (one per driver: they share a database).
    fn table(self) -> &'static str {
        match self {
            Driver::Asyncpg => "scratch_asyncpg",
            Driver::NodePg => "scratch_node",
            Driver::Jdbc => "scratch_jdbc",
            Driver::TokioPostgres => "scratch_tokio",
        }
    }

    /// The `comm` the gateway attributes the driver's connections to.
    fn comm(self) -> &'static str {
        match self {
            Driver::Asyncpg => "asyncpg",
            Driver::NodePg => "node",
            Driver::Jdbc => "java",
            Driver::TokioPostgres => "pg-tokio-client",
        }
    }

    /// [`Driver::command`] to `ip` with `password`, the gateway's CA and the
    /// driver's table in its environment (the script's mode and keys are
    /// the caller's to add).
    fn to(self, scene: &Scene, ip: &str, password: &str) -> Command {
        let mut cmd = self.command(scene);
        cmd.env("HOST", ip)
            .env("PORT", scene.server.port.to_string())
            .env("CA", &scene.gateway_ca)
            .env("PGPASSWORD", password)
            .env("TABLE", self.table());
        cmd
    }

    /// The driver's command in the intercepted cgroup, failing loudly when
    /// the driver is not installed.
    fn command(self, scene: &Scene) -> Command {
        let installed = |what: &str, out: std::io::Result<Output>| {
            let out = out.unwrap_or_else(|e| panic!("{what}: {e}: run `cargo xtask setup`"));
            assert!(out.status.success(), "{what} is not installed: run `cargo xtask setup`\n{}", text(&out));
        };
        match self {
            Driver::Asyncpg => {
                let python = gateway_tests::python_named(scene.gw.dir.path(), self.comm());
                installed(
                    "asyncpg (pip install asyncpg)",
                    Command::new(&python).args(["-c", "import asyncpg"]).output(),
                );
                let mut cmd = scene.gw.command_in_cgroup(python);
                cmd.args(["-c", ASYNCPG_SCRIPT]);
                cmd
            }
            Driver::NodePg => {
                let modules = node_modules();
                installed(
                    "node-postgres (npm install pg)",
                    Command::new("node").env("NODE_PATH", &modules).args(["-e", "require('pg')"]).output(),
                );
                let mut cmd = scene.gw.command_in_cgroup("node");
                cmd.env("NODE_PATH", &modules).args(["-e", NODE_PG_SCRIPT]);
                cmd
            }
            Driver::Jdbc => {
                assert!(
                    Path::new(JDBC_JAR).is_file(),
                    "pgjdbc is not installed at {JDBC_JAR}: install Debian's libpostgresql-jdbc-java (cargo xtask setup)"
                );
                let source = scene.gw.dir.path().join("PgClient.java");
                std::fs::write(&source, JDBC_SOURCE).expect("write the JDBC client");
                // The single-file source launcher (JDK 11+) compiles and runs it.
                let mut cmd = scene.gw.command_in_cgroup("java");
                cmd.args(["-cp", JDBC_JAR]).arg(source);
                cmd
            }
            Driver::TokioPostgres => scene.gw.command_in_cgroup(env!("CARGO_BIN_EXE_pg-tokio-client")),
        }
    }
}

#[test]
fn postgres_real_drivers() {
    gateway_tests::require_root();
    let scene = Scene::with_rules("postgres-drivers", APPROVAL_RULES);
    let mut keys_used = Vec::new();
    for driver in DRIVERS {
        let started = Instant::now();
        let (flag, block) = (keys::openai_key(), keys::github_token());
        let mut cmd = driver.to(&scene, FLAG_IP, &scene.job_password);
        cmd.env("KEY_FLAG", &flag).env("KEY_BLOCK", &block);
        let out = run(cmd);
        let said = ok(&format!("{driver:?}"), &out);
        let lines: Vec<&str> = said.lines().collect();
        assert_eq!(lines.len(), CLIENT_SCRIPT_LINES.len(), "{driver:?} printed:\n{said}");
        for (line, want) in lines.iter().zip(CLIENT_SCRIPT_LINES) {
            assert!(line.starts_with(want), "{driver:?}: expected `{want}…`, got `{line}`:\n{said}");
        }
        assert!(
            lines[4].contains("UPDATE and DELETE need a WHERE clause"),
            "{driver:?} shows the gateway's reason for the denied statement:\n{said}"
        );
        // The flagged key in a bind parameter is a finding of this driver's process.
        let bound = wait_for(&format!("{driver:?}'s bind-parameter finding"), || {
            let found: Vec<Value> = scene
                .findings_of("openai-project-key", FLAG_IP)
                .into_iter()
                .filter(|f| f["location"] == "postgres:bind:$1" && f["process"]["comm"] == driver.comm())
                .collect();
            if found.is_empty() {
                Err(format!("none yet among {:?}", scene.findings_of("openai-project-key", FLAG_IP)))
            } else {
                Ok(found)
            }
        });
        assert!(bound.iter().any(|f| f["action"] == "flag"), "{driver:?}: {bound:?}");
        let blocked = scene.findings_of("github-pat", FLAG_IP);
        assert!(
            blocked.iter().any(|f| f["action"] == "block" && f["process"]["comm"] == driver.comm()),
            "{driver:?}'s blocked key is a finding: {blocked:?}"
        );
        assert!(!scene.server.log().contains(&block), "{driver:?}: the blocked key never reached the server");
        let logins = scene.findings_of("postgres-password", FLAG_IP);
        assert!(
            logins.iter().any(|f| f["action"] == "flag" && f["process"]["comm"] == driver.comm()),
            "{driver:?}'s hard-coded password is a flagged finding: {logins:?}"
        );
        eprintln!("{driver:?}: passed in {:.1}s; {}", started.elapsed().as_secs_f64(), lines[4]);
        keys_used.push(flag);
        keys_used.push(block);
    }

    // Swap: the job's connection string holds an old password; the server
    // sees the login the gateway holds.
    for driver in DRIVERS {
        let mut cmd = driver.to(&scene, SWAP_IP, "an-old-password-that-no-longer-works");
        cmd.env("LOGIN_ONLY", "1");
        let said = ok(&format!("{driver:?} through swap"), &run(cmd));
        assert_eq!(said.trim(), "user ci_swap", "{driver:?}: the server saw the gateway-held login");
        let swapped = scene.findings_of("postgres-password", SWAP_IP);
        assert!(
            swapped.iter().any(|f| f["action"] == "swap" && f["process"]["comm"] == driver.comm()),
            "{driver:?}'s swapped password is a finding: {swapped:?}"
        );
    }

    // No password and no key in clear anywhere the gateway wrote.
    // Cancel through the gateway's cancel key (node-postgres has no cancel).
    for driver in [Driver::Asyncpg, Driver::TokioPostgres, Driver::Jdbc] {
        let mut cmd = driver.to(&scene, FLAG_IP, &scene.job_password);
        cmd.env("CANCEL", "1");
        let said = ok(&format!("{driver:?} cancel"), &run(cmd));
        assert_eq!(said.trim(), "user ci\ncancelled true", "{driver:?}: the cancel took effect at once");
    }

    // Approval, one execution at a time: each driver prepares one UPDATE
    // and executes it twice; the first execution is approved, the second
    // denied, and the session goes on. Approvers see the statement and the
    // values bound to it, the key among them masked.
    for driver in DRIVERS {
        let flag = keys::openai_key();
        let mut cmd = driver.to(&scene, FLAG_IP, &scene.job_password);
        cmd.env("KEY_FLAG", &flag).env("APPROVE", "1");
        let client = std::thread::spawn(move || run(cmd));
        let mut seen = Vec::new();
        for verb in ["approve", "deny"] {
            let held = scene.next_approval(driver.comm(), &seen);
            let preview = held["body_preview"].as_str().expect("body_preview");
            assert_eq!(held["rule"], "updates-need-approval", "{driver:?}: {held:#}");
            assert_eq!(held["method"], "SQL", "{driver:?}: {held:#}");
            assert!(
                held["url"].as_str().is_some_and(|u| u.starts_with("postgres://ci@") && u.ends_with("/app")),
                "{driver:?}: {held:#}"
            );
            assert!(preview.contains(&format!("update {}", driver.table())), "{driver:?}: {preview}");
            assert!(
                preview.contains("$1 = ") && preview.contains("$2 = '[MASKED:"),
                "{driver:?} shows the values masked: {preview}"
            );
            assert!(!preview.contains(&flag), "{driver:?}: the key bound is in the approval in clear");
            let id = held["id"].as_str().expect("id").to_owned();
            ok(&format!("{driver:?}: approvals {verb}"), &scene.decide(&id, verb));
            seen.push(id);
        }
        let out = client.join().expect("client thread");
        let said = ok(&format!("{driver:?} approvals"), &out);
        let lines: Vec<&str> = said.lines().collect();
        assert_eq!(lines, APPROVED_LINES, "{driver:?} printed:\n{said}");
        assert!(!said.contains(&flag));
        keys_used.push(flag);
    }

    // COPY in, each driver its own way (asyncpg binary format, pgjdbc's
    // CopyManager, node's pg-copy-streams, tokio-postgres' copy_in): clean
    // rows arrive, a row with a blocked key is refused and never arrives.
    for driver in DRIVERS {
        let block = keys::github_token();
        let mut cmd = driver.to(&scene, FLAG_IP, &scene.job_password);
        cmd.env("KEY_BLOCK", &block).env("COPY", "1");
        let said = ok(&format!("{driver:?} COPY"), &run(cmd));
        assert_eq!(said.lines().collect::<Vec<_>>(), COPIED_LINES, "{driver:?} printed:\n{said}");
        let refused = scene.findings_of("github-pat", FLAG_IP);
        assert!(
            refused.iter().any(|f| f["location"] == "postgres:copy"
                && f["action"] == "block"
                && f["process"]["comm"] == driver.comm()),
            "{driver:?}'s key in COPY data is a blocking finding: {refused:?}"
        );
        assert!(!scene.server.log().contains(&block), "{driver:?}: the blocked key never reached the server");
        keys_used.push(block);
    }

    // psql: a simple Query is held as a whole; a PREPAREd statement that
    // needed approval is held again at every EXECUTE (the gateway does not
    // follow SQL-level names, so each EXECUTE after it is held).
    let table = Driver::TokioPostgres.table();
    let (bump, run_a, run_b) = (
        format!("prepare bump as update {table} set a = a where a > $1"),
        "execute bump(1000)".to_owned(),
        "execute bump(2000)".to_owned(),
    );
    let simple = format!("update {table} set a = a where a > 1000");
    let psql_client = {
        let mut cmd = scene.gw.command_in_cgroup("psql");
        cmd.env("PGPASSWORD", &scene.job_password).args(["-X", "-At", &scene.conninfo(FLAG_IP)]);
        for c in [&simple, &bump, &run_a, &run_b] {
            cmd.args(["-c", c]);
        }
        std::thread::spawn(move || run(cmd))
    };
    let mut seen = Vec::new();
    for want in [&simple, &bump, &run_a, &run_b] {
        let held = scene.next_approval("psql", &seen);
        let preview = held["body_preview"].as_str().expect("body_preview");
        assert!(preview.starts_with(want.as_str()), "psql: the approval shows `{want}`: {preview}");
        if want.starts_with("execute") {
            assert!(preview.contains(&format!("may run what was prepared as: {bump}")), "{preview}");
        }
        let id = held["id"].as_str().expect("id").to_owned();
        ok("psql: approvals approve", &scene.decide(&id, "approve"));
        seen.push(id);
    }
    let said = ok("psql approvals", &psql_client.join().expect("psql thread"));
    assert_eq!(said.lines().collect::<Vec<_>>(), ["UPDATE 0", "PREPARE", "UPDATE 0", "UPDATE 0"], "{said}");

    // Every driver's two sessions recorded (a session is written when it ends).
    let exported = wait_for("the drivers' recorded sessions", || {
        let all = scene.cli_json(&["sessions", "list", "--json"]).as_array().cloned().unwrap_or_default();
        if all.len() < 2 * DRIVERS.len() + 3 {
            return Err(format!("{} sessions so far", all.len()));
        }
        let (mut exported, mut replayed) = (String::new(), String::new());
        for s in &all {
            let id = s["session"].as_str().or(s["id"].as_str()).expect("session id");
            exported.push_str(&ok("sessions export", &scene.gw.cli(&["sessions", "export", id])));
            replayed.push_str(&ok("sessions replay", &scene.gw.cli(&["sessions", "replay", id])));
        }
        Ok((exported, replayed))
    });
    let (exported, replayed) = exported;
    for driver in DRIVERS {
        let denied = format!("delete from {}", driver.table());
        assert!(exported.contains(&denied), "{driver:?}'s denied statement is recorded");
        // Each driver's session replays like a psql transcript: the denied
        // statement with its decision, the approved UPDATE, the COPY.
        let table = driver.table();
        for said in [format!("delete from {table}    [deny]"), format!("update {table} set a = a + 10")] {
            assert!(replayed.contains(&said), "{driver:?}: `{said}` is in the replay");
        }
        let copied = replayed
            .lines()
            .map(str::to_lowercase)
            .any(|l| l.contains(&format!("{table}_copy")) && l.contains("from stdin"));
        assert!(copied, "{driver:?}'s COPY is in the replay");
    }
    assert!(exported.contains("bounded-deletes"), "the deciding rule is recorded");
    let log = scene.gw.log();
    let findings = serde_json::to_string(&scene.findings()).expect("json");
    let mut files = Vec::new();
    collect_files(&scene.gw.dir.path().join("state"), &mut files);
    let secrets = [&scene.job_password, &scene.swap_password].into_iter().chain(keys_used.iter());
    for (n, secret) in secrets.enumerate() {
        assert!(!log.contains(secret.as_str()), "secret #{n} is in the gateway's log");
        assert!(!findings.contains(secret.as_str()), "secret #{n} is in the findings");
        assert!(!exported.contains(secret.as_str()), "secret #{n} is in a session export");
        assert!(!replayed.contains(secret.as_str()), "secret #{n} is in a replay");
        for (path, bytes) in &files {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "secret #{n} is in {}",
                path.display()
            );
        }
    }
}

/// Policy rules of the masking test: `people` masked by column and by
/// detector rules, `big` (100k rows) by column.
const MASK_RULES: &str = "\x20 - name: people\n    match: { postgres: { relations: [people, public.people] } }\n\
                          \x20   action: allow\n    mask: { columns: [ssn, \"*_token\", pin], rules: all }\n\
                          \x20 - name: big\n    match: { postgres: { relations: [big, public.big] } }\n\
                          \x20   action: allow\n    mask: { columns: [secret] }\n";

/// What psql (text format) shows of `people` through the gateway.
const PEOPLE_TEXT: [&str; 3] = [
    "1|alice|[MASKED:column]|[MASKED:column]|[MASKED:column]|10|plain note|{a,b}",
    "2|bob||[MASKED:column]||20|deploy with [MASKED:github-pat] now|{[MASKED:github-pat]}",
    "3|carol|[MASKED:column]|[MASKED:column]|[MASKED:column]|30||",
];

/// What tokio-postgres (binary format) gets of the same rows: a masked
/// `int4` is NULL, a `text[]` holding a key NULL.
const PEOPLE_BINARY: [&str; 7] = [
    "user ci",
    "people 1 alice [MASKED:column] [MASKED:column] NULL 10 plain note a,b",
    "people 2 bob NULL [MASKED:column] NULL 20 deploy with [MASKED:github-pat] now NULL",
    "people 3 carol [MASKED:column] [MASKED:column] NULL 30 NULL NULL",
    "prepared 1 [MASKED:column]",
    "prepared 3 [MASKED:column]",
    "big 100000 100000",
];

/// A scene with [`MASK_RULES`] and the `people` table (with `big` if asked)
/// in database `app`, a planted GitHub token in it: the scene and the key.
fn masked_scene(name: &str, big: bool) -> (Scene, String) {
    let scene = Scene::with_rules(name, MASK_RULES);
    let key = keys::github_token();
    // Written straight to the server (not through the gateway): the key is
    // planted, as if it had been in the database all along.
    scene.server.admin_sql_in(
        "app",
        &format!(
            "CREATE TABLE people (id int PRIMARY KEY, name text, ssn text, api_token text, pin int, score int, \
             note text, tags text[]);\
             INSERT INTO people VALUES (1, 'alice', '123-45-6789', 'tok-a', 1234, 10, 'plain note', '{{a,b}}'),\
             (2, 'bob', NULL, 'tok-b', NULL, 20, 'deploy with {key} now', ARRAY['{key}']),\
             (3, 'carol', '987-65-4321', 'tok-c', 4321, 30, NULL, NULL);\
             GRANT SELECT ON people TO ci;"
        ),
    );
    if big {
        scene.server.admin_sql_in(
            "app",
            "CREATE TABLE big AS SELECT g AS id, md5(g::text) AS secret, repeat('x', 1000) AS pad \
             FROM generate_series(1, 100000) g; GRANT SELECT ON big TO ci;",
        );
    }
    (scene, key)
}

#[test]
fn postgres_result_masking() {
    gateway_tests::require_root();
    let (scene, key) = masked_scene("postgres-mask", true);
    let clean = |said: &str| assert!(!said.contains(&key), "the planted key reached the client");

    // --- psql, text format: masked columns masked, the others intact.
    let out = scene.psql(
        FLAG_IP,
        &scene.job_password,
        &["select id, name, ssn, api_token, pin, score, note, tags from people order by id"],
    );
    let said = ok("psql people", &out);
    clean(&said);
    assert_eq!(said.lines().collect::<Vec<_>>(), PEOPLE_TEXT, "psql sees the rows masked");

    // Rows a later statement returns carry the mask of the one that chose
    // them: cursors and prepared statements.
    let out = scene.psql(
        FLAG_IP,
        &scene.job_password,
        &[
            "begin",
            "declare c cursor for select id, ssn from people order by id",
            "fetch all from c",
            "commit",
            "prepare p as select id, ssn from people where id = 3",
            "execute p",
            "select count(*) from big",
        ],
    );
    let said = ok("psql cursor", &out);
    clean(&said);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines,
        [
            "BEGIN",
            "DECLARE CURSOR",
            "1|[MASKED:column]",
            "2|",
            "3|[MASKED:column]",
            "COMMIT",
            "PREPARE",
            "3|[MASKED:column]",
            "100000"
        ],
        "{said}"
    );

    // A masked column read under another name, in a whole row or in a
    // condition (an oracle) is refused with 42501 naming the rule, never
    // answered in clear; the session goes on, the plain select still masked.
    let out = scene.psql(
        FLAG_IP,
        &scene.job_password,
        &[
            "\\set VERBOSITY verbose",
            "select ssn as x from people where id = 1",
            "select upper(api_token) from people where id = 1",
            "select to_json(p) from people p where id = 1",
            "with c as (select ssn as a from people) select a from c",
            "select id from people where ssn like '1%'",
            "select id, ssn from people where id = 1",
        ],
    );
    let said = text(&out);
    clean(&said);
    for value in ["123-45-6789", "987-65-4321", "tok-a", "TOK-A", "1234"] {
        assert!(!said.contains(value), "a masked value reached the client in clear: {said}");
    }
    assert_eq!(said.matches("ERROR:  42501").count(), 5, "each unmaskable read refused with 42501: {said}");
    assert!(said.contains("rule `people`") && said.contains("masked column `ssn`"), "{said}");
    assert!(said.lines().any(|l| l == "1|[MASKED:column]"), "the plain select is masked: {said}");

    // COPY out of a masked table is refused, not sent in clear.
    let out = scene.psql(FLAG_IP, &scene.job_password, &["copy people to stdout"]);
    let said = text(&out);
    clean(&said);
    assert!(!out.status.success() && said.contains("COPY's data"), "COPY of masked data is refused: {said}");

    // --- tokio-postgres, binary format, while the gateway's memory is watched.
    let mut cmd = Driver::TokioPostgres.to(&scene, FLAG_IP, &scene.job_password);
    cmd.env("MASK", "1").env("KEY", &key);
    let before = scene.gw.rss_kib();
    let client = std::thread::spawn(move || run(cmd));
    let mut peak = before;
    while !client.is_finished() {
        peak = peak.max(scene.gw.rss_kib());
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = client.join().expect("client thread");
    let said = ok("tokio-postgres masked", &out);
    clean(&said);
    assert_eq!(said.lines().collect::<Vec<_>>(), PEOPLE_BINARY, "tokio-postgres sees the rows masked");
    // About 105 MB of rows went through; the gateway held one at a time.
    let grew = peak.saturating_sub(before);
    eprintln!("gateway RSS {before} KiB before the 100k-row result, peak {peak} KiB (+{grew} KiB)");
    assert!(grew < 48 * 1024, "the gateway's RSS grew by {grew} KiB streaming a masked result");

    // --- the recording counts what was masked, never the values.
    let exported = wait_for("the masked sessions", || {
        let all = scene.cli_json(&["sessions", "list", "--json"]).as_array().cloned().unwrap_or_default();
        let mut exported = String::new();
        for s in &all {
            let id = s["session"].as_str().or(s["id"].as_str()).expect("session id");
            exported.push_str(&ok("sessions export", &scene.gw.cli(&["sessions", "export", id])));
        }
        if exported.matches("postgres_rows").count() >= 4 {
            Ok(exported)
        } else {
            Err(format!("{} sessions so far", all.len()))
        }
    });
    assert!(exported.contains("\\\"github-pat\\\""), "masked matches are counted by rule");
    clean(&exported);
    clean(&scene.gw.log());
    let mut files = Vec::new();
    collect_files(&scene.gw.dir.path().join("state"), &mut files);
    for (path, bytes) in &files {
        assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()), "the key is in {}", path.display());
    }
}

/// Statements the differential test runs directly and through the gateway,
/// each in the simple protocol, and in the extended one with text and with
/// binary results: types, NULLs, errors, command tags, notices, a large
/// value, a temporary table (each connection has its own).
const DIFFERENTIAL_STATEMENTS: &[&str] = &[
    "select 1::int2 as a, 2::int4, 3::int8, 1.5::numeric, 2.5::float4, 3.25::float8, true, false",
    "select 'x'::text, 'y'::varchar(3), 'z'::char(2), 'n'::name, '\\xdeadbeef'::bytea, ''::text, null::text",
    "select date '2024-02-29', timestamp '2024-01-02 03:04:05.678', timestamptz '2024-01-02 03:04:05+02', \
     interval '1 day 2 hours', time '12:34:56'",
    "select '6ba7b810-9dad-11d1-80b4-00c04fd430c8'::uuid, '{\"a\": [1, 2]}'::json, '{\"b\": {\"c\": null}}'::jsonb, \
     '192.168.0.1/24'::inet, point(1, 2), 'infinity'::float8, 'NaN'::numeric",
    "select array[1, 2, null]::int[], array['a', 'b c']::text[], row(1, 'a'), '{}'::int[]",
    "select g, g * 2 as twice, g::text || 'x' from generate_series(1, 50) g",
    "select repeat('x', 100000)",
    "values (1, 'one'), (2, 'two')",
    "select 1 / 0",
    "select * from no_such_table",
    "selec 1",
    "create temp table t (id int primary key, v text)",
    "insert into t values (1, 'a'), (2, 'b'), (3, 'c')",
    "update t set v = v || '!' where id < 3",
    "delete from t where id = 3",
    "select * from t order by id",
    "insert into t values (1, 'dup')",
    "drop table if exists no_such_table_either",
    "select id, name, score from people order by id",
    "begin",
    "select 1",
    "commit",
    "",
];

/// Runs [`DIFFERENTIAL_STATEMENTS`] with libpq (psycopg's `pgconn`) and
/// prints one JSON line per statement and mode: status, command tag,
/// SQLSTATE, message (not for 42601: the gateway answers syntax errors
/// itself), column names, types, formats, raw values, notices.
const DIFFERENTIAL_SCRIPT: &str = r#"
import json, os, psycopg
from psycopg import pq
conn = psycopg.connect(os.environ["DSN"], autocommit=True)
notices = []
conn.add_notice_handler(lambda d: notices.append([d.sqlstate, d.message_primary]))
pg = conn.pgconn
F = pq.DiagnosticField
for sql in json.loads(os.environ["STATEMENTS"]):
    for mode in ("simple", "text", "binary"):
        if mode == "simple":
            res = pg.exec_(sql.encode())
        else:
            res = pg.exec_params(sql.encode(), [], result_format=1 if mode == "binary" else 0)
        state = (res.error_field(F.SQLSTATE) or b"").decode()
        out = {
            "sql": sql, "mode": mode, "status": int(res.status), "tag": (res.command_status or b"").decode(),
            "sqlstate": state,
            "message": "" if state == "42601" else (res.error_field(F.MESSAGE_PRIMARY) or b"").decode(),
            "names": [res.fname(c).decode() for c in range(res.nfields)],
            "types": [res.ftype(c) for c in range(res.nfields)],
            "formats": [res.fformat(c) for c in range(res.nfields)],
            "rows": [[None if res.get_value(r, c) is None else res.get_value(r, c).hex()
                      for c in range(res.nfields)] for r in range(res.ntuples)],
            "notices": notices[:],
        }
        notices.clear()
        print(json.dumps(out))
"#;

/// A raw client sends a script of messages (simple and extended, a masked
/// result in text and binary format, a denied statement, a blocked key in
/// a bind parameter) whole, then split in two at every byte boundary, then
/// a byte at a time, and prints whether the answers were the same.
const SPLIT_SCRIPT: &str = r#"
import os, socket, struct, time
s = socket.create_connection((os.environ["HOST"], int(os.environ["PORT"])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def msg(t, body): return t + struct.pack("!I", len(body) + 4) + body
def cstr(x): return x.encode() + b"\0"
def read():
    t = s.recv(1)
    if not t: return None, b""
    n = struct.unpack("!I", s.recv(4, socket.MSG_WAITALL))[0]
    return t, s.recv(n - 4, socket.MSG_WAITALL) if n > 4 else b""
params = b"user\0ci\0database\0app\0\0"
s.sendall(struct.pack("!II", len(params) + 8, 196608) + params)
t, b = read(); assert t == b"R" and b == struct.pack("!I", 3), (t, b)
s.sendall(msg(b"p", os.environ["PGPASSWORD"].encode() + b"\0"))
while True:
    t, b = read()
    assert t is not None and t != b"E", b
    if t == b"Z": break
key = os.environ["KEY"].encode()
script = b"".join([
    msg(b"Q", cstr("select id, ssn, note from people order by id")),
    msg(b"P", cstr("") + cstr("select id, api_token, note from people where id = $1") + struct.pack("!hI", 1, 23)),
    msg(b"B", cstr("") + cstr("") + struct.pack("!hhi", 0, 1, 1) + b"2" + struct.pack("!hh", 1, 1)),
    msg(b"D", b"P" + cstr("")),
    msg(b"E", cstr("") + struct.pack("!i", 0)),
    msg(b"S", b""),
    msg(b"Q", cstr("delete from people")),
    msg(b"P", cstr("") + cstr("select $1::text") + struct.pack("!h", 0)),
    msg(b"B", cstr("") + cstr("") + struct.pack("!hhi", 0, 1, len(key)) + key + struct.pack("!h", 0)),
    msg(b"E", cstr("") + struct.pack("!i", 0)),
    msg(b"S", b""),
    # Pipelined portals of a masked and an unmasked statement, executed out
    # of order: each result gets its own statement's mask.
    msg(b"P", cstr("s1") + cstr("select ssn from people where id = 1") + struct.pack("!h", 0)),
    msg(b"P", cstr("s2") + cstr("select '123-00-0000'::text as ssn") + struct.pack("!h", 0)),
    msg(b"B", cstr("p1") + cstr("s1") + struct.pack("!hhh", 0, 0, 0)),
    msg(b"B", cstr("p2") + cstr("s2") + struct.pack("!hhh", 0, 0, 0)),
    msg(b"E", cstr("p2") + struct.pack("!i", 0)),
    msg(b"E", cstr("p1") + struct.pack("!i", 0)),
    msg(b"C", b"S" + cstr("s1")),
    msg(b"C", b"S" + cstr("s2")),
    msg(b"S", b""),
    msg(b"Q", cstr("select 1")),
])
def exchange(parts):
    for i, p in enumerate(parts):
        if i: time.sleep(0.002)
        s.sendall(p)
    got, ready = b"", 0
    while ready < 6:
        t, b = read()
        assert t is not None, "the gateway closed the connection"
        got += t + struct.pack("!I", len(b) + 4) + b
        if t == b"Z": ready += 1
    return got
ref = exchange([script])
print("reference", ref.count(b"[MASKED:column]"), ref.count(b"123-00-0000"), ref.count(b"[MASKED:github-pat]"), key in ref,
      ref.count(b"42501"), ref.count(b"UPDATE and DELETE need a WHERE clause"))
bad = [k for k in range(1, len(script)) if exchange([script[:k], script[k:]]) != ref]
print("splits", len(script) - 1, "differing", bad[:5])
print("bytewise", exchange([script[i:i + 1] for i in range(len(script))]) == ref)
"#;

#[test]
fn postgres_transparency_and_split_messages() {
    gateway_tests::require_root();
    let (scene, key) = masked_scene("postgres-diff", false);
    let port = scene.server.port;

    // --- (a) differential: the same statements, directly and through the
    // gateway, give the same rows, types, formats, tags, SQLSTATEs, notices.
    let statements = serde_json::to_string(DIFFERENTIAL_STATEMENTS).expect("json");
    let python = gateway_tests::python_named(scene.gw.dir.path(), "pgdiff");
    let mut direct = Command::new(&python);
    direct
        .env(
            "DSN",
            format!(
                "host={FLAG_IP} port={port} user=ci dbname=app sslmode=verify-full sslrootcert={} connect_timeout=30",
                scene.server_ca.display()
            ),
        )
        .env("PGPASSWORD", &scene.job_password)
        .env("STATEMENTS", &statements)
        .args(["-c", DIFFERENTIAL_SCRIPT]);
    let direct = ok("direct", &run(direct));
    let mut through = scene.gw.command_in_cgroup(&python);
    through
        .env("DSN", scene.conninfo(FLAG_IP))
        .env("PGPASSWORD", &scene.job_password)
        .env("STATEMENTS", &statements)
        .args(["-c", DIFFERENTIAL_SCRIPT]);
    let through = ok("through the gateway", &run(through));
    let (direct, through): (Vec<&str>, Vec<&str>) = (direct.lines().collect(), through.lines().collect());
    assert_eq!(direct.len(), DIFFERENTIAL_STATEMENTS.len() * 3, "one line per statement and mode");
    for (d, t) in direct.iter().zip(&through) {
        assert_eq!(d, t, "direct and through the gateway differ");
    }
    assert_eq!(direct.len(), through.len());
    let joined = direct.join("\n");
    for wanted in
        ["\"sqlstate\": \"22012\"", "\"sqlstate\": \"42P01\"", "\"sqlstate\": \"23505\"", "\"tag\": \"UPDATE 2\""]
    {
        assert!(joined.contains(wanted), "the script exercises {wanted}");
    }
    assert!(joined.contains("\"formats\": [1, 1"), "binary results were asked for and given");
    assert!(joined.contains("does not exist, skipping"), "a NOTICE came through");

    // --- (b) every client message split at every byte boundary is read
    // and judged the same.
    let python = gateway_tests::python_named(scene.gw.dir.path(), "pgsplit");
    let mut cmd = scene.gw.command_in_cgroup(python);
    cmd.env("HOST", FLAG_IP)
        .env("PORT", port.to_string())
        .env("PGPASSWORD", &scene.job_password)
        .env("KEY", &key)
        .args(["-c", SPLIT_SCRIPT]);
    let said = ok("split client", &run(cmd));
    assert!(!said.contains(&key), "the key reached the client");
    let lines: Vec<&str> = said.lines().collect();
    // Masked: ssn of alice and carol (text), api_token of bob (binary),
    // alice's ssn by portal (the unmasked statement's `ssn` passes); the key
    // in bob's note (text and binary); refused: the bare DELETE and the
    // blocked key.
    assert_eq!(lines.first(), Some(&"reference 4 1 2 False 2 1"), "{said}");
    assert!(lines.get(1).is_some_and(|l| l.ends_with("differing []")), "{said}");
    assert_eq!(lines.get(2), Some(&"bytewise True"), "{said}");
}

/// A key spelled in SQL's own encodings: escape strings (`E'\x67…'`,
/// octal, `\u`), Unicode escapes (`U&'…'`, `UESCAPE`, `U&"…"`
/// identifiers), `standard_conforming_strings = off`, `bytea` hex and
/// escape formats, `decode(…, 'hex' | 'base64')`; in a query, a bind
/// parameter and COPY data (its text-format escapes, a line padded past
/// the scanner's window). Each is refused like the key written plainly,
/// the clean controls pass, and no form of the key is in anything the
/// gateway wrote.
#[test]
fn postgres_keys_in_sql_encodings() {
    gateway_tests::require_root();
    let scene = Scene::start("pgencode");
    let key = keys::github_token();
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    let hex_escaped: String = key.bytes().map(|b| format!("\\x{b:02x}")).collect();
    let octal: String = key.bytes().map(|b| format!("\\{b:03o}")).collect();
    let u_escaped: String = key.bytes().map(|b| format!("\\u{b:04x}")).collect();
    let unicode: String = key.bytes().map(|b| format!("\\{b:04x}")).collect();
    let unicode_bang: String = key.bytes().map(|b| format!("!{b:04x}")).collect();
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
    };
    let partial = key.replacen("ghp_", "gh\\x70_", 1);

    let keyed = [
        format!("insert into leak (v) values (E'{hex_escaped}')"),
        format!("insert into leak (v) values (E'{octal}')"),
        format!("insert into leak (v) values (E'{u_escaped}')"),
        format!("insert into leak (v) values (E'{partial}')"),
        format!("insert into leak (v) values (U&'{unicode}')"),
        format!("insert into leak (v) values (U&'{unicode_bang}' UESCAPE '!')"),
        format!("create table U&\"{unicode}\" (a int)"),
        format!("insert into leak (b) values (decode('{b64}', 'base64'))"),
        format!("insert into leak (b) values (decode('{hex}', 'hex'))"),
        format!("insert into leak (b) values ('\\x{hex}'::bytea)"),
        format!("insert into leak (b) values ('{octal}'::bytea)"),
    ];
    let clean_hex: String = b"nothing secret in these bytes, really".iter().map(|b| format!("{b:02x}")).collect();
    let mut commands = vec!["create table leak (v text, b bytea)".to_owned()];
    commands.extend(keyed.iter().cloned());
    commands.push("set standard_conforming_strings = off".into());
    commands.push(format!("insert into leak (v) values ('{hex_escaped}')"));
    commands.push("set standard_conforming_strings = on".into());
    commands.push("insert into leak (v) values (E'\\x68\\x65\\x6c\\x6c\\x6f, world, \\150\\151')".into());
    commands.push(format!("insert into leak (b) values (decode('{clean_hex}', 'hex'))"));
    commands.push("select count(*) from leak".into());
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let out = scene.psql(FLAG_IP, &scene.job_password, &commands);
    let said = text(&out);
    let refusals: Vec<&str> = said.lines().filter(|l| l.starts_with("ERROR:") && l.contains("github-pat")).collect();
    assert_eq!(
        refusals.len(),
        keyed.len() + 1,
        "every encoding of the key is refused, naming the finding:\n{}",
        said.replace(&key, "<KEY>")
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().last().map(str::trim), Some("2"), "only the clean controls were inserted:\n{said}");

    // Bind parameters (text format) and COPY data.
    let json: String = key.bytes().map(|b| format!("\\\\u{b:04x}")).collect();
    let copy_escaped: String = key.bytes().map(|b| format!("\\\\{b:03o}")).collect();
    // In the Python source below: each backslash doubled.
    let py_hex_escaped = hex_escaped.replace('\\', "\\\\");
    let script = format!(
        r#"
import os, psycopg
conn = psycopg.connect(os.environ["DSN"], autocommit=True)
def attempt(name, f):
    try:
        f()
        print(name, "PASSED")
    except psycopg.errors.InsufficientPrivilege as e:
        print(name, "refused", "github-pat" in str(e))
    except psycopg.Error as e:
        print(name, "failed", "refused by the CI gateway" in str(e))
attempt("bytea-hex", lambda: conn.execute("insert into leak (b) values (%s::bytea)", ["\\x{hex}"]))
attempt("base64", lambda: conn.execute("insert into leak (b) values (decode(%s, 'base64'))", ["{b64}"]))
attempt("json", lambda: conn.execute("insert into leak (v) values (%s::jsonb->>'k')", ['{{"k":"{json}"}}']))
conn.execute("insert into leak (v) values (%s)", ["a clean parameter"])
def copy(name, data):
    def go():
        with conn.cursor().copy("copy leak (v) from stdin") as c:
            for chunk in data:
                c.write(chunk)
    attempt(name, go)
copy("copy-escaped", ["row one\n", "{py_hex_escaped}\n"])
copy("copy-octal", ["{copy_escaped}\n"])
copy("copy-split", ["{py_hex_escaped}"[:37], "{py_hex_escaped}"[37:] + "\n"])
copy("copy-padded", ["z" * 600000, "{copy_escaped}\n"])
copy("copy-bytea", ["\\\\x{hex}\n"])
copy("copy-clean", ["a clean row\n", "z" * 300000 + "\n"])
print("count", conn.execute("select count(*) from leak").fetchone()[0])
"#
    );
    let out = scene.python(FLAG_IP, &script);
    let said = ok("psycopg", &out);
    for name in ["bytea-hex", "base64", "json"] {
        assert!(said.contains(&format!("{name} refused True")), "{name}:\n{}", said.replace(&key, "<KEY>"));
    }
    for name in ["copy-escaped", "copy-octal", "copy-split", "copy-padded", "copy-bytea"] {
        assert!(said.contains(&format!("{name} failed True")), "{name}:\n{}", said.replace(&key, "<KEY>"));
    }
    assert!(said.contains("copy-clean PASSED"), "{said}");
    assert!(said.contains("count 5"), "two clean rows from psql, one bound, two copied:\n{said}");
    // One key, one finding (by fingerprint), seen once per refusal.
    let findings = scene.findings_of("github-pat", FLAG_IP);
    assert_eq!(findings.len(), 1, "{findings:?}");
    let refused = keyed.len() + 1 + 3 + 5;
    assert_eq!(findings[0]["count"], refused, "every refused message counted: {findings:?}");

    // No form of the key anywhere the gateway wrote.
    let mut exported = String::new();
    let sessions = scene.cli_json(&["sessions", "list", "--json"]);
    for s in sessions.as_array().expect("sessions") {
        let id = s["session"].as_str().or(s["id"].as_str()).expect("session id");
        exported.push_str(&String::from_utf8_lossy(&scene.gw.cli(&["sessions", "export", id]).stdout));
        exported.push_str(&ok("replay", &scene.gw.cli(&["sessions", "replay", id])));
    }
    assert!(exported.contains("[MASKED:github-pat]"), "the refused statements are recorded, masked");
    let mut files = Vec::new();
    collect_files(&scene.gw.dir.path().join("state"), &mut files);
    let log = scene.gw.log();
    let findings = serde_json::to_string(&scene.findings()).expect("json");
    let forms = [
        ("plain", key.clone()),
        ("hex", hex.clone()),
        ("\\x-escaped", hex_escaped.clone()),
        ("octal", octal.clone()),
        ("\\u-escaped", u_escaped.clone()),
        ("U&", unicode.clone()),
        ("UESCAPE", unicode_bang.clone()),
        ("base64", b64.clone()),
    ];
    for (name, form) in &forms {
        for (what, text) in [("log", &log), ("findings", &findings), ("exports", &exported)] {
            assert!(!text.contains(form.as_str()), "the key ({name}) is in the {what}");
        }
        for (path, bytes) in &files {
            if let Some(at) = bytes.windows(form.len()).position(|w| w == form.as_bytes()) {
                // What precedes it, every form of the key hidden.
                let before = forms
                    .iter()
                    .fold(String::from_utf8_lossy(&bytes[at.saturating_sub(300)..at]).into_owned(), |t, (n, f)| {
                        t.replace(f.as_str(), &format!("<{n}>"))
                    });
                panic!("the key ({name}) is in {}, after: {before}", path.display());
            }
        }
    }
}
