//! Making the host and its jobs trust the gateway's CA (`gateway trust ...`).
//!
//! The work is done by [`install_trust`] and [`uninstall_trust`], which take
//! every path as a parameter ([`TrustPaths`]) so tests run them against a
//! temporary directory instead of the host's trust store.

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use super::{
    ca::{pem_encode, write_atomically, CaPaths},
    CertificateAuthority, TlsError,
};

/// Where `trust install` puts the CA for `update-ca-certificates`.
pub const SYSTEM_ANCHOR: &str = "/usr/local/share/ca-certificates/ci-gateway.crt";
/// System CA bundles, most common first (Debian/Ubuntu, RHEL/Fedora, SUSE, Alpine).
pub const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// First line of every env file we write; uninstall only removes files carrying it.
const ENV_MARKER: &str = "# Written by `gateway trust install`";

/// Every path `trust install` and `uninstall` touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPaths {
    /// The CA files (`state_dir/ca`).
    pub ca: CaPaths,
    /// The bundle for jobs: system bundle plus the gateway CA.
    pub bundle: PathBuf,
    /// The CA's copy in the system store's input directory.
    pub system_anchor: PathBuf,
    /// Candidate system bundles; the first that exists is used.
    pub system_bundles: Vec<PathBuf>,
    /// The command that rebuilds the system store.
    pub update_command: PathBuf,
    /// The environment file for jobs.
    pub env_file: PathBuf,
    /// Java trust stores to import the CA into (one per JDK installed).
    pub java: Vec<JavaStore>,
}

/// One JDK's trust store and the `keytool` that edits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JavaStore {
    /// The `cacerts` keystore (resolved: Debian's JDKs share /etc/ssl/certs/java/cacerts).
    pub keystore: PathBuf,
    /// That JDK's `bin/keytool`.
    pub keytool: PathBuf,
}

/// Alias of the gateway CA in Java trust stores.
pub const JAVA_ALIAS: &str = "ci-gateway";
/// Where JDKs are installed (Debian, RHEL, SUSE, Alpine alike).
const JVM_DIR: &str = "/usr/lib/jvm";
/// The password every JDK ships its `cacerts` with (it guards integrity,
/// not secrecy: the store holds only public certificates).
const CACERTS_PASSWORD: &str = "changeit";

/// Every JDK's trust store on this host: below /usr/lib/jvm and `$JAVA_HOME`,
/// each store once.
pub fn java_stores() -> Vec<JavaStore> {
    let mut homes: Vec<PathBuf> = std::env::var_os("JAVA_HOME").map(PathBuf::from).into_iter().collect();
    if let Ok(entries) = fs::read_dir(JVM_DIR) {
        let mut found: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        found.sort();
        homes.extend(found);
    }
    let mut stores: Vec<JavaStore> = Vec::new();
    for home in homes {
        let keytool = home.join("bin/keytool");
        let Ok(keystore) = fs::canonicalize(home.join("lib/security/cacerts")) else { continue };
        if keytool.is_file() && !stores.iter().any(|s| s.keystore == keystore) {
            stores.push(JavaStore { keystore, keytool });
        }
    }
    stores
}

impl TrustPaths {
    /// The real host's paths.
    pub fn for_host(state_dir: &Path, env_file: &Path) -> Self {
        let ca = CaPaths::new(state_dir);
        Self {
            bundle: ca.dir.join("bundle.pem"),
            ca,
            system_anchor: PathBuf::from(SYSTEM_ANCHOR),
            system_bundles: SYSTEM_BUNDLES.iter().map(PathBuf::from).collect(),
            update_command: PathBuf::from("update-ca-certificates"),
            env_file: env_file.to_owned(),
            java: java_stores(),
        }
    }
}

