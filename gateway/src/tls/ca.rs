//! The gateway's certificate authority: created once per host, reloaded after.
//!
//! Layout below the state directory:
//!
//! ```text
//! ca/            0700
//! ca/ca.key      0600  PKCS#8 ECDSA P-256 private key (PEM)
//! ca/ca.crt      0644  self-signed CA certificate (PEM)
//! ca/.lock             serialises creation between concurrent `gateway` processes
//! ```

use std::{
    fs::{self, DirBuilder, File, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::{
    client::danger::ServerCertVerifier as _,
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::TlsError;

/// How long the CA is valid: long enough that hosts and images trusting it are
/// not re-provisioned in practice.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// X.520 upper bound for a common name.
const MAX_CN_LEN: usize = 64;

/// The gateway CA: its certificate and the issuer that signs minted leaves.
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    cert_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key, even by accident in a log line.
        f.debug_struct("CertificateAuthority").field("cert_path", &self.cert_path).finish_non_exhaustive()
    }
}

/// The paths of the CA files below a state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaPaths {
    /// `state_dir/ca`.
    pub dir: PathBuf,
    /// `state_dir/ca/ca.key`.
    pub key: PathBuf,
    /// `state_dir/ca/ca.crt`.
    pub cert: PathBuf,
}

impl CaPaths {
    /// The CA files of this state directory.
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join("ca");
        Self { key: dir.join("ca.key"), cert: dir.join("ca.crt"), dir }
    }
}

impl CertificateAuthority {
    /// Loads the CA from `state_dir/ca`, creating it on first run.
    ///
    /// A CA that exists is never replaced: a half-present, unreadable or
    /// inconsistent CA is an error naming the file, because silently minting a
    /// new CA would break every client that trusts the old one.
    pub fn load_or_create(state_dir: &Path) -> Result<Arc<Self>, TlsError> {
        let paths = CaPaths::new(state_dir);
        fs::create_dir_all(state_dir).map_err(|e| TlsError::io(state_dir, "create directory", e))?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&paths.dir)
            .map_err(|e| TlsError::io(&paths.dir, "create directory", e))?;

        // Two processes starting on a fresh host (the service and an operator's
        // `ca export`) must not each write a key and leave a mismatched pair.
        let lock_path = paths.dir.join(".lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| TlsError::io(&lock_path, "open", e))?;
        let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| TlsError::io(&lock_path, "lock", errno.into()))?;

