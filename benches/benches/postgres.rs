//! pgbench through the gateway (issue 12), every figure a ratio against
//! pgbench straight to the server in the same run, rounds interleaved,
//! medians reported with the spread between rounds, and for every leg the
//! proxy's user and system CPU time and the machine's busy time per
//! statement:
//!
//! * **direct**: pgbench (outside the intercepted cgroup) to the server;
//! * **gateway**: the same pgbench in the gateway's intercepted cgroup, to
//!   the same address: redirected by the eBPF programs into the gateway,
//!   which terminates TLS, logs in upstream with SCRAM, classifies and
//!   judges every statement (a statement policy is loaded), records the
//!   session, and relays;
//! * **pgbouncer**: pgbench (outside the cgroup) to Debian's PgBouncer in
//!   `pool_mode = session`, TLS on both sides like the gateway, SCRAM to
//!   the server: what a plain PostgreSQL proxy costs;
//! * **relay**: pgbench (outside the cgroup) to HAProxy in `mode tcp`, which
//!   relays the bytes (pgbench's SSLRequest and TLS go end to end to the
//!   server) and inspects nothing: the floor, what any proxy that
//!   terminates the TCP connection costs on this host.
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
//! Needs root (eBPF, cgroups) and Debian's `postgresql`, `pgbouncer` and
//! `haproxy` (`cargo xtask setup`). Run with `cargo xtask bench --bench postgres`;
//! knobs: `PG_BENCH_ROUNDS` (3), `PG_BENCH_SECONDS` per run (10),
//! `PG_BENCH_SCALE` (pgbench -s, 10). See docs/benchmarks.md. What it
//! creates: a PostgreSQL cluster, a PgBouncer and an HAProxy in temporary
//! directories on 127.0.0.31, 127.0.0.32 and 127.0.0.33 (stopped on drop), and a gateway with its
//! own cgroup under `gateway-tests/` and its own pins (removed on drop).
//!
//! `PG_BENCH_MODE=callgrind` counts instructions instead of time (wall-clock
//! figures swing with the shared machine's other load; instruction counts do
//! not); it measures direct, the gateway and PgBouncer (not the relay). The server (every backend it forks), PgBouncer and the gateway run
//! under `valgrind --tool=callgrind`; pgbench runs a fixed number of
//! transactions (`-t`, `PG_BENCH_TRANSACTIONS`, default 1000) on one
//! connection, N and then 2N, for each leg and each of select-only `-M
//! simple`, select-only `-M extended` and TPC-B-like `-M simple` (N/4).
//! Ir/statement is (Ir(2N) - Ir(N)) / (N x statements per transaction), so
//! start-up, login and the connection's end cancel out. The proxies'
//! counters are zeroed before each run and dumped once the process went
//! idle (`callgrind_control`); a backend dumps when it exits, one file per
//! process. `PG_BENCH_PROFILES=DIR` keeps the gateway's N and 2N dumps for
//! `callgrind_annotate --inclusive=yes`.
//!
//! `PG_BENCH_MODE=native` measures what callgrind cannot see: for pgbench
//! select-only `-M simple` at 1 and 16 clients through the gateway, through
//! PgBouncer, through the TCP relay and direct, the proxy's user and system time, its syscalls by
//! kind (perf's syscall tracepoints), its context switches (every task's
//! `/proc/PID/task/*/status`) and the wake-ups it makes (`sched:sched_wakeup`),
//! each per statement; the machine's busy time per statement too. With
//! `PG_BENCH_PROFILES=DIR`, a second run of each proxy leg is sampled with
//! `perf record -e cpu-clock -g` into DIR.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use gateway_tests::{keys, median, run_as, unique_port, GatewayOptions, TestGateway};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const SERVER_IP: &str = "127.0.0.31";
const BOUNCER_IP: &str = "127.0.0.32";
const RELAY_IP: &str = "127.0.0.33";
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
#[derive(Clone, Copy, PartialEq, Eq)]
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

    /// Statements per transaction (TPC-B-like: BEGIN, 3 UPDATEs, SELECT, INSERT, END).
    fn statements(self) -> u64 {
        match self {
            Script::SelectOnly => 1,
            Script::TpcbLike => 7,
        }
    }
}

/// Where pgbench connects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leg {
    Direct,
    Gateway,
    PgBouncer,
    /// HAProxy in `mode tcp`: the floor.
    Relay,
}

impl Leg {
    const ALL: [Leg; 4] = [Leg::Direct, Leg::Relay, Leg::PgBouncer, Leg::Gateway];

    fn name(self) -> &'static str {
        match self {
            Leg::Direct => "direct",
            Leg::Gateway => "gateway",
            Leg::PgBouncer => "pgbouncer",
            Leg::Relay => "relay",
        }
    }
}

fn main() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the postgres benchmark attaches eBPF programs: run it as root");
    match std::env::var("PG_BENCH_MODE").as_deref() {
        Ok("tps") | Err(_) => tps(),
        Ok("callgrind") => callgrind::measure(),
        Ok("native") => native::measure(),
        Ok(other) => bail!("PG_BENCH_MODE={other}: expected `tps` (the default), `callgrind` or `native`"),
    }
}