/// Makes the host and its jobs trust `ca`; returns what was done, one line each.
///
/// Idempotent: run it again after the system's CA package is upgraded, so the
/// jobs' bundle picks up the new system roots.
pub fn install_trust(paths: &TrustPaths, ca: &CertificateAuthority, system: bool) -> Result<Vec<String>, TlsError> {
    let mut done = Vec::new();
    for path in [&paths.bundle, &paths.ca.cert] {
        if !env_safe(path) {
            return Err(TlsError::UnsafeEnvPath { path: path.clone() });
        }
    }
    let pem = ca.cert_pem();

    if system {
        let anchor_dir = paths.system_anchor.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(anchor_dir).map_err(|e| TlsError::io(anchor_dir, "create directory", e))?;
        write_atomically(&paths.system_anchor, pem.as_bytes(), 0o644)?;
        done.push(format!("installed the CA certificate as {}", paths.system_anchor.display()));
        done.push(run_update(&paths.update_command)?);
    } else {
        done.push("left the system trust store alone (--no-system)".to_owned());
    }

    // Read after updating the system store: if it now contains our CA, the
    // bundle must not list it twice.
    let (system_bundle, system_pem) = read_system_bundle(&paths.system_bundles)?;
    let already = rustls_pemfile::certs(&mut system_pem.as_bytes()).flatten().any(|c| &c == ca.cert_der());
    let mut bundle = system_pem;
    if !bundle.is_empty() && !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    if !already {
        bundle.push_str("# CI Gateway CA\n");
        bundle.push_str(&pem_encode(ca.cert_der()));
    }
    write_atomically(&paths.bundle, bundle.as_bytes(), 0o644)?;
    done.push(format!(
        "wrote {} (system roots from {} plus the gateway CA)",
        paths.bundle.display(),
        system_bundle.display()
    ));
    if let Some(line) = open_for_jobs(&paths.ca.dir)? {
        done.push(line);
    }

    let env_dir = paths.env_file.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(env_dir).map_err(|e| TlsError::io(env_dir, "create directory", e))?;
    write_atomically(&paths.env_file, env_file_contents(paths).as_bytes(), 0o644)?;
    done.push(format!(
        "wrote {} ({} -> bundle; NODE_EXTRA_CA_CERTS -> CA)",
        paths.env_file.display(),
        BUNDLE_VARS.join(", ")
    ));
    for store in &paths.java {
        done.push(java_import(store, &paths.ca.cert)?);
    }
    if paths.java.is_empty() {
        done.push("no JDK found (/usr/lib/jvm, JAVA_HOME): no Java trust store to update".to_owned());
    }
    Ok(done)
}

/// Variables that name the bundle (system roots plus the gateway CA), so a
/// runtime that reads only this file still verifies public hosts.
pub const BUNDLE_VARS: [&str; 8] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "AWS_CA_BUNDLE",
    "NPM_CONFIG_CAFILE",
];

fn keytool(store: &JavaStore, args: &[&str]) -> Command {
    let mut cmd = Command::new(&store.keytool);
    cmd.args(args).arg("-keystore").arg(&store.keystore).args(["-storepass", CACERTS_PASSWORD, "-noprompt"]);
    cmd
}

fn java_has_alias(store: &JavaStore) -> Result<bool, TlsError> {
    let out = keytool(store, &["-list", "-alias", JAVA_ALIAS])
        .output()
        .map_err(|e| TlsError::Command { command: store.keytool.display().to_string(), reason: e.to_string() })?;
    Ok(out.status.success())
}

fn run_keytool(store: &JavaStore, args: &[&str]) -> Result<(), TlsError> {
    let shown = format!("{} {}", store.keytool.display(), args.first().copied().unwrap_or(""));
    let out = keytool(store, args)
        .output()
        .map_err(|e| TlsError::Command { command: shown.clone(), reason: e.to_string() })?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned() + String::from_utf8_lossy(&out.stderr).trim();
        return Err(TlsError::Command { command: shown, reason: format!("{}: {said}", out.status) });
    }
    Ok(())
}

/// Imports the CA into one Java trust store, replacing an older gateway CA.
fn java_import(store: &JavaStore, cert: &Path) -> Result<String, TlsError> {
    if java_has_alias(store)? {
        run_keytool(store, &["-delete", "-alias", JAVA_ALIAS])?;
    }
    let file = cert.to_string_lossy();
    run_keytool(store, &["-importcert", "-alias", JAVA_ALIAS, "-file", &file])?;
    Ok(format!("imported the CA into the Java trust store {} as `{JAVA_ALIAS}`", store.keystore.display()))
}