        let key_exists = exists(&paths.key)?;
        let cert_exists = exists(&paths.cert)?;
        let ca = match (key_exists, cert_exists) {
            (true, true) => Self::load(&paths)?,
            (false, false) => Self::create(&paths)?,
            (true, false) => {
                return Err(TlsError::CaIncomplete { present: paths.key.clone(), missing: paths.cert.clone() })
            }
            (false, true) => {
                return Err(TlsError::CaIncomplete { present: paths.cert.clone(), missing: paths.key.clone() })
            }
        };
        ca.self_test()?;
        Ok(Arc::new(ca))
    }

    /// The CA certificate, PEM-encoded (what `gateway ca export` prints).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER-encoded (the last element of every minted chain).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Where the CA certificate is stored.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Signs a leaf for `public_key` with the CA key.
    pub(crate) fn sign(
        &self,
        params: &CertificateParams,
        public_key: &KeyPair,
    ) -> Result<rcgen::Certificate, rcgen::Error> {
        params.signed_by(public_key, &self.issuer)
    }

    fn create(paths: &CaPaths) -> Result<Self, TlsError> {
        let generate = |e: rcgen::Error| TlsError::CaGenerate(e.to_string());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate)?;
        let params = ca_params(&host_name());
        let cert = params.self_signed(&key).map_err(generate)?;

        // The key is written to a private temporary first so that a crash never
        // leaves a world-readable or truncated ca.key behind.
        write_atomically(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomically(&paths.cert, cert.pem().as_bytes(), 0o644)?;
        if let Ok(dir) = File::open(&paths.dir) {
            // Best effort: makes the renames durable before anyone trusts the CA.
            let _ = dir.sync_all();
        }
        tracing::info!(cert = %paths.cert.display(), key = %paths.key.display(), "created the gateway CA");
        let cert_der = cert.der().clone();
        Ok(Self {
            cert_pem: pem_encode(&cert_der),
            cert_der,
            cert_path: paths.cert.clone(),
            issuer: Issuer::new(params, key),
        })
    }

    fn load(paths: &CaPaths) -> Result<Self, TlsError> {
        let corrupt = |path: &Path, reason: String| TlsError::CaCorrupt { path: path.to_owned(), reason };

        warn_if_key_exposed(&paths.key);
        let key_pem = fs::read(&paths.key).map_err(|e| TlsError::io(&paths.key, "read", e))?;
        let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| corrupt(&paths.key, format!("not valid PEM: {e}")))?
            .ok_or_else(|| corrupt(&paths.key, "no PEM private key in the file".into()))?;
        let key = KeyPair::try_from(&key_der)
            .map_err(|e| corrupt(&paths.key, format!("unsupported or damaged private key: {e}")))?;

        let cert_pem = fs::read(&paths.cert).map_err(|e| TlsError::io(&paths.cert, "read", e))?;
        let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| corrupt(&paths.cert, format!("not valid PEM: {e}")))?;
        let cert_der = match <[_; 1]>::try_from(certs) {
            Ok([cert]) => cert,
            Err(certs) if certs.is_empty() => {
                return Err(corrupt(&paths.cert, "no PEM certificate in the file (empty, or not PEM)".into()))
            }
            Err(certs) => {
                return Err(corrupt(&paths.cert, format!("expected exactly one certificate, found {}", certs.len())))
            }
        };

        // rustls compares the certificate's public key with the key's.
        let signing_key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key_der.clone_key())
            .map_err(|e| corrupt(&paths.key, format!("unusable private key: {e}")))?;
        rustls::sign::CertifiedKey::new(vec![cert_der.clone()], signing_key)
            .keys_match()
            .map_err(|e| corrupt(&paths.cert, format!("does not belong to {}: {e}", paths.key.display())))?;

        // rcgen's DN parser panics on some malformed names instead of failing;
        // a damaged file must be an error, not a crash of the proxy.
        let issuer =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Issuer::from_ca_cert_der(&cert_der, key)))
                .map_err(|_| corrupt(&paths.cert, "malformed certificate".into()))?
                .map_err(|e| corrupt(&paths.cert, format!("not a usable CA certificate: {e}")))?;
        // Trust anchors are not checked for CA-ness by verifiers, so a leaf
        // dropped in by mistake would "work" here and fail in every client.
        if !issuer.key_usages().contains(&KeyUsagePurpose::KeyCertSign) {
            return Err(corrupt(
                &paths.cert,
                "not a CA certificate: its key usage does not allow signing certificates".into(),
            ));
        }

        Ok(Self { cert_pem: pem_encode(&cert_der), cert_der, cert_path: paths.cert.clone(), issuer })
    }

    /// Mints a throw-away leaf and verifies it against the CA certificate alone,
    /// so an expired, non-CA or otherwise unusable CA fails at start-up rather
    /// than on every intercepted connection.
    fn self_test(&self) -> Result<(), TlsError> {
        let fail = |reason: String| TlsError::CaCorrupt { path: self.cert_path.clone(), reason };
        let leaf = super::mint::mint_leaf(self, "ca-self-test.invalid", Duration::from_secs(3600))
            .map_err(|e| fail(format!("cannot sign with this CA: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone()).map_err(|e| fail(format!("not a usable trust anchor: {e}")))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let name = ServerName::try_from("ca-self-test.invalid").map_err(|e| fail(e.to_string()))?;
        verifier
            .verify_server_cert(&leaf.chain[0], &[], &name, &[], UnixTime::now())
            .map_err(|e| fail(format!("certificates it signs do not verify: {e}")))?;
        Ok(())
    }
}

/// Parameters of a new CA certificate.
fn ca_params(host: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let mut cn = format!("CI Gateway CA ({host})");
    if cn.len() > MAX_CN_LEN {
        let mut cut = MAX_CN_LEN - 4;
        while !cn.is_char_boundary(cut) {
            cut -= 1;
        }
        cn.truncate(cut);
        cn.push_str("...)");
    }
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "CI Gateway");
    // Two CAs with one subject (a re-created CA, two hosts with the same name)
    // would make verifiers pick the wrong issuer and report bad signatures
    // instead of an unknown CA; a random unit keeps every subject unique.
    dn.push(DnType::OrganizationalUnitName, format!("ca-{:08x}", rand::random::<u32>()));
    params.distinguished_name = dn;
    // Path length 0: the CA signs leaves only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    // Backdated a day: containers and VMs on the host may run slightly behind.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial());
    params
}

/// A positive 128-bit serial: unique per certificate as RFC 5280 requires.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// The host's name, for telling CAs of different hosts apart in trust stores.
fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown host".to_owned())
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|e| TlsError::io(path, "stat", e))
}

fn warn_if_key_exposed(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the CA key is readable by other users: anyone who can read it can impersonate any host to the jobs; chmod 600 it"
            );
        }
    }
}