/// The wall-clock mode: tps of every leg, rounds interleaved, with the
/// proxy's CPU time and the machine's busy time per statement.
fn tps() -> Result<()> {
    let knobs = Knobs::from_env()?;
    let legs = Legs::start()?;
    let gw = &legs.gw;
    let pgbench = |leg: Leg, args: &[String]| legs.pgbench(leg, args, &knobs);

    eprintln!("postgres bench: pgbench -i -s {} (direct)", knobs.scale);
    let init = pgbench(Leg::Direct, &["-i".into(), "-q".into(), "-s".into(), knobs.scale.to_string()])?;
    ok("pgbench -i", &init)?;

    // runs[script][clients][leg][round]
    let scripts = [Script::SelectOnly, Script::TpcbLike];
    let mut runs = vec![vec![vec![Vec::<Run>::new(); Leg::ALL.len()]; CLIENTS.len()]; scripts.len()];
    let load0 = load_average();
    for round in 0..knobs.rounds {
        for (si, script) in scripts.iter().enumerate() {
            for (ci, &clients) in CLIENTS.iter().enumerate() {
                // Rotate the order each round so no leg always runs first (warm caches, checkpoints).
                for k in 0..Leg::ALL.len() {
                    let li = (k + round + si + ci) % Leg::ALL.len();
                    let leg = Leg::ALL[li];
                    let before = redirected(gw)?;
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
                    let pid = legs.proxy_pid(leg);
                    let t0 = pid.map(native::times).transpose()?.unwrap_or_default();
                    let m0 = native::machine()?;
                    let out = pgbench(leg, &args)?;
                    let m1 = native::machine()?;
                    let t1 = pid.map(native::times).transpose()?.unwrap_or_default();
                    let report = ok(&format!("pgbench {} {clients} clients {}", script.name(), leg.name()), &out)?;
                    let rose = redirected(gw)? - before;
                    if leg == Leg::Gateway {
                        ensure!(
                            rose >= u64::from(clients),
                            "gateway leg: the eBPF programs redirected only {rose} connections for {clients} pgbench clients: not intercepted\n{}",
                            gw.log_errors()
                        );
                    } else {
                        ensure!(rose == 0, "{} leg: {rose} connections were redirected", leg.name());
                    }
                    let statements = (native::processed(&report)? * script.statements()) as f64;
                    let per = |ticks: u64| ticks as f64 * TICK_US / statements;
                    let r = Run {
                        tps: parse_tps(&report)?,
                        busy: per(m1.0 - m0.0),
                        user: per(t1.user - t0.user),
                        system: per(t1.system - t0.system),
                    };
                    eprintln!(
                        "round {}: {} {clients:>2} clients {:<9} {:>9.1} tps, busy {:.1}, proxy user {:.1} sys {:.1} µs/stmt",
                        round + 1,
                        script.name(),
                        leg.name(),
                        r.tps,
                        r.busy,
                        r.user,
                        r.system
                    );
                    runs[si][ci][li].push(r);
                }
            }
        }
    }
    let load1 = load_average();
    // The gateway spoke PostgreSQL on those connections (it judged statements, it did not relay blind).
    let events = gw.wait_events(1);
    ensure!(
        events.iter().any(|e| e["protocol"] == "postgres"),
        "no connection event says postgres: {events:?}\n{}",
        gw.log_errors()
    );

    let mut table = String::new();
    let proxies = [Leg::Relay, Leg::PgBouncer, Leg::Gateway];
    let index = |leg: Leg| Leg::ALL.iter().position(|l| *l == leg).unwrap_or(0);
    writeln!(
        table,
        "\n| script | clients | direct tps | relay tps | pgbouncer tps | gateway tps | relay/direct | pgbouncer/direct | gateway/direct |"
    )?;
    writeln!(table, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.2}-{hi:.2}")
    };
    for (si, script) in scripts.iter().enumerate() {
        for (ci, clients) in CLIENTS.iter().enumerate() {
            let r = &runs[si][ci];
            let tps = |leg: Leg| -> Vec<f64> { r[index(leg)].iter().map(|x| x.tps).collect() };
            let direct = tps(Leg::Direct);
            write!(table, "| {} | {clients} | {:.0} |", script.name(), median(&direct))?;
            for leg in proxies {
                write!(table, " {:.0} |", median(&tps(leg)))?;
            }
            for leg in proxies {
                let ratio: Vec<f64> = tps(leg).iter().zip(&direct).map(|(x, d)| x / d).collect();
                let bold = if leg == Leg::Gateway { "**" } else { "" };
                write!(table, " {bold}{:.2}{bold} ({}) |", median(&ratio), spread(&ratio))?;
            }
            writeln!(table)?;
        }
    }
    writeln!(
        table,
        "\n| script | clients | leg | machine busy µs/stmt | proxy user µs/stmt | proxy sys µs/stmt | proxy CPU / machine busy |"
    )?;
    writeln!(table, "|---|---:|---|---:|---:|---:|---:|")?;
    for (si, script) in scripts.iter().enumerate() {
        for (ci, clients) in CLIENTS.iter().enumerate() {
            for leg in Leg::ALL {
                let r = &runs[si][ci][index(leg)];
                let m = |f: fn(&Run) -> f64| median(&r.iter().map(f).collect::<Vec<_>>());
                let (busy, user, system) = (m(|x| x.busy), m(|x| x.user), m(|x| x.system));
                if leg == Leg::Direct {
                    writeln!(table, "| {} | {clients} | direct | {busy:.1} | | | |", script.name())?;
                } else {
                    writeln!(
                        table,
                        "| {} | {clients} | {} | {busy:.1} | {user:.1} | {system:.1} | {:.2} |",
                        script.name(),
                        leg.name(),
                        (user + system) / busy
                    )?;
                }
            }
        }
    }
    println!(
        "{table}\nmedians of {} interleaved rounds of {} s each (ratio spread between rounds in parentheses); \
         pgbench -M simple, scale {}, TLS on every leg (end to end through the relay); per statement: \
         TPC-B-like transactions count 7; machine busy = all CPUs' non-idle time; \
         load average {load0} at the start, {load1} at the end",
        knobs.rounds, knobs.seconds, knobs.scale
    );
    // The proxies stop before the server (`Legs`' field order).
    drop(legs);
    Ok(())
}