/// Reverses [`install_trust`]; the CA itself is kept. Returns what was done.
pub fn uninstall_trust(paths: &TrustPaths, system: bool) -> Result<Vec<String>, TlsError> {
    let mut done = Vec::new();
    if system {
        if remove_if_present(&paths.system_anchor)? {
            done.push(format!("removed {}", paths.system_anchor.display()));
            done.push(run_update(&paths.update_command)?);
        } else {
            done.push(format!("{} was not installed", paths.system_anchor.display()));
        }
    } else {
        done.push("left the system trust store alone (--no-system)".to_owned());
    }
    match fs::read_to_string(&paths.env_file) {
        Ok(text) if !text.starts_with(ENV_MARKER) => {
            return Err(TlsError::io(
                &paths.env_file,
                "remove",
                std::io::Error::other("not written by `gateway trust install`; leaving it alone"),
            ));
        }
        Ok(_) => {
            remove_if_present(&paths.env_file)?;
            done.push(format!("removed {}", paths.env_file.display()));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => done.push(format!("{} was not present", paths.env_file.display())),
        Err(e) => return Err(TlsError::io(&paths.env_file, "read", e)),
    }
    if remove_if_present(&paths.bundle)? {
        done.push(format!("removed {}", paths.bundle.display()));
    } else {
        done.push(format!("{} was not present", paths.bundle.display()));
    }
    for store in &paths.java {
        if java_has_alias(store)? {
            run_keytool(store, &["-delete", "-alias", JAVA_ALIAS])?;
            done.push(format!("removed `{JAVA_ALIAS}` from the Java trust store {}", store.keystore.display()));
        }
    }
    done.push(format!("kept the CA in {} (delete it to retire the CA for good)", paths.ca.dir.display()));
    Ok(done)
}

fn env_file_contents(paths: &TrustPaths) -> String {
    let bundle = paths.bundle.display();
    let ca = paths.ca.cert.display();
    let mut text = format!(
        "{ENV_MARKER}: makes TLS clients in CI jobs trust the CI gateway CA.\n\
         # Plain KEY=value lines: usable as a systemd EnvironmentFile, a docker --env-file, or `set -a; . FILE`.\n\
         # The bundle is the system roots plus the gateway CA, so public hosts still verify.\n"
    );
    for var in BUNDLE_VARS {
        text.push_str(&format!("{var}={bundle}\n"));
    }
    // Node adds this file to its built-in roots (it never reads the system store).
    text.push_str(&format!("NODE_EXTRA_CA_CERTS={ca}\n"));
    text
}

/// Whether a path can be written unquoted in an env file and read back the
/// same by systemd, docker and a shell alike.
fn env_safe(path: &Path) -> bool {
    path.to_str().is_some_and(|s| !s.chars().any(|c| c.is_whitespace() || "\"'$\\`#".contains(c)))
}

fn read_system_bundle(candidates: &[PathBuf]) -> Result<(PathBuf, String), TlsError> {
    for path in candidates {
        match fs::read_to_string(path) {
            Ok(text) => return Ok((path.clone(), text)),
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(TlsError::io(path, "read", e)),
        }
    }
    Err(TlsError::NoSystemBundle {
        tried: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// The CA directory is created 0700 to keep the key private; jobs running as
/// other users must still open `ca.crt` and `bundle.pem` in it by name, so
/// trusting the CA grants search (not read or list) permission. The key stays
/// 0600, which is what protects it.
fn open_for_jobs(dir: &Path) -> Result<Option<String>, TlsError> {
    let mode = fs::metadata(dir).map_err(|e| TlsError::io(dir, "stat", e))?.permissions().mode() & 0o777;
    if mode & 0o011 == 0o011 {
        return Ok(None);
    }
    let new_mode = mode | 0o011;
    fs::set_permissions(dir, fs::Permissions::from_mode(new_mode)).map_err(|e| TlsError::io(dir, "chmod", e))?;
    Ok(Some(format!("made {} searchable by jobs (mode {new_mode:o}; the key itself stays 0600)", dir.display())))
}

fn remove_if_present(path: &Path) -> Result<bool, TlsError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(TlsError::io(path, "remove", e)),
    }
}

fn run_update(command: &Path) -> Result<String, TlsError> {
    let shown = command.display().to_string();
    let output = Command::new(command).output().map_err(|e| TlsError::Command {
        command: shown.clone(),
        reason: if e.kind() == ErrorKind::NotFound {
            "not found: install the ca-certificates package, or use --no-system and add the CA to the system store by hand"
                .to_owned()
        } else {
            e.to_string()
        },
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(TlsError::Command { command: shown, reason: format!("{}: {}", output.status, stderr.trim()) });
    }
    Ok(format!("ran {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::temp_ca;

    struct Fixture {
        _state: tempfile::TempDir,
        root: tempfile::TempDir,
        ca: std::sync::Arc<CertificateAuthority>,
        paths: TrustPaths,
    }

    /// A fake host: system store, bundle and env file in a temp dir, and an
    /// `update-ca-certificates` that records its runs.
    fn fixture() -> Fixture {
        let (state, ca) = temp_ca();
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        fs::write(r.join("system.crt"), "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----").expect("write");
        let update = r.join("update-ca-certificates");
        fs::write(&update, format!("#!/bin/sh\necho run >> {}\n", r.join("update.log").display())).expect("write");
        fs::set_permissions(&update, fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut paths = TrustPaths::for_host(state.path(), &r.join("etc/ci-gateway/ca.env"));
        paths.system_anchor = r.join("share/ca-certificates/ci-gateway.crt");
        paths.system_bundles = vec![r.join("missing.crt"), r.join("system.crt")];
        paths.update_command = update;
        paths.java = Vec::new();
        Fixture { _state: state, root, ca, paths }
    }

    fn count_certs(path: &Path) -> usize {
        let text = fs::read_to_string(path).expect("read");
        text.matches("-----BEGIN CERTIFICATE-----").count()
    }

    #[test]
    fn install_writes_bundle_env_and_anchor_then_uninstall_reverts() {
        let f = fixture();
        let actions = install_trust(&f.paths, &f.ca, true).expect("install");
        assert!(actions.iter().any(|a| a.contains("ran ")), "{actions:?}");
        assert_eq!(fs::read_to_string(&f.paths.system_anchor).expect("anchor"), f.ca.cert_pem());
        assert_eq!(fs::read_to_string(f.root.path().join("update.log")).expect("log"), "run\n");

        let bundle = fs::read_to_string(&f.paths.bundle).expect("bundle");
        assert!(bundle.starts_with("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"), "{bundle}");
        assert!(bundle.ends_with(f.ca.cert_pem()));
        assert_eq!(fs::metadata(&f.paths.bundle).expect("stat").permissions().mode() & 0o777, 0o644);
        // Jobs can reach the public files by name but not list the directory.
        assert_eq!(fs::metadata(&f.paths.ca.dir).expect("stat").permissions().mode() & 0o777, 0o711);
        assert_eq!(fs::metadata(&f.paths.ca.key).expect("stat").permissions().mode() & 0o777, 0o600);

        let env = fs::read_to_string(&f.paths.env_file).expect("env");
        assert_eq!(fs::metadata(&f.paths.env_file).expect("stat").permissions().mode() & 0o777, 0o644);
        let vars: Vec<(&str, &str)> =
            env.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')).collect();
        let bundle_path = f.paths.bundle.to_str().expect("utf8");
        assert_eq!(
            vars,
            vec![
                ("SSL_CERT_FILE", bundle_path),
                ("REQUESTS_CA_BUNDLE", bundle_path),
                ("CURL_CA_BUNDLE", bundle_path),
                ("GIT_SSL_CAINFO", bundle_path),
                ("PIP_CERT", bundle_path),
                ("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", bundle_path),
                ("AWS_CA_BUNDLE", bundle_path),
                ("NPM_CONFIG_CAFILE", bundle_path),
                ("NODE_EXTRA_CA_CERTS", f.paths.ca.cert.to_str().expect("utf8")),
            ]
        );

        // Idempotent.
        install_trust(&f.paths, &f.ca, true).expect("install again");
        assert_eq!(count_certs(&f.paths.bundle), 2);

        let actions = uninstall_trust(&f.paths, true).expect("uninstall");
        assert!(
            !f.paths.system_anchor.exists() && !f.paths.env_file.exists() && !f.paths.bundle.exists(),
            "{actions:?}"
        );
        assert!(f.paths.ca.key.exists() && f.paths.ca.cert.exists());
        assert_eq!(fs::read_to_string(f.root.path().join("update.log")).expect("log"), "run\nrun\nrun\n");
        // Uninstalling twice is harmless and runs nothing.
        uninstall_trust(&f.paths, true).expect("uninstall again");
        assert_eq!(fs::read_to_string(f.root.path().join("update.log")).expect("log").lines().count(), 3);
    }

    #[test]
    fn no_system_leaves_the_store_alone_and_the_ca_is_not_duplicated() {
        let f = fixture();
        // A system bundle that already contains the CA (as after update-ca-certificates).
        let system = f.root.path().join("system.crt");
        let mut text = fs::read_to_string(&system).expect("read");
        text.push('\n');
        text.push_str(f.ca.cert_pem());
        fs::write(&system, text).expect("write");
        install_trust(&f.paths, &f.ca, false).expect("install");
        assert!(!f.paths.system_anchor.exists());
        assert!(!f.root.path().join("update.log").exists());
        assert_eq!(count_certs(&f.paths.bundle), 2);
    }

    #[tokio::test]
    async fn a_tls_client_trusting_only_the_bundle_accepts_minted_leaves() {
        let f = fixture();
        // Use only real certificates so the bundle parses fully.
        let (_d, other) = temp_ca();
        fs::write(f.root.path().join("system.crt"), other.cert_pem()).expect("write");
        install_trust(&f.paths, &f.ca, false).expect("install");
        let certs = crate::tls::ca::read_pem_certs(&f.paths.bundle).expect("parse bundle");
        assert_eq!(certs, vec![other.cert_der().clone(), f.ca.cert_der().clone()]);

        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(certs);
        let upstream = crate::tls::UpstreamTls::with_roots(roots).expect("client");
        let (client, server) = crate::tls::test_support::tcp_pair().await;
        let config = crate::tls::LeafCache::new(f.ca.clone(), std::time::Duration::from_secs(86400), 4)
            .server_config("api2.cursor.sh", &[])
            .expect("config");
        let accept = tokio::spawn(tokio_rustls::TlsAcceptor::from(config).accept(server));
        let tls = upstream.connect(client, "api2.cursor.sh", vec![]).await.expect("handshake");
        assert!(tls.get_ref().1.peer_certificates().is_some_and(|c| c.len() == 2));
        accept.await.expect("join").expect("server handshake");
    }

    #[test]
    fn failures_are_clear() {
        let f = fixture();
        let mut missing_cmd = f.paths.clone();
        missing_cmd.update_command = f.root.path().join("no-such-update-ca-certificates");
        let err = install_trust(&missing_cmd, &f.ca, true).expect_err("missing command").to_string();
        assert!(err.contains("no-such-update-ca-certificates") && err.contains("ca-certificates package"), "{err}");

        let mut failing = f.paths.clone();
        failing.update_command = PathBuf::from("false");
        let err = install_trust(&failing, &f.ca, true).expect_err("failing command").to_string();
        assert!(err.contains("`false`") && err.contains("exit status"), "{err}");

        let mut no_bundle = f.paths.clone();
        no_bundle.system_bundles = vec![f.root.path().join("nope.crt")];
        let err = install_trust(&no_bundle, &f.ca, false).expect_err("no bundle").to_string();
        assert!(err.contains("nope.crt") && err.contains("no system CA bundle"), "{err}");

        fs::create_dir_all(f.paths.env_file.parent().expect("parent")).expect("mkdir");
        fs::write(&f.paths.env_file, "SOMETHING=else\n").expect("write");
        let err = uninstall_trust(&f.paths, false).expect_err("foreign env file").to_string();
        assert!(err.contains("ca.env") && err.contains("not written by"), "{err}");
        assert!(f.paths.env_file.exists());
    }

    /// The real keytool of an installed JDK, on a copy of its trust store.
    #[test]
    fn java_trust_store_gets_the_ca_and_loses_it_again() {
        let host = java_stores();
        let jdk = host
            .first()
            .unwrap_or_else(|| panic!("no JDK in /usr/lib/jvm: `cargo xtask setup` installs default-jdk-headless"));
        let mut f = fixture();
        let store = f.root.path().join("cacerts");
        fs::copy(&jdk.keystore, &store).expect("copy cacerts");
        f.paths.java = vec![JavaStore { keystore: store.clone(), keytool: jdk.keytool.clone() }];
        let count = |paths: &TrustPaths| {
            let out = keytool(&paths.java[0], &["-list"]).output().expect("keytool -list");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with(&format!("{JAVA_ALIAS},"))).count()
        };
        install_trust(&f.paths, &f.ca, false).expect("install");
        assert_eq!(count(&f.paths), 1);
        install_trust(&f.paths, &f.ca, false).expect("install again");
        assert_eq!(count(&f.paths), 1, "idempotent");
        let actions = uninstall_trust(&f.paths, false).expect("uninstall");
        assert!(actions.iter().any(|a| a.contains("Java trust store")), "{actions:?}");
        assert_eq!(count(&f.paths), 0);
    }

    #[test]
    fn paths_that_need_quoting_are_refused() {
        let f = fixture();
        let mut paths = f.paths.clone();
        paths.bundle = f.root.path().join("with space/bundle.pem");
        let err = install_trust(&paths, &f.ca, false).expect_err("space");
        assert!(matches!(err, TlsError::UnsafeEnvPath { .. }), "{err}");
    }
}
