//! pgbench through the gateway (issue 12), every figure a ratio against
//! pgbench straight to the server in the same run, rounds interleaved,
//! medians reported with the spread between rounds:
//!
//! * **direct**: pgbench (outside the intercepted cgroup) to the server;
//! * **gateway**: the same pgbench in the gateway's intercepted cgroup, to
//!   the same address: redirected by the eBPF programs into the gateway,
//!   which terminates TLS, logs in upstream with SCRAM, classifies and
//!   judges every statement (a statement policy is loaded), records the
//!   session, and relays;
//! * **pgbouncer**: pgbench (outside the cgroup) to Debian's PgBouncer in
//!   `pool_mode = session`, TLS on both sides like the gateway, SCRAM to
//!   the server: what a plain PostgreSQL proxy costs.
//!
//! Each for pgbench's select-only script (`-S`) and its default TPC-B-like
//! script, at 1 and 16 clients, simple query protocol (pgbench's default:
//! every statement has new literals, so the gateway's per-text
//! classification cache misses).
//!
//! After every gateway leg the harness checks that the eBPF `redirected`
//! counter grew by at least the number of connections pgbench opened, and
//! that it did not move during the other legs: a gateway leg that was not
//! intercepted fails the run instead of reporting direct figures as the
//! gateway's.
//!
//! Needs root (eBPF, cgroups) and Debian's `postgresql` and `pgbouncer`
//! (`cargo xtask setup`). Run with `cargo xtask bench --bench postgres`;
//! knobs: `PG_BENCH_ROUNDS` (3), `PG_BENCH_SECONDS` per run (10),
//! `PG_BENCH_SCALE` (pgbench -s, 10). See docs/benchmarks.md. What it
//! creates: a PostgreSQL cluster and a PgBouncer in temporary directories
//! on 127.0.0.31 and 127.0.0.32 (stopped on drop), and a gateway with its
//! own cgroup under `gateway-tests/` and its own pins (removed on drop).

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use gateway_tests::{keys, median, run_as, unique_port, GatewayOptions, TestGateway};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const SERVER_IP: &str = "127.0.0.31";
const BOUNCER_IP: &str = "127.0.0.32";
const CLIENTS: &[u32] = &[1, 16];

/// Run length knobs (environment variables).
struct Knobs {
    rounds: usize,
    seconds: u64,
    scale: u64,
}

impl Knobs {
    fn from_env() -> Result<Knobs> {
        let num = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Ok(v) => v.parse().with_context(|| format!("{name}={v} is not a number")),
                Err(_) => Ok(default),
            }
        };
        Ok(Knobs {
            rounds: num("PG_BENCH_ROUNDS", 3)? as usize,
            seconds: num("PG_BENCH_SECONDS", 10)?,
            scale: num("PG_BENCH_SCALE", 10)?,
        })
    }
}

/// pgbench's built-in scripts measured.
#[derive(Clone, Copy)]
enum Script {
    SelectOnly,
    TpcbLike,
}

impl Script {
    fn name(self) -> &'static str {
        match self {
            Script::SelectOnly => "select-only",
            Script::TpcbLike => "tpcb-like",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Script::SelectOnly => &["-S"],
            Script::TpcbLike => &[],
        }
    }
}

/// Where pgbench connects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leg {
    Direct,
    Gateway,
    PgBouncer,
}

impl Leg {
    const ALL: [Leg; 3] = [Leg::Direct, Leg::Gateway, Leg::PgBouncer];

    fn name(self) -> &'static str {
        match self {
            Leg::Direct => "direct",
            Leg::Gateway => "gateway",
            Leg::PgBouncer => "pgbouncer",
        }
    }
}