/// Microseconds per clock tick (`/proc` times count in 1/100 s).
const TICK_US: f64 = 1e6 / 100.0;

/// One pgbench run's figures, per statement (µs) except `tps`.
#[derive(Clone, Copy)]
struct Run {
    tps: f64,
    busy: f64,
    user: f64,
    system: f64,
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The legs the wall-clock modes compare, started: the server (with the
/// `ci` role and the `bench` database), PgBouncer and the TCP relay in
/// front of it, and the gateway intercepting it. Fields drop in declaration
/// order: the proxies stop before the server, the directory goes last.
struct Legs {
    gw: TestGateway,
    bouncer: PgBouncer,
    relay: TcpRelay,
    _server: PgServer,
    password: String,
    port: u16,
    _pki: Pki,
    dir: tempfile::TempDir,
}

impl Legs {
    fn start() -> Result<Legs> {
        let dir = tempfile::tempdir().context("tempdir")?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let pki = Pki::new(&[SERVER_IP, BOUNCER_IP, RELAY_IP])?;
        let port = unique_port();
        let server = PgServer::start(port, &pki)?;
        let password = format!("bench-{}", keys::random(24));
        server.admin_sql(&format!("CREATE ROLE ci LOGIN PASSWORD '{password}';"))?;
        server.admin_sql("CREATE DATABASE bench OWNER ci;")?;
        let bouncer = PgBouncer::start(port, &password, &pki, None)?;
        let relay = TcpRelay::start(port)?;
        let gw = start_gateway(dir.path(), port, &pki, Vec::new())?;
        Ok(Legs { gw, bouncer, relay, _server: server, password, port, _pki: pki, dir })
    }

    /// The proxy process of `leg` (none for direct).
    fn proxy_pid(&self, leg: Leg) -> Option<u32> {
        match leg {
            Leg::Direct => None,
            Leg::Gateway => self.gw.child.as_ref().map(|c| c.id()),
            Leg::PgBouncer => Some(self.bouncer.child.id()),
            Leg::Relay => Some(self.relay.child.id()),
        }
    }

    /// pgbench with `args` on `leg` (in the gateway's cgroup for the gateway's).
    fn pgbench(&self, leg: Leg, args: &[String], knobs: &Knobs) -> Result<Output> {
        let (mut cmd, host, port) = match leg {
            Leg::Gateway => (self.gw.command_in_cgroup("pgbench"), SERVER_IP, self.port),
            Leg::Direct => (Command::new("pgbench"), SERVER_IP, self.port),
            Leg::PgBouncer => (Command::new("pgbench"), BOUNCER_IP, self.bouncer.port),
            Leg::Relay => (Command::new("pgbench"), RELAY_IP, self.relay.port),
        };
        cmd.env("PGPASSWORD", &self.password)
            .args(args)
            .arg(format!("host={host} port={port} user=ci dbname=bench sslmode=require"));
        run(cmd, Duration::from_secs(knobs.seconds * 3 + 600))
    }
}

/// The gateway: intercepts the server's address and port for its cgroup,
/// with a statement policy (so every statement is classified and judged)
/// and static-key findings flagged (the job's password is one).
fn start_gateway(dir: &Path, port: u16, pki: &Pki, wrapper: Vec<String>) -> Result<TestGateway> {
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
    if !wrapper.is_empty() {
        // Compiling the detector under valgrind takes a while.
        opts.start_patience = Duration::from_secs(600);
    }
    opts.wrapper = wrapper;
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

    /// Stops the server and starts it again under callgrind, every process
    /// (each backend is a fork) dumping its counts at exit into
    /// `<out>/callgrind.<pid>`; autovacuum off, so the only backends are
    /// the benchmark's. Returns the postmaster's pid.
    fn restart_under(&mut self, valgrind: &Path, out: &Path) -> Result<u32> {
        let data = self.dir.path().join("data");
        let stop = as_postgres(format!("{PG_BIN}/pg_ctl"))?
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "stop"])
            .output()?;
        ok("pg_ctl stop", &stop)?;
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf"))?;
        conf.push_str("autovacuum = off\n");
        std::fs::write(data.join("postgresql.conf"), conf)?;
        std::fs::create_dir_all(out)?;
        chown_postgres(out)?;
        let log = std::fs::File::create(self.dir.path().join("server-valgrind.log"))?;
        let child = as_postgres(valgrind)?
            .args(callgrind::VALGRIND_ARGS)
            .arg(format!("--callgrind-out-file={}/callgrind.%p", out.display()))
            .arg(format!("{PG_BIN}/postgres"))
            .arg("-D")
            .arg(&data)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("run postgres under valgrind")?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::net::TcpStream::connect((SERVER_IP, self.port)).is_err() {
            ensure!(
                Instant::now() < deadline,
                "postgres under valgrind did not listen within 120 s:\n{}",
                std::fs::read_to_string(self.dir.path().join("server-valgrind.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // pg_ctl stops it on drop (by postmaster.pid); dropping the handle leaves it running.
        drop(child);
        Ok(pid)
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
    /// `valgrind`: run it under callgrind, its counts dumped to `<dir>/callgrind.out.N`.
    fn start(server_port: u16, password: &str, pki: &Pki, valgrind: Option<&Path>) -> Result<PgBouncer> {
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
             max_client_conn = 200\ndefault_pool_size = 32\nserver_idle_timeout = 0\n\
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
        let mut cmd = match valgrind {
            Some(valgrind) => {
                let mut cmd = as_postgres(valgrind)?;
                cmd.args(callgrind::VALGRIND_ARGS)
                    .arg(format!("--callgrind-out-file={}", dir.path().join("callgrind.out").display()))
                    .arg(callgrind::which("pgbouncer").context("pgbouncer not found (cargo xtask setup)")?);
                cmd
            }
            None => as_postgres("pgbouncer")?,
        };
        let child = cmd
            .arg(dir.path().join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("run pgbouncer (install Debian's pgbouncer: cargo xtask setup)")?;
        let mut bouncer = PgBouncer { dir, port, child };
        let log = bouncer.dir.path().join("pgbouncer.log");
        wait_accepting("pgbouncer", BOUNCER_IP, port, &mut bouncer.child, &log)?;
        Ok(bouncer)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to 60 s until `name`, started as `child`, accepts on
/// `ip:port`; fails with its log if it exits first.
fn wait_accepting(
    name: &str,
    ip: &str,
    port: u16,
    child: &mut std::process::Child,
    log: &std::path::Path,
) -> Result<()> {
    for _ in 0..3000 {
        if std::net::TcpStream::connect((ip, port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited with {status}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{name} did not listen on {ip}:{port} within 60 s")
}

/// HAProxy in `mode tcp` in front of the server: it relays the bytes both
/// ways and inspects nothing (pgbench's SSLRequest and the TLS session go
/// end to end to the server), the cheapest interposer that terminates the
/// TCP connection. One process in the foreground (`-db`), one thread per
/// CPU (HAProxy's default, the gateway's runtime's too); stopped when
/// dropped.
struct TcpRelay {
    dir: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

impl TcpRelay {
    fn start(server_port: u16) -> Result<TcpRelay> {
        let haproxy = callgrind::which("haproxy").context("haproxy not found (Debian's haproxy: cargo xtask setup)")?;
        let dir = tempfile::tempdir()?;
        let port = unique_port();
        let conf = format!(
            "# Written by benches/benches/postgres.rs: a TCP relay, no inspection.\n\
             global\n    maxconn 4096\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\
             frontend pg\n    bind {RELAY_IP}:{port}\n    default_backend server\n\
             backend server\n    server pg {SERVER_IP}:{server_port}\n"
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, conf)?;
        let check = Command::new(&haproxy).args(["-c", "-q", "-f"]).arg(&path).output().context("haproxy -c")?;
        ok("haproxy -c", &check)?;
        let log = std::fs::File::create(dir.path().join("haproxy.log"))?;
        let child = Command::new(&haproxy)
            .args(["-db", "-q", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("run haproxy")?;
        let mut relay = TcpRelay { dir, port, child };
        let log = relay.dir.path().join("haproxy.log");
        wait_accepting("haproxy", RELAY_IP, port, &mut relay.child, &log)?;
        Ok(relay)
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The instruction-count mode (`PG_BENCH_MODE=callgrind`): see the module
/// documentation.
mod callgrind {
    use super::*;

    /// valgrind's arguments before the output file and the program.
    pub(super) const VALGRIND_ARGS: &[&str] = &["-q", "--tool=callgrind", "--dump-instr=no", "--collect-systime=no"];

    /// A pgbench workload measured: script, protocol, transactions (as a
    /// fraction of N), statements per transaction.
    struct Workload {
        label: &'static str,
        script: Script,
        protocol: &'static str,
        divisor: u64,
        statements: u64,
    }

    const WORKLOADS: [Workload; 3] = [
        Workload {
            label: "select-only -M simple",
            script: Script::SelectOnly,
            protocol: "simple",
            divisor: 1,
            statements: 1,
        },
        Workload {
            label: "select-only -M extended",
            script: Script::SelectOnly,
            protocol: "extended",
            divisor: 1,
            statements: 1,
        },
        // BEGIN, 3 UPDATEs, SELECT, INSERT, END.
        Workload {
            label: "tpcb-like -M simple",
            script: Script::TpcbLike,
            protocol: "simple",
            divisor: 4,
            statements: 7,
        },
    ];

    /// `name` on PATH (or the usual system directories).
    pub(super) fn which(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    }

    pub(super) fn measure() -> Result<()> {
        let valgrind = which("valgrind").context("valgrind not found (package valgrind)")?;
        let ctl = which("callgrind_control").context("callgrind_control not found (package valgrind)")?;
        let n: u64 = match std::env::var("PG_BENCH_TRANSACTIONS") {
            Ok(v) => v.parse().with_context(|| format!("PG_BENCH_TRANSACTIONS={v} is not a number"))?,
            Err(_) => 1000,
        };
        let scale: u64 = match std::env::var("PG_BENCH_SCALE") {
            Ok(v) => v.parse().with_context(|| format!("PG_BENCH_SCALE={v} is not a number"))?,
            Err(_) => 1,
        };
        let dir = tempfile::tempdir().context("tempdir")?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let pki = Pki::new(&[SERVER_IP, BOUNCER_IP])?;
        let port = unique_port();
        let mut server = PgServer::start(port, &pki)?;
        let password = format!("bench-{}", keys::random(24));
        server.admin_sql(&format!("CREATE ROLE ci LOGIN PASSWORD '{password}';"))?;
        server.admin_sql("CREATE DATABASE bench OWNER ci;")?;
        let direct = format!("host={SERVER_IP} port={port} user=ci dbname=bench sslmode=require");
        eprintln!("postgres callgrind: pgbench -i -s {scale} (before valgrind)");
        let mut init = Command::new("pgbench");
        init.env("PGPASSWORD", &password).args(["-i", "-q", "-s", &scale.to_string()]).arg(&direct);
        ok("pgbench -i", &run(init, Duration::from_secs(600))?)?;

        let backends = dir.path().join("backends");
        eprintln!("postgres callgrind: restarting the server under valgrind");
        let postmaster = server.restart_under(&valgrind, &backends)?;
        let gw_out = dir.path().join("gateway-callgrind");
        std::fs::create_dir_all(&gw_out)?;
        let wrapper: Vec<String> = std::iter::once(valgrind.display().to_string())
            .chain(VALGRIND_ARGS.iter().map(|a| (*a).to_owned()))
            .chain([format!("--callgrind-out-file={}", gw_out.join("callgrind.out").display())])
            .collect();
        eprintln!("postgres callgrind: starting the gateway under valgrind");
        let gw = start_gateway(dir.path(), port, &pki, wrapper)?;
        let gw_pid = gw.child.as_ref().context("the gateway is not running")?.id();
        // One-time work (the first leaf certificate, scratch space, caches)
        // stays out of the counts.
        for protocol in ["simple", "extended"] {
            let mut cmd = gw.command_in_cgroup("pgbench");
            cmd.env("PGPASSWORD", &password).args(["-n", "-S", "-t", "20", "-M", protocol]).arg(&direct);
            ok("pgbench warm-up through the gateway", &run(cmd, Duration::from_secs(600))?)?;
        }

        let mut table = String::new();
        writeln!(
            table,
            "\n| workload | leg | proxy Ir/statement | server backend Ir/statement | proxy / direct backend |"
        )?;
        writeln!(table, "|---|---|---:|---:|---:|")?;
        let keep = std::env::var_os("PG_BENCH_PROFILES").map(PathBuf::from);
        for w in &WORKLOADS {
            let txns = (n / w.divisor).max(1);
            // The direct leg's backend Ir/statement: the server's own work.
            let mut server_per = f64::NAN;
            // The TCP relay is measured on the wall clock only.
            for leg in [Leg::Direct, Leg::Gateway, Leg::PgBouncer] {
                let mut proxy = [0u64; 2];
                let mut backend = [0u64; 2];
                for (i, t) in [txns, 2 * txns].into_iter().enumerate() {
                    // PgBouncer runs as `postgres`, where callgrind_control
                    // cannot reach it: a fresh one per run, its counts dumped
                    // when it exits.
                    let bouncer = match leg {
                        Leg::PgBouncer => Some(PgBouncer::start(port, &password, &pki, Some(&valgrind))?),
                        _ => None,
                    };
                    let conninfo = match &bouncer {
                        Some(b) => format!("host={BOUNCER_IP} port={} user=ci dbname=bench sslmode=require", b.port),
                        None => direct.clone(),
                    };
                    let before_redirected = redirected(&gw)?;
                    let events_before = gw.connection_events().len();
                    let dumped_before = dump_files(&backends)?;
                    if leg == Leg::Gateway {
                        wait_idle(gw_pid)?;
                        control(&ctl, gw_pid, "--zero")?;
                    }
                    let mut cmd = match leg {
                        Leg::Gateway => gw.command_in_cgroup("pgbench"),
                        Leg::Direct | Leg::PgBouncer | Leg::Relay => Command::new("pgbench"),
                    };
                    cmd.env("PGPASSWORD", &password)
                        .args(["-n", "-c", "1", "-j", "1", "-M", w.protocol, "-t", &t.to_string()])
                        .args(w.script.args())
                        .arg(&conninfo);
                    let report = ok(
                        &format!("pgbench {} {} -t {t}", w.label, leg.name()),
                        &run(cmd, Duration::from_secs(3600))?,
                    )?;
                    ensure!(
                        report.contains(&format!("number of transactions actually processed: {t}/{t}")),
                        "pgbench did not process {t} transactions:\n{report}"
                    );
                    if leg == Leg::Gateway {
                        // pgbench's own connection and the client's.
                        let deadline = Instant::now() + Duration::from_secs(300);
                        while gw.connection_events().len() < events_before + 2 {
                            ensure!(
                                Instant::now() < deadline,
                                "no connection events from the gateway 300 s after pgbench"
                            );
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    if leg == Leg::Gateway {
                        wait_idle(gw_pid)?;
                        let out = gw_out.join("callgrind.out");
                        let before = numbered(&out)?;
                        control(&ctl, gw_pid, "--dump")?;
                        let dump = numbered(&out)?
                            .into_iter()
                            .find(|d| !before.contains(d))
                            .with_context(|| format!("callgrind_control --dump wrote no new {}.N", out.display()))?;
                        proxy[i] = dump_total(&dump)?;
                        if let Some(keep) = &keep {
                            std::fs::create_dir_all(keep)?;
                            let name = w.label.replace([' ', '-'], "_");
                            std::fs::copy(&dump, keep.join(format!("callgrind.gateway.{name}.{t}.out")))?;
                        }
                    }
                    if let Some(bouncer) = bouncer {
                        proxy[i] = bouncer.stop_counted()?;
                    }
                    // pgbench's two connections (the scale query's and the
                    // client's); PgBouncer's one server connection.
                    let expected = if leg == Leg::PgBouncer { 1 } else { 2 };
                    backend[i] = backend_total(&backends, &dumped_before, postmaster, expected)?;
                    let rose = redirected(&gw)? - before_redirected;
                    if leg == Leg::Gateway {
                        ensure!(rose >= 1, "gateway leg: nothing was redirected: not intercepted\n{}", gw.log_errors());
                        let events = gw.connection_events();
                        let served: u64 = events[events_before..]
                            .iter()
                            .filter(|e| e["protocol"] == "postgres")
                            .filter_map(|e| e["requests"].as_u64())
                            .sum();
                        ensure!(
                            served >= t * w.statements,
                            "the gateway's connection events count {served} statements, pgbench sent {}",
                            t * w.statements
                        );
                    } else {
                        ensure!(rose == 0, "{} leg: {rose} connections were redirected", leg.name());
                    }
                }
                let per = |c: [u64; 2]| c[1].saturating_sub(c[0]) as f64 / (txns * w.statements) as f64;
                let (p, b) = (per(proxy), per(backend));
                eprintln!(
                    "{:<24} {:<9} proxy {proxy:?} Ir, backend {backend:?} Ir: {p:.0} / {b:.0} Ir/statement",
                    w.label,
                    leg.name()
                );
                if leg == Leg::Direct {
                    server_per = b;
                }
                let proxy_cell = if leg == Leg::Direct { "-".to_owned() } else { format!("{p:.0}") };

                let ratio = if leg == Leg::Direct { "-".to_owned() } else { format!("{:.2}", p / server_per) };
                writeln!(table, "| {} | {} | {proxy_cell} | {b:.0} | {ratio} |", w.label, leg.name())?;
            }
        }
        println!(
            "{table}\nuser-space instructions under callgrind, pgbench -c 1 -t N and 2N (N = {n}, TPC-B-like N/4), \
             Ir/statement = (Ir(2N) - Ir(N)) / statements; scale {scale}, TLS on every leg"
        );
        drop(gw);
        drop(server);
        Ok(())
    }

    impl PgBouncer {
        /// Stops it with SIGTERM and returns the instructions its callgrind
        /// dump counts.
        fn stop_counted(mut self) -> Result<u64> {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
            let deadline = Instant::now() + Duration::from_secs(120);
            while self.child.try_wait()?.is_none() {
                ensure!(Instant::now() < deadline, "pgbouncer did not exit 120 s after SIGTERM");
                std::thread::sleep(Duration::from_millis(100));
            }
            dump_total(&self.dir.path().join("callgrind.out"))
        }
    }

    /// Runs `callgrind_control ARG PID`.
    fn control(control: &Path, pid: u32, arg: &str) -> Result<()> {
        let out = Command::new(control).arg(arg).arg(pid.to_string()).stdin(Stdio::null()).output()?;
        ensure!(
            out.status.success(),
            "callgrind_control {arg} {pid} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// CPU time (user + system, clock ticks) of process `pid`.
    fn cpu_ticks(pid: u32) -> Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
        Ok(f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
    }

    /// Waits until `pid` used at most 2 ticks of CPU in 500 ms.
    fn wait_idle(pid: u32) -> Result<()> {
        let start = Instant::now();
        let mut last = cpu_ticks(pid)?;
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let now = cpu_ticks(pid)?;
            if now.saturating_sub(last) <= 2 {
                return Ok(());
            }
            ensure!(start.elapsed() < Duration::from_secs(300), "process {pid} still busy after 300 s");
            last = now;
        }
    }

    /// The numbered dumps of `out` (`out.1`, `out.2`...).
    fn numbered(out: &Path) -> Result<Vec<PathBuf>> {
        let dir = out.parent().context("a dump path without a directory")?;
        let stem = format!("{}.", out.file_name().and_then(|n| n.to_str()).context("a dump name")?);
        Ok(std::fs::read_dir(dir)?
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&stem)))
            .map(|e| e.path())
            .collect())
    }

    /// The per-process dumps in `dir`.
    fn dump_files(dir: &Path) -> Result<Vec<PathBuf>> {
        Ok(std::fs::read_dir(dir)?.flatten().map(|e| e.path()).collect())
    }

    /// The instructions of the busiest backend that exited since `before`
    /// was listed (pgbench's client; its other connection only reads the
    /// scale), once their dumps stopped changing.
    fn backend_total(dir: &Path, before: &[PathBuf], postmaster: u32, expected: usize) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last: Vec<(PathBuf, u64)> = Vec::new();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let mut now: Vec<(PathBuf, u64)> = dump_files(dir)?
                .into_iter()
                .filter(|p| !before.contains(p) && !p.ends_with(format!("callgrind.{postmaster}")))
                .map(|p| {
                    let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                    (p, len)
                })
                .collect();
            now.sort();
            if now.len() >= expected && now == last {
                let mut best = 0;
                for (p, _) in &now {
                    best = best.max(dump_total(p)?);
                }
                return Ok(best);
            }
            ensure!(Instant::now() < deadline, "the backends' dumps did not appear in {}: {now:?}", dir.display());
            last = now;
        }
    }

    /// The `totals:` (or `summary:`) instruction count of a callgrind dump.
    fn dump_total(dump: &Path) -> Result<u64> {
        let text = std::fs::read_to_string(dump).with_context(|| format!("reading {}", dump.display()))?;
        let line = text
            .lines()
            .find(|l| l.starts_with("totals:") || l.starts_with("summary:"))
            .with_context(|| format!("no totals in {}", dump.display()))?;
        let ir = line.split_whitespace().nth(1).with_context(|| format!("`{line}` in {}", dump.display()))?;
        ir.parse().with_context(|| format!("`{line}` in {}", dump.display()))
    }
}

/// The native mode (`PG_BENCH_MODE=native`): see the module documentation.
mod native {
    use super::*;

    /// The syscalls counted by kind (perf tracepoints `syscalls:sys_enter_*`);
    /// `raw_syscalls:sys_enter` counts them all.
    const SYSCALLS: &[&str] = &[
        "read",
        "write",
        "readv",
        "writev",
        "recvfrom",
        "sendto",
        "recvmsg",
        "sendmsg",
        "epoll_wait",
        "epoll_pwait",
        "epoll_ctl",
        "futex",
        "sched_yield",
        "clock_nanosleep",
        "getrandom",
        "statx",
        "openat",
    ];

    /// Counters of one process over a run.
    #[derive(Clone, Copy, Default)]
    pub(super) struct Times {
        /// utime, stime (clock ticks).
        pub(super) user: u64,
        pub(super) system: u64,
        /// Over all tasks.
        voluntary: u64,
        involuntary: u64,
    }

    /// CPU times and context switches of process `pid` (all its threads).
    pub(super) fn times(pid: u32) -> Result<Times> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let mut t = Times { user: field(11), system: field(12), ..Times::default() };
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
            for line in status.lines() {
                let num = |v: &str| v.trim().parse::<u64>().unwrap_or(0);
                if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
                    t.voluntary += num(v);
                } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
                    t.involuntary += num(v);
                }
            }
        }
        Ok(t)
    }

    /// Busy and total jiffies of the whole machine (`/proc/stat`).
    pub(super) fn machine() -> Result<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let cpu = stat.lines().next().context("empty /proc/stat")?;
        let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        let total: u64 = v.iter().sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Ok((total - idle, total))
    }

    /// pgbench's "number of transactions actually processed".
    pub(super) fn processed(report: &str) -> Result<u64> {
        report
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|l| l.split(['/', ' ']).next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no transaction count in the pgbench report:\n{report}"))
    }

    /// Starts `perf stat` on `pid` for the syscall and scheduler tracepoints.
    fn perf_stat(pid: u32, out: &Path) -> Result<std::process::Child> {
        let mut events: Vec<String> = vec!["raw_syscalls:sys_enter".into(), "sched:sched_wakeup".into()];
        events.extend(SYSCALLS.iter().map(|s| format!("syscalls:sys_enter_{s}")));
        Command::new("perf")
            .args(["stat", "-x", ";", "-o"])
            .arg(out)
            .args(["-e", &events.join(","), "-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("run perf (package linux-perf)")
    }

    /// Stops a perf started on a pid (SIGINT: it writes its output).
    fn stop_perf(child: std::process::Child) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success() || out.status.code() == Some(130) || out.status.code().is_none(),
            "perf: {}",
            out.status
        );
        Ok(())
    }

    /// `event -> count` from `perf stat -x ;` output.
    fn perf_counts(out: &Path) -> Result<Vec<(String, u64)>> {
        let text = std::fs::read_to_string(out)?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let f: Vec<&str> = l.split(';').collect();
                let count = f.first()?.trim().parse::<u64>().ok()?;
                let name = f.get(2)?.trim();
                let name = name
                    .strip_prefix("syscalls:sys_enter_")
                    .or_else(|| name.strip_prefix("raw_syscalls:sys_"))
                    .unwrap_or(name);
                Some((name.to_owned(), count))
            })
            .collect())
    }

    pub(super) fn measure() -> Result<()> {
        let knobs = Knobs::from_env()?;
        let legs = Legs::start()?;
        let (gw, dir) = (&legs.gw, &legs.dir);
        let keep = std::env::var_os("PG_BENCH_PROFILES").map(PathBuf::from);
        let pgbench = |leg: Leg, args: &[String]| legs.pgbench(leg, args, &knobs);
        eprintln!("postgres native: pgbench -i -s {} (direct)", knobs.scale);
        ok("pgbench -i", &pgbench(Leg::Direct, &["-i".into(), "-q".into(), "-s".into(), knobs.scale.to_string()])?)?;
        let args = |clients: u32| -> Vec<String> {
            let mut a: Vec<String> = ["-n", "-S", "-M", "simple", "-c"].map(String::from).into();
            a.extend([
                clients.to_string(),
                "-j".into(),
                clients.min(2).to_string(),
                "-T".into(),
                knobs.seconds.to_string(),
            ]);
            a
        };
        // Warm-up: the first leaf certificate, caches.
        ok("warm-up", &pgbench(Leg::Gateway, &["-n".into(), "-S".into(), "-t".into(), "50".into()])?)?;

        let load0 = load_average();
        let mut table = String::new();
        writeln!(
            table,
            "\n| leg | clients | tps | machine busy µs/stmt | proxy user µs/stmt | proxy sys µs/stmt | syscalls/stmt | \
             ctx switches/stmt (vol+invol) | wake-ups/stmt | syscalls by kind /stmt |"
        )?;
        writeln!(table, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")?;
        for round in 0..knobs.rounds {
            for &clients in CLIENTS {
                for k in 0..Leg::ALL.len() {
                    let leg = Leg::ALL[(k + round) % Leg::ALL.len()];
                    let pid = legs.proxy_pid(leg);
                    let stat_out = dir.path().join("perf-stat.txt");
                    let before_redirected = redirected(gw)?;
                    let perf = pid.map(|p| perf_stat(p, &stat_out)).transpose()?;
                    let t0 = pid.map(times).transpose()?.unwrap_or_default();
                    let m0 = machine()?;
                    let out = pgbench(leg, &args(clients))?;
                    let m1 = machine()?;
                    let t1 = pid.map(times).transpose()?.unwrap_or_default();
                    if let Some(perf) = perf {
                        stop_perf(perf)?;
                    }
                    let report = ok(&format!("pgbench {clients} clients {}", leg.name()), &out)?;
                    let rose = redirected(gw)? - before_redirected;
                    if leg == Leg::Gateway {
                        ensure!(rose >= u64::from(clients), "gateway leg: only {rose} connections redirected");
                    } else {
                        ensure!(rose == 0, "{} leg: {rose} connections were redirected", leg.name());
                    }
                    let n = processed(&report)? as f64;
                    let tps = parse_tps(&report)?;
                    let busy = (m1.0 - m0.0) as f64 * TICK_US / n;
                    let (user, sys) =
                        ((t1.user - t0.user) as f64 * TICK_US / n, (t1.system - t0.system) as f64 * TICK_US / n);
                    let cs = ((t1.voluntary - t0.voluntary) as f64 / n, (t1.involuntary - t0.involuntary) as f64 / n);
                    let (mut total, mut wakeups, mut kinds) = (f64::NAN, f64::NAN, String::new());
                    if pid.is_some() {
                        for (name, count) in perf_counts(&stat_out)? {
                            let per = count as f64 / n;
                            match name.as_str() {
                                "enter" => total = per,
                                "sched:sched_wakeup" => wakeups = per,
                                _ if per >= 0.01 => write!(kinds, "{name} {per:.2}, ")?,
                                _ => {}
                            }
                        }
                    }
                    let kinds = kinds.trim_end_matches(", ");
                    eprintln!(
                        "round {}: {:<9} {clients:>2} clients {tps:>8.0} tps, busy {busy:.1} µs/stmt, proxy user {user:.1} sys {sys:.1} µs/stmt, \
                         {total:.2} syscalls, {:.2}+{:.2} ctx switches, {wakeups:.2} wake-ups /stmt: {kinds}",
                        round + 1,
                        leg.name(),
                        cs.0,
                        cs.1
                    );
                    writeln!(
                        table,
                        "| {} | {clients} | {tps:.0} | {busy:.1} | {user:.1} | {sys:.1} | {total:.2} | {:.2}+{:.2} | {wakeups:.2} | {kinds} |",
                        leg.name(),
                        cs.0,
                        cs.1
                    )?;
                    // A sampled profile of the proxy, in a run of its own.
                    if let (Some(keep), Some(pid), 0) = (&keep, pid, round) {
                        std::fs::create_dir_all(keep)?;
                        let file = keep.join(format!("perf.{}.{clients}.data", leg.name()));
                        let rec = Command::new("perf")
                            .args(["record", "-q", "-e", "cpu-clock", "-g", "-o"])
                            .arg(&file)
                            .args(["-p", &pid.to_string()])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .context("run perf record")?;
                        let out = pgbench(leg, &args(clients))?;
                        stop_perf(rec)?;
                        ok("pgbench under perf record", &out)?;
                    }
                }
            }
        }
        println!(
            "{table}\npgbench -S -M simple, {} s per run, scale {}, TLS on every leg; per statement (= transaction); \
             machine busy = all CPUs' non-idle time; load average {load0} at the start, {} at the end",
            knobs.seconds,
            knobs.scale,
            load_average()
        );
        drop(legs);
        Ok(())
    }
}
