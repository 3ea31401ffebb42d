//! A real PostgreSQL server for tests: Debian's PostgreSQL 15 initialised
//! in a temporary directory (SCRAM-SHA-256 only, TLS only on the TCP
//! addresses, trust on its private unix socket for the test's own admin
//! SQL), stopped when dropped. Used by the PostgreSQL protocol tests and
//! by the fleet's central-store tests.

use std::{
    path::Path,
    process::{Command, Output},
};

use crate::run_as;

/// Where Debian installs PostgreSQL 15's server programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The `postgres` system user the server runs as (initdb refuses root).
pub fn postgres_user() -> (u32, u32) {
    let user = nix::unistd::User::from_name("postgres")
        .expect("reading the user database")
        .expect("the `postgres` user must exist: install Debian's `postgresql` (cargo xtask setup)");
    (user.uid.as_raw(), user.gid.as_raw())
}

/// A command run as the `postgres` user.
pub fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    let (uid, gid) = postgres_user();
    run_as(&mut cmd, uid, gid);
    cmd
}

/// `out`'s stdout when it succeeded; otherwise fails the test with both streams.
pub fn ok(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA and a server certificate for the given IP addresses, as PEM.
pub struct Pki {
    /// The CA certificate.
    pub ca_pem: String,
    /// The server's certificate.
    pub cert_pem: String,
    /// The server's private key.
    pub key_pem: String,
}

/// Makes a [`Pki`] whose server certificate names `ips`.
pub fn pki(ips: &[&str]) -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "PostgreSQL Test CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    params.subject_alt_names = ips.iter().map(|ip| rcgen::SanType::IpAddress(ip.parse().expect("ip"))).collect();
    params.distinguished_name.push(rcgen::DnType::CommonName, "postgres test server");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf = params.signed_by(&leaf_key, &issuer).expect("leaf cert");
    Pki { ca_pem: ca.pem(), cert_pem: leaf.pem(), key_pem: leaf_key.serialize_pem() }
}

/// A PostgreSQL server in a temporary directory, stopped when dropped.
pub struct PgServer {
    /// Its directory: `data/`, the TLS files, `server.log`, the unix socket.
    pub dir: tempfile::TempDir,
    /// Its TCP port (on every address it listens on).
    pub port: u16,
}

impl PgServer {
    /// Initialises and starts a server listening on `ips` at `port`.
    pub fn start(ips: &[&str], port: u16, pki: &Pki) -> PgServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let (uid, gid) = postgres_user();
        let chown = |p: &Path| nix::unistd::chown(p, Some(uid.into()), Some(gid.into())).expect("chown");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        chown(dir.path());
        let data = dir.path().join("data");
        let init = as_postgres(format!("{PG_BIN}/initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "admin", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync"])
            .output()
            .expect("run initdb");
        ok("initdb", &init);
        for (name, pem) in [("server.crt", &pki.cert_pem), ("server.key", &pki.key_pem)] {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write tls file");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
            chown(&path);
        }
        let conf = format!(
            "listen_addresses = '{ips}'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{dir}/server.crt'\nssl_key_file = '{dir}/server.key'\n\
             password_encryption = 'scram-sha-256'\nfsync = off\nsynchronous_commit = off\n",
            ips = ips.join(","),
            dir = dir.path().display(),
        );
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf")).expect("read conf");
        existing.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), existing).expect("write conf");
        // TLS and SCRAM only over TCP.
        std::fs::write(data.join("pg_hba.conf"), "local all all trust\nhostssl all all 127.0.0.0/8 scram-sha-256\n")
            .expect("write hba");
        let server = PgServer { dir, port };
        server.resume();
        server
    }

    /// Starts the (stopped) server again, waiting until it accepts connections.
    pub fn resume(&self) {
        let start = as_postgres(format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("run pg_ctl");
        if !start.status.success() {
            panic!("pg_ctl start failed:\n{}\n{}", String::from_utf8_lossy(&start.stderr), self.log());
        }
    }

    /// Stops the server now (`-m immediate`: connections are cut, as when
    /// the database host goes away).
    pub fn halt(&self) {
        let out = as_postgres(format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output()
            .expect("run pg_ctl");
        ok("pg_ctl stop", &out);
    }

    /// Runs SQL as the superuser over the unix socket (not intercepted).
    pub fn admin_sql(&self, sql: &str) -> String {
        self.admin_sql_in("postgres", sql)
    }

    /// [`PgServer::admin_sql`] in database `db`.
    pub fn admin_sql_in(&self, db: &str, sql: &str) -> String {
        let out = as_postgres("psql")
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-U", "admin", "-d", db, "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .expect("run psql");
        ok("admin psql", &out)
    }

    /// `pg_dump` of database `db` (as plain SQL), over the unix socket.
    pub fn dump(&self, db: &str) -> String {
        let out = as_postgres("pg_dump")
            .args(["-U", "admin", "-d", db, "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string()])
            .output()
            .expect("run pg_dump");
        ok("pg_dump", &out)
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = as_postgres(format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