fn main() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the postgres benchmark attaches eBPF programs: run it as root");
    let knobs = Knobs::from_env()?;
    let dir = tempfile::tempdir().context("tempdir")?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let pki = Pki::new(&[SERVER_IP, BOUNCER_IP])?;
    let port = unique_port();
    let server = PgServer::start(port, &pki)?;
    let password = format!("bench-{}", keys::random(24));
    server.admin_sql(&format!("CREATE ROLE ci LOGIN PASSWORD '{password}';"))?;
    server.admin_sql("CREATE DATABASE bench OWNER ci;")?;
    let bouncer = PgBouncer::start(port, &password, &pki)?;
    let gw = start_gateway(dir.path(), port, &pki)?;

    let conninfo = |leg: Leg| match leg {
        Leg::Direct | Leg::Gateway => format!("host={SERVER_IP} port={port} user=ci dbname=bench sslmode=require"),
        Leg::PgBouncer => {
            format!("host={BOUNCER_IP} port={} user=ci dbname=bench sslmode=require", bouncer.port)
        }
    };
    let pgbench = |leg: Leg, args: &[String]| -> Result<Output> {
        let mut cmd = match leg {
            Leg::Gateway => gw.command_in_cgroup("pgbench"),
            Leg::Direct | Leg::PgBouncer => Command::new("pgbench"),
        };
        cmd.env("PGPASSWORD", &password).args(args).arg(conninfo(leg));
        run(cmd, Duration::from_secs(knobs.seconds * 3 + 600))
    };

    eprintln!("postgres bench: pgbench -i -s {} (direct)", knobs.scale);
    let init = pgbench(Leg::Direct, &["-i".into(), "-q".into(), "-s".into(), knobs.scale.to_string()])?;
    ok("pgbench -i", &init)?;

    // tps[script][clients][leg][round]
    let scripts = [Script::SelectOnly, Script::TpcbLike];
    let mut tps = vec![vec![vec![Vec::new(); Leg::ALL.len()]; CLIENTS.len()]; scripts.len()];
    for round in 0..knobs.rounds {
        for (si, script) in scripts.iter().enumerate() {
            for (ci, &clients) in CLIENTS.iter().enumerate() {
                // Rotate the order each round so no leg always runs first (warm caches, checkpoints).
                for k in 0..Leg::ALL.len() {
                    let li = (k + round + si + ci) % Leg::ALL.len();
                    let leg = Leg::ALL[li];
                    let before = redirected(&gw)?;
                    let mut args: Vec<String> = vec![
                        "-n".into(),
                        "-M".into(),
                        "simple".into(),
                        "-c".into(),
                        clients.to_string(),
                        "-j".into(),
                        clients.min(2).to_string(),
                        "-T".into(),
                        knobs.seconds.to_string(),
                    ];
                    args.extend(script.args().iter().map(|a| (*a).to_owned()));
                    let out = pgbench(leg, &args)?;
                    let report = ok(&format!("pgbench {} {clients} clients {}", script.name(), leg.name()), &out)?;
                    let rose = redirected(&gw)? - before;
                    if leg == Leg::Gateway {
                        ensure!(
                            rose >= u64::from(clients),
                            "gateway leg: the eBPF programs redirected only {rose} connections for {clients} pgbench clients: not intercepted\n{}",
                            gw.log_errors()
                        );
                    } else {
                        ensure!(rose == 0, "{} leg: {rose} connections were redirected", leg.name());
                    }
                    let t = parse_tps(&report)?;
                    eprintln!(
                        "round {}: {} {clients:>2} clients {:<9} {t:>9.1} tps",
                        round + 1,
                        script.name(),
                        leg.name()
                    );
                    tps[si][ci][li].push(t);
                }
            }
        }
    }
    // The gateway spoke PostgreSQL on those connections (it judged statements, it did not relay blind).
    let events = gw.wait_events(1);
    ensure!(
        events.iter().any(|e| e["protocol"] == "postgres"),
        "no connection event says postgres: {events:?}\n{}",
        gw.log_errors()
    );

    let mut table = String::new();
    writeln!(
        table,
        "\n| script | clients | direct tps | gateway tps | pgbouncer tps | gateway/direct | pgbouncer/direct |"
    )?;
    writeln!(table, "|---|---:|---:|---:|---:|---:|---:|")?;
    for (si, script) in scripts.iter().enumerate() {
        for (ci, clients) in CLIENTS.iter().enumerate() {
            let runs = &tps[si][ci];
            let ratio = |li: usize| -> Vec<f64> { runs[li].iter().zip(&runs[0]).map(|(x, d)| x / d).collect() };
            let spread = |v: &[f64]| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                format!("{lo:.2}-{hi:.2}")
            };
            let (g, b) = (ratio(1), ratio(2));
            writeln!(
                table,
                "| {} | {clients} | {:.0} | {:.0} | {:.0} | **{:.2}** ({}) | {:.2} ({}) |",
                script.name(),
                median(&runs[0]),
                median(&runs[1]),
                median(&runs[2]),
                median(&g),
                spread(&g),
                median(&b),
                spread(&b),
            )?;
        }
    }
    println!(
        "{table}\nmedians of {} interleaved rounds of {} s each (ratio spread between rounds in parentheses); \
         pgbench -M simple, scale {}, TLS on every leg",
        knobs.rounds, knobs.seconds, knobs.scale
    );
    drop(gw);
    drop(bouncer);
    drop(server);
    Ok(())
}