/// Writes `path` via a temporary file in the same directory and a rename.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| TlsError::io(&tmp, "create", e))?;
        // The umask may have narrowed the mode; the caller's mode is the contract.
        file.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| TlsError::io(&tmp, "chmod", e))?;
        file.write_all(contents).map_err(|e| TlsError::io(&tmp, "write", e))?;
        file.sync_all().map_err(|e| TlsError::io(&tmp, "sync", e))?;
        fs::rename(&tmp, path).map_err(|e| TlsError::io(path, "replace", e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// PEM-encodes a certificate with 64-column lines, as OpenSSL writes it.
pub(crate) fn pem_encode(der: &CertificateDer<'_>) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Parses every certificate of a PEM file, naming the file in errors.
#[cfg(test)]
pub(crate) fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = fs::read(path).map_err(|e| TlsError::io(path, "read", e))?;
    rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::CaCorrupt { path: path.to_owned(), reason: format!("not valid PEM: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn creates_then_reloads_the_same_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::load_or_create(dir.path()).expect("create");
        let paths = CaPaths::new(dir.path());
        assert_eq!(mode(&paths.dir), 0o700);
        assert_eq!(mode(&paths.key), 0o600);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert_eq!(fs::read_to_string(&paths.cert).expect("read").trim(), ca.cert_pem().trim());

        let (_, parsed) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("parse");
        let cn = parsed.subject().iter_common_name().next().and_then(|a| a.as_str().ok()).expect("cn");
        assert!(cn.starts_with("CI Gateway CA ("), "{cn}");
        let bc = parsed.basic_constraints().expect("bc").expect("present").value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = parsed.key_usage().expect("ku").expect("present").value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        let years =
            (parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp()) / (365 * 86400);
        assert_eq!(years, 10);

        let again = CertificateAuthority::load_or_create(dir.path()).expect("reload");
        assert_eq!(again.cert_der(), ca.cert_der());
        assert_eq!(again.cert_pem(), ca.cert_pem());
    }

    #[test]
    fn leaves_signed_after_reload_chain_to_the_original_cert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = CertificateAuthority::load_or_create(dir.path()).expect("create");
        let reloaded = CertificateAuthority::load_or_create(dir.path()).expect("reload");
        let leaf = super::super::mint::mint_leaf(&reloaded, "api2.cursor.sh", Duration::from_secs(3600)).expect("mint");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(first.cert_der().clone()).expect("root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        let name = ServerName::try_from("api2.cursor.sh").expect("name");
        verifier.verify_server_cert(&leaf.chain[0], &[], &name, &[], UnixTime::now()).expect("verifies");
    }

    #[test]
    fn corrupt_or_partial_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        CertificateAuthority::load_or_create(dir.path()).expect("create");
        let paths = CaPaths::new(dir.path());
        let good_key = fs::read(&paths.key).expect("key");
        let good_cert = fs::read(&paths.cert).expect("cert");

        fs::write(&paths.cert, "garbage").expect("write");
        let err = CertificateAuthority::load_or_create(dir.path()).expect_err("garbage cert").to_string();
        assert!(err.contains("ca.crt") && err.contains("no PEM certificate"), "{err}");

        fs::write(&paths.cert, &good_cert).expect("write");
        fs::write(&paths.key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").expect("write");
        let err = CertificateAuthority::load_or_create(dir.path()).expect_err("bad key").to_string();
        assert!(err.contains("ca.key"), "{err}");

        // A valid key that is not the certificate's.
        let other = KeyPair::generate().expect("key");
        fs::write(&paths.key, other.serialize_pem()).expect("write");
        let err = CertificateAuthority::load_or_create(dir.path()).expect_err("mismatch").to_string();
        assert!(err.contains("ca.crt") && err.contains("does not belong to"), "{err}");

        fs::write(&paths.key, &good_key).expect("write");
        fs::remove_file(&paths.cert).expect("rm");
        let err = CertificateAuthority::load_or_create(dir.path()).expect_err("partial");
        assert!(matches!(err, TlsError::CaIncomplete { .. }), "{err}");
        assert!(err.to_string().contains("ca.crt is missing"), "{err}");
        // The surviving key is left alone: no silent re-creation.
        assert_eq!(fs::read(&paths.key).expect("key"), good_key);
    }

    #[test]
    fn a_non_ca_certificate_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = CaPaths::new(dir.path());
        fs::create_dir_all(&paths.dir).expect("mkdir");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["not-a-ca.example".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        fs::write(&paths.key, key.serialize_pem()).expect("write");
        fs::write(&paths.cert, cert.pem()).expect("write");
        let err = CertificateAuthority::load_or_create(dir.path()).expect_err("non-CA").to_string();
        assert!(err.contains("ca.crt") && err.contains("not a CA certificate"), "{err}");
    }

    #[test]
    fn long_host_names_keep_the_common_name_within_bounds() {
        let params = ca_params(&"h".repeat(200));
        let Some(rcgen::DnValue::Utf8String(cn)) = params.distinguished_name.get(&DnType::CommonName) else {
            panic!("no CN");
        };
        assert!(cn.len() <= MAX_CN_LEN, "{cn}");
        assert!(cn.ends_with("...)"));
    }
}
