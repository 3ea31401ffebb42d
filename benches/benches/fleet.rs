//! The fleet outbox as N simulated hosts shipping into one PostgreSQL
//! (Debian's PostgreSQL 15, TLS verify-full, SCRAM, in a temporary
//! directory): each host is a state directory whose sessions database holds
//! a backlog of recorded sessions, and the real shipping code
//! (`fleet::Shipper::ship_once`) drains them all at once, one connection per
//! host. Reports records per second, the drain time, the central store's
//! bytes per record, and CPU per record on both sides: the PostgreSQL
//! server's (the postmaster and every backend, exited ones included, from
//! /proc) and the shippers' (this process).
//!
//! `cargo bench -p gateway-benches --bench fleet` (as root: the server runs
//! as the `postgres` user). `FLEET_HOSTS=10,100` and
//! `FLEET_RECORDS_PER_HOST=2000` choose the sizes; `FLEET_DURABLE=1` runs
//! the server with `fsync` and `synchronous_commit` on (the test server's
//! default is off), so commits wait for this machine's disk.

use std::{path::Path, time::Instant};

use gateway::{config::Config, fleet};
use gateway_tests::pg::{pki, PgServer};

const CENTRAL_IP: &str = "127.0.0.43";
/// Records per session (start, exchanges, end), as a short HTTPS session.
const PER_SESSION: u64 = 5;

fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("the fleet benchmark starts PostgreSQL as the `postgres` user: run it as root");
    }
    let hosts: Vec<usize> = std::env::var("FLEET_HOSTS")
        .unwrap_or_else(|_| "10,100".into())
        .split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()?;
    let per_host: u64 = std::env::var("FLEET_RECORDS_PER_HOST").ok().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let tls = pki(&[CENTRAL_IP]);
    let server = PgServer::start(&[CENTRAL_IP], gateway_tests::unique_port(), &tls);
    let password = gateway_tests::keys::random(24);
    server.admin_sql(&format!("CREATE ROLE gateway LOGIN PASSWORD '{password}'"));
    server.admin_sql("CREATE DATABASE fleet OWNER gateway");
    // One connection per simulated host, as a real fleet holds.
    server.admin_sql("ALTER SYSTEM SET max_connections = 1000");
    let durable = std::env::var("FLEET_DURABLE").is_ok_and(|v| v == "1");
    if durable {
        server.admin_sql("ALTER SYSTEM SET fsync = on");
        server.admin_sql("ALTER SYSTEM SET synchronous_commit = on");
    }
    server.halt();
    server.resume();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &tls.ca_pem)?;
    let pw = dir.path().join("pw");
    std::fs::write(&pw, &password)?;
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let yaml = |state: &Path, host: &str| {
        format!(
            "state_dir: {}\nfleet:\n  store: \"host={CENTRAL_IP} port={} dbname=fleet user=gateway\"\n  password: {{file: {}}}\n  tls: {{ca_file: {}}}\n  host_id: {host}\n",
            state.display(),
            server.port,
            pw.display(),
            ca.display()
        )
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let migrator = Config::parse(Path::new("bench.yaml"), &yaml(dir.path(), "migrator"))?;
    runtime.block_on(async {
        let mut client = fleet::connect(&migrator.fleet, None).await?;
        fleet::migrate(&mut client).await.map(drop)
    })?;

    let postmaster: u32 = std::fs::read_to_string(server.dir.path().join("data/postmaster.pid"))?
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .parse()?;
    println!(
        "server: fsync and synchronous_commit {}",
        if durable { "on (commits wait for the disk)" } else { "off (an upper bound for the shipping path)" }
    );
    println!(
        "hosts  records/host  records   drain s   records/s   central bytes/record   server CPU us/record   shipper CPU us/record"
    );
    for (round, n) in hosts.iter().enumerate() {
        let mut configs = Vec::new();
        for h in 0..*n {
            let state = dir.path().join(format!("r{round}-h{h}"));
            std::fs::create_dir_all(&state)?;
            let config = Config::parse(Path::new("bench.yaml"), &yaml(&state, &format!("bench-{round}-{h}")))?;
            fill(&config, per_host)?;
            configs.push(config);
        }
        let size_before: i64 = server.admin_sql("SELECT pg_database_size('fleet')").trim().parse()?;
        let server_cpu_before = tree_cpu(postmaster)?;
        let own_cpu_before = own_cpu();
        let started = Instant::now();
        let shipped = runtime.block_on(async {
            let mut tasks = Vec::new();
            for config in configs {
                tasks.push(tokio::spawn(async move {
                    let mut shipper = fleet::Shipper::new(&config)?;
                    let mut client = fleet::connect(&config.fleet, None).await?;
                    let mut rows = 0;
                    loop {
                        let done = shipper.ship_once(&mut client).await?;
                        rows += done.rows;
                        if done.rows == 0 {
                            return Ok::<u64, fleet::FleetError>(rows);
                        }
                    }
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await??;
            }
            Ok::<u64, anyhow::Error>(total)
        })?;
        let secs = started.elapsed().as_secs_f64();
        let own_cpu = own_cpu() - own_cpu_before;
        // The backends exit as their connections close; their time moves to
        // the postmaster's children's time once reaped.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let server_cpu = tree_cpu(postmaster)? - server_cpu_before;
        server.admin_sql("CHECKPOINT");
        let size_after: i64 = server.admin_sql("SELECT pg_database_size('fleet')").trim().parse()?;
        let records = *n as u64 * per_host;
        anyhow::ensure!(shipped == records, "shipped {shipped} rows, expected {records}");
        println!(
            "{n:>5}  {per_host:>12}  {records:>7}  {secs:>8.2}  {:>10.0}  {:>20.0}  {:>21.1}  {:>22.1}",
            records as f64 / secs,
            (size_after - size_before) as f64 / records as f64,
            server_cpu * 1e6 / records as f64,
            own_cpu * 1e6 / records as f64,
        );
    }
    Ok(())
}

/// CPU seconds (user and system) of process `pid` and its children, the
/// exited ones it reaped included.
fn tree_cpu(pid: u32) -> anyhow::Result<f64> {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    // Fields after the command's closing parenthesis: state is 3, utime
    // 14, stime 15, cutime 16, cstime 17 (proc(5)).
    let times = |stat: &str| -> f64 {
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        (11..15).filter_map(|i| f.get(i)?.parse::<f64>().ok()).sum::<f64>() / tick
    };
    let ppid = |stat: &str| -> Option<u32> { stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok() };
    let mut total = times(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?);
    for entry in std::fs::read_dir("/proc")? {
        let name = entry?.file_name();
        let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        if ppid(&stat) == Some(pid) {
            total += times(&stat);
        }
    }
    Ok(total)
}

/// This process's CPU seconds (user and system).
fn own_cpu() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Writes `records` records (sessions of [`PER_SESSION`]) into the host's
/// sessions database, as the recorder lays them out, with ~400 bytes of data each.
fn fill(config: &Config, records: u64) -> anyhow::Result<()> {
    let path = config.record.database_path(&config.state_dir);
    drop(gateway::record::SessionStore::open(&path)?);
    let mut conn = rusqlite_open(&path)?;
    let tx = conn.transaction()?;
    let data = format!("{{\"method\":\"POST\",\"url\":\"https://api.example/v1/{}\"}}", "x".repeat(360));
    for s in 0..records / PER_SESSION {
        let id = format!("{s:012x}-{:012x}", rand_u64());
        let mut prev = gateway::record::GENESIS_HASH.to_owned();
        // One row per session, as the recorder stores a session whose
        // records fall in one batch (the layout: gateway/src/record/chunk.rs).
        let mut body = Vec::new();
        for seq in 0..PER_SESSION {
            let kind = match seq {
                0 => "start",
                s if s + 1 == PER_SESSION => "end",
                _ => "exchange",
            };
            let hash = gateway::record::hash_record(&id, &prev, seq, seq as i64, kind, &data);
            body.extend_from_slice(&(seq as i64).to_le_bytes());
            for text in [kind, hash.as_str(), data.as_str()] {
                body.extend_from_slice(&(text.len() as u32).to_le_bytes());
                body.extend_from_slice(text.as_bytes());
            }
            prev = hash;
        }
        tx.execute(
            "INSERT INTO chunks (id, session, first_seq, n, exchanges, prev_hash, ts, body) VALUES (?1, ?2, 0, ?3, ?4, ?5, 0, ?6)",
            rusqlite::params![
                (s * PER_SESSION + 1) as i64,
                id,
                PER_SESSION as i64,
                PER_SESSION as i64 - 2,
                gateway::record::GENESIS_HASH,
                body
            ],
        )?;
        tx.execute(
            "INSERT INTO sessions (id, conn_id, started, identity, host, orig_dst, protocol, pid, comm, meta, exchanges,
                                   last_seq, last_hash, last_ts, ended, bytes_up, bytes_down, outcome)
             VALUES (?1, 1, 0, 'spiffe://ci/bench', 'api.example', '10.0.0.1:443', 'https', 7, 'curl', ?2, ?3, ?4, ?5, ?4, ?4, 10, 20, 'closed')",
            rusqlite::params![id, data, PER_SESSION as i64 - 2, PER_SESSION as i64 - 1, prev],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn rusqlite_open(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    Ok(rusqlite::Connection::open(path)?)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}