/// The gateway: intercepts the server's address and port for its cgroup,
/// with a statement policy (so every statement is classified and judged)
/// and static-key findings flagged (the job's password is one).
fn start_gateway(dir: &Path, port: u16, pki: &Pki) -> Result<TestGateway> {
    let ca_path = dir.join("server-ca.pem");
    std::fs::write(&ca_path, &pki.ca_pem)?;
    let destination = format!("{{cidr: {SERVER_IP}/32, ports: [{port}]}}");
    let mut opts = GatewayOptions::new("pgbench", &[destination.as_str()]);
    opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
    opts.policy_yaml = Some(
        "version: 1\nrules:\n\
         \x20 - name: bounded-deletes\n    match: { postgres: { kind: [update, delete], where: false } }\n\
         \x20   action: deny\n    reason: \"UPDATE and DELETE need a WHERE clause\"\n\
         \x20 - name: vault\n    match: { postgres: { relations: [vault_keys, public.vault_keys] } }\n\
         \x20   action: deny\n    reason: \"the vault is off limits to CI\"\n\
         defaults: { action: allow }\n"
            .into(),
    );
    opts.extra_yaml =
        format!("tls:\n  extra_upstream_cas: [{ca}]\nfindings:\n  default_action: flag\n", ca = ca_path.display());
    Ok(TestGateway::start(opts))
}

/// The eBPF programs' `redirected` counter (`gateway status --json`).
fn redirected(gw: &TestGateway) -> Result<u64> {
    let v = gw.status();
    v["stats"]["redirected"].as_u64().with_context(|| format!("no stats.redirected in gateway status: {v}"))
}

/// The `postgres` system user the server and PgBouncer run as (both refuse root).
fn postgres_user() -> Result<(u32, u32)> {
    let user = nix::unistd::User::from_name("postgres")?
        .context("the `postgres` user must exist: install Debian's `postgresql` (cargo xtask setup)")?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let mut cmd = Command::new(program);
    let (uid, gid) = postgres_user()?;
    run_as(&mut cmd, uid, gid);
    Ok(cmd)
}

fn chown_postgres(path: &Path) -> Result<()> {
    let (uid, gid) = postgres_user()?;
    nix::unistd::chown(path, Some(uid.into()), Some(gid.into())).with_context(|| format!("chown {}", path.display()))
}

fn ok(what: &str, out: &Output) -> Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Runs `cmd` for at most `patience` (then kills it and fails).
fn run(mut cmd: Command, patience: Duration) -> Result<Output> {
    // Only the program is named on failure: the environment carries the password.
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("spawn {program}"))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(patience) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            bail!("{program} did not finish within {patience:?}")
        }
    }
}

/// The `tps = …` figure of a pgbench report.
fn parse_tps(report: &str) -> Result<f64> {
    report
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps in the pgbench report:\n{report}"))
}

/// A CA and a certificate for the server's and PgBouncer's addresses, as PEM.
struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new(ips: &[&str]) -> Result<Pki> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "PostgreSQL Bench CA");
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key)?;
        let leaf_key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names =
            ips.iter().map(|ip| Ok(rcgen::SanType::IpAddress(ip.parse()?))).collect::<Result<_>>()?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "postgres bench server");
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let leaf = params.signed_by(&leaf_key, &issuer)?;
        Ok(Pki { ca_pem: ca.pem(), cert_pem: leaf.pem(), key_pem: leaf_key.serialize_pem() })
    }

    /// Writes the server certificate, key and CA into `dir`, owned by `postgres`.
    fn write(&self, dir: &Path) -> Result<()> {
        for (name, pem) in [("server.crt", &self.cert_pem), ("server.key", &self.key_pem), ("ca.crt", &self.ca_pem)] {
            let path = dir.join(name);
            std::fs::write(&path, pem)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            chown_postgres(&path)?;
        }
        Ok(())
    }
}

/// A PostgreSQL cluster in a temporary directory (TLS and SCRAM only over
/// TCP, like the end-to-end tests), stopped when dropped.
struct PgServer {
    dir: tempfile::TempDir,
    port: u16,
}

impl PgServer {
    fn start(port: u16, pki: &Pki) -> Result<PgServer> {
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        chown_postgres(dir.path())?;
        let data = dir.path().join("data");
        let init = as_postgres(format!("{PG_BIN}/initdb"))?
            .arg("-D")
            .arg(&data)
            .args(["-U", "admin", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync"])
            .output()
            .context("run initdb (install Debian's postgresql: cargo xtask setup)")?;
        ok("initdb", &init)?;
        pki.write(dir.path())?;
        let conf = format!(
            "listen_addresses = '{SERVER_IP}'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n\
             password_encryption = 'scram-sha-256'\nfsync = off\nsynchronous_commit = off\n\
             max_connections = 100\nshared_buffers = 256MB\n",
            dir = dir.path().display(),
        );
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf"))?;
        existing.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), existing)?;
        std::fs::write(data.join("pg_hba.conf"), "local all all trust\nhostssl all all 127.0.0.0/8 scram-sha-256\n")?;
        let start = as_postgres(format!("{PG_BIN}/pg_ctl"))?
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .context("run pg_ctl")?;
        let server = PgServer { dir, port };
        ensure!(
            start.status.success(),
            "pg_ctl start failed:\n{}\n{}",
            String::from_utf8_lossy(&start.stderr),
            std::fs::read_to_string(server.dir.path().join("server.log")).unwrap_or_default()
        );
        Ok(server)
    }

    /// Runs SQL as the superuser over the unix socket.
    fn admin_sql(&self, sql: &str) -> Result<String> {
        let out = as_postgres("psql")?
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-U", "admin", "-d", "postgres", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .context("run psql")?;
        ok("admin psql", &out)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Ok(mut cmd) = as_postgres(format!("{PG_BIN}/pg_ctl")) {
            let _ = cmd.arg("-D").arg(self.dir.path().join("data")).args(["-m", "immediate", "-w", "stop"]).output();
        }
    }
}

/// Debian's PgBouncer in session pooling mode, TLS to clients (the server's
/// certificate) and to the server (verified against the CA), SCRAM both
/// ways; stopped when dropped.
struct PgBouncer {
    dir: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

impl PgBouncer {
    fn start(server_port: u16, password: &str, pki: &Pki) -> Result<PgBouncer> {
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        chown_postgres(dir.path())?;
        pki.write(dir.path())?;
        let port = unique_port();
        let d = dir.path().display();
        let ini = format!(
            "[databases]\nbench = host={SERVER_IP} port={server_port} dbname=bench\n\
             [pgbouncer]\nlisten_addr = {BOUNCER_IP}\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {d}/userlist.txt\npool_mode = session\n\
             max_client_conn = 200\ndefault_pool_size = 32\n\
             client_tls_sslmode = require\nclient_tls_cert_file = {d}/server.crt\nclient_tls_key_file = {d}/server.key\n\
             server_tls_sslmode = verify-full\nserver_tls_ca_file = {d}/ca.crt\n\
             logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n"
        );
        for (name, text) in [("pgbouncer.ini", ini), ("userlist.txt", format!("\"ci\" \"{password}\"\n"))] {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            chown_postgres(&path)?;
        }
        let child = as_postgres("pgbouncer")?
            .arg(dir.path().join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("run pgbouncer (install Debian's pgbouncer: cargo xtask setup)")?;
        let mut bouncer = PgBouncer { dir, port, child };
        for _ in 0..500 {
            if std::net::TcpStream::connect((BOUNCER_IP, port)).is_ok() {
                return Ok(bouncer);
            }
            if let Some(status) = bouncer.child.try_wait()? {
                bail!(
                    "pgbouncer exited with {status}:\n{}",
                    std::fs::read_to_string(bouncer.dir.path().join("pgbouncer.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("pgbouncer did not listen on {BOUNCER_IP}:{port} within 10 s")
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
