//! Short-lived JWTs the gateway mints for a job's identity, and the JWKS
//! document backends use to verify them.
//!
//! Keys live in a directory (normally `state_dir/jwt/`):
//!
//! * `keys.json`: every published key — id, algorithm, creation and
//!   retirement time, public JWK. Public data only.
//! * `<kid>.key`: the PKCS#8 private key of the *current* key, mode 0600.
//!   A retired key's private half is deleted at retirement: nothing may sign
//!   with it again, only its public half stays published.
//!
//! Rotation makes a new current key; the old public key stays in the JWKS
//! until every token it signed has expired (retired_at + longest lifetime it
//! was used with + [`PRUNE_SKEW`]) and is pruned after that. A JWKS consumer
//! that caches must refetch on an unknown `kid`, which every mainstream JWT
//! library does.

use std::{
    collections::BTreeMap,
    fmt, fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use base64::Engine;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{
    clock::Clock,
    config::{JwtAlgorithm, JwtConfig},
    secret::SecretString,
};

/// Retired keys stay published this much longer than their last token lives,
/// for verifiers whose clocks run behind and that apply `exp` leeway.
pub const PRUNE_SKEW: u64 = 60;

const INDEX_FILE: &str = "keys.json";
const INDEX_VERSION: u32 = 1;
/// JWKS consumers may cache this long; after a rotation they find the new key
/// by refetching on the unknown `kid`, so this only bounds staleness of pruning.
const JWKS_MAX_AGE: u64 = 300;

/// Why minting, key loading or rotation failed. Never contains key material or tokens.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// A key file or the key directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key file is readable by others than its owner.
    #[error("{path}: mode is {mode:04o}; JWT signing keys must be 0600 or 0400")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A key file or the index is not what the gateway wrote.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Key generation or signing failed.
    #[error("signing: {0}")]
    Crypto(String),
    /// The request cannot be minted (empty subject or audience, no issuer).
    #[error("cannot mint a token: {0}")]
    Invalid(&'static str),
}

/// What to put into a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MintRequest {
    /// `sub`: the identity URI.
    pub subject: String,
    /// `aud`: the destination (host name) the token is for.
    pub audience: String,
    /// `labels`: identity labels (operator-defined).
    pub labels: BTreeMap<String, String>,
    /// `job`: CI job variables (repository, ref, run id…).
    pub job: BTreeMap<String, String>,
}

/// A minted token. `Debug` shows everything but the token.
#[derive(Debug, Clone)]
pub struct MintedToken {
    /// The compact JWS. A bearer credential: never log it.
    pub token: SecretString,
    /// Id of the key that signed it.
    pub kid: String,
    /// `jti` claim, safe to log.
    pub jti: String,
    /// `iat` (seconds since the epoch).
    pub issued_at: u64,
    /// `exp` (seconds since the epoch).
    pub expires_at: u64,
}

/// The claims of a gateway-minted token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayClaims {
    /// Issuer: the gateway (`credentials.jwt.issuer`).
    pub iss: String,
    /// Subject: the identity URI.
    pub sub: String,
    /// Audience: the destination.
    pub aud: String,
    /// Issued at.
    pub iat: u64,
    /// Not before (= `iat`).
    pub nbf: u64,
    /// Expiry.
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
    /// Identity labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// CI job variables.
    #[serde(default)]
    pub job: BTreeMap<String, String>,
}

/// One published key, as persisted in `keys.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct KeyRecord {
    kid: String,
    alg: JwtAlgorithm,
    created_at: u64,
    retired_at: Option<u64>,
    /// The longest token lifetime configured while this key signed, so a
    /// lifetime shortened across a restart cannot prune a key too early.
    max_lifetime: u64,
    jwk: Value,
}

impl KeyRecord {
    fn published_until(&self) -> Option<u64> {
        self.retired_at.map(|t| t.saturating_add(self.max_lifetime).saturating_add(PRUNE_SKEW))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KeyIndex {
    version: u32,
    keys: Vec<KeyRecord>,
}

/// The key that signs new tokens.
struct SigningKey {
    kid: String,
    alg: JwtAlgorithm,
    created_at: u64,
    key: EncodingKey,
}

struct Ring {
    records: Vec<KeyRecord>,
    current: SigningKey,
}

/// Mints tokens and publishes the keys that verify them.
pub struct Minter {
    issuer: String,
    lifetime: u64,
    algorithm: JwtAlgorithm,
    rotate_every: u64,
    dir: PathBuf,
    clock: Arc<dyn Clock>,
    ring: RwLock<Ring>,
}

impl fmt::Debug for Minter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ring = self.read();
        f.debug_struct("Minter")
            .field("issuer", &self.issuer)
            .field("dir", &self.dir)
            .field("current_kid", &ring.current.kid)
            .field("published", &ring.records.len())
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// Opens (creating if needed) the key directory `key_dir` and loads or
    /// generates the current key. A current key of another algorithm than
    /// configured is rotated out immediately.
    pub fn open(config: &JwtConfig, key_dir: &Path, clock: Arc<dyn Clock>) -> Result<Self, JwtError> {
        let dir = key_dir.to_path_buf();
        fs::create_dir_all(&dir).map_err(|source| JwtError::Io { path: dir.clone(), source })?;
        // Only the gateway reads this directory; tighten whatever was there.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|source| JwtError::Io { path: dir.clone(), source })?;
        let lifetime = config.lifetime.as_secs();
        let now = clock.now();
        let index_path = dir.join(INDEX_FILE);
        let mut records = match fs::read(&index_path) {
            Ok(bytes) => {
                let index: KeyIndex = serde_json::from_slice(&bytes)
                    .map_err(|e| JwtError::Corrupt { path: index_path.clone(), reason: e.to_string() })?;
                if index.version != INDEX_VERSION {
                    return Err(JwtError::Corrupt {
                        path: index_path,
                        reason: format!("unknown version {}", index.version),
                    });
                }
                index.keys
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(JwtError::Io { path: index_path, source }),
        };
        // Exactly one key may be current; an interrupted rotation can leave two.
        let last_current = records.iter().rposition(|r| r.retired_at.is_none());
        for (i, r) in records.iter_mut().enumerate() {
            if r.retired_at.is_none() && Some(i) != last_current {
                r.retired_at = Some(now);
            }
        }
        let current = match last_current.map(|i| &records[i]) {
            Some(record) if record.alg == config.algorithm => Some(load_key(&dir, record)?),
            _ => None,
        };
        let current = match current {
            Some(key) => key,
            None => {
                let key = new_key(&dir, config.algorithm, now, lifetime, &mut records)?;
                tracing::info!(kid = %key.kid, alg = key.alg.as_str(), "generated JWT signing key");
                key
            }
        };
        for r in records.iter_mut().filter(|r| r.kid == current.kid) {
            r.max_lifetime = r.max_lifetime.max(lifetime);
        }
        let minter = Self {
            issuer: config.issuer.clone(),
            lifetime,
            algorithm: config.algorithm,
            rotate_every: config.rotate_every.as_secs(),
            dir,
            clock,
            ring: RwLock::new(Ring { records, current }),
        };
        {
            let mut ring = minter.write();
            minter.prune_locked(&mut ring);
            minter.persist(&ring)?;
            minter.remove_stale_private_keys(&ring);
        }
        Ok(minter)
    }

    /// Mints a token for `request.subject` with audience `request.audience`.
    pub fn mint(&self, request: &MintRequest) -> Result<MintedToken, JwtError> {
        if self.issuer.is_empty() {
            return Err(JwtError::Invalid("no issuer is configured (credentials.jwt.issuer)"));
        }
        if request.subject.is_empty() {
            return Err(JwtError::Invalid("empty subject"));
        }
        if request.audience.is_empty() {
            return Err(JwtError::Invalid("empty audience"));
        }
        let now = self.clock.now();
        let mut id = [0u8; 16];
        rand::rng().fill_bytes(&mut id);
        let jti = hex::encode(id);
        let claims = GatewayClaims {
            iss: self.issuer.clone(),
            sub: request.subject.clone(),
            aud: request.audience.clone(),
            iat: now,
            nbf: now,
            exp: now + self.lifetime,
            jti: jti.clone(),
            labels: request.labels.clone(),
            job: request.job.clone(),
        };
        let ring = self.read();
        let mut header = Header::new(jwt_algorithm(ring.current.alg));
        header.kid = Some(ring.current.kid.clone());
        header.typ = Some("JWT".into());
        let token =
            jsonwebtoken::encode(&header, &claims, &ring.current.key).map_err(|e| JwtError::Crypto(e.to_string()))?;
        tracing::debug!(kid = %ring.current.kid, %jti, sub = %claims.sub, aud = %claims.aud, "minted token");
        Ok(MintedToken {
            token: SecretString::new(token),
            kid: ring.current.kid.clone(),
            jti,
            issued_at: now,
            expires_at: claims.exp,
        })
    }

    /// Makes a new current key; the previous one is retired (its private key
    /// deleted, its public key still published). Returns the new key id.
    pub fn rotate(&self) -> Result<String, JwtError> {
        let mut ring = self.write();
        self.rotate_locked(&mut ring)
    }

    /// Rotates if the current key is older than `rotate_every` (or of another
    /// algorithm), and prunes retired keys whose tokens have all expired. Meant
    /// to be called periodically (every minute is plenty). Returns the new key
    /// id if it rotated.
    pub fn rotate_if_due(&self) -> Result<Option<String>, JwtError> {
        let mut ring = self.write();
        let now = self.clock.now();
        let due =
            now.saturating_sub(ring.current.created_at) >= self.rotate_every || ring.current.alg != self.algorithm;
        if due {
            return self.rotate_locked(&mut ring).map(Some);
        }
        if self.prune_locked(&mut ring) {
            self.persist(&ring)?;
        }
        Ok(None)
    }

    fn rotate_locked(&self, ring: &mut Ring) -> Result<String, JwtError> {
        let now = self.clock.now();
        let mut records = ring.records.clone();
        let old = ring.current.kid.clone();
        for r in records.iter_mut().filter(|r| r.retired_at.is_none()) {
            r.retired_at = Some(now);
        }
        let key = new_key(&self.dir, self.algorithm, now, self.lifetime, &mut records)?;
        let next = Ring { records, current: key };
        // The index names the new key before the old private key goes, so a
        // crash in between leaves a consistent directory.
        self.persist(&next)?;
        *ring = next;
        self.prune_locked(ring);
        self.remove_stale_private_keys(ring);
        tracing::info!(old_kid = %old, kid = %ring.current.kid, "rotated JWT signing key");
        Ok(ring.current.kid.clone())
    }

    /// Drops retired keys whose every token has expired; returns whether any went.
    fn prune_locked(&self, ring: &mut Ring) -> bool {
        let now = self.clock.now();
        let before = ring.records.len();
        ring.records.retain(|r| match r.published_until() {
            Some(until) if now >= until => {
                tracing::info!(kid = %r.kid, "pruned retired JWT signing key");
                false
            }
            _ => true,
        });
        ring.records.len() != before
    }

    /// Deletes private keys that are not the current key's: retired keys and
    /// leftovers of an interrupted rotation.
    fn remove_stale_private_keys(&self, ring: &Ring) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(kid) = name.strip_suffix(".key") {
                if kid != ring.current.kid {
                    if let Err(error) = fs::remove_file(entry.path()) {
                        tracing::warn!(%kid, %error, "cannot delete a retired JWT private key");
                    }
                }
            }
        }
    }

    fn persist(&self, ring: &Ring) -> Result<(), JwtError> {
        let index = KeyIndex { version: INDEX_VERSION, keys: ring.records.clone() };
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| JwtError::Crypto(e.to_string()))?;
        write_atomic(&self.dir.join(INDEX_FILE), &bytes)
    }

    /// The JWKS: the current key and every retired key that may still have
    /// unexpired tokens, newest first.
    pub fn jwks(&self) -> Value {
        let now = self.clock.now();
        let ring = self.read();
        let keys: Vec<Value> = ring
            .records
            .iter()
            .rev()
            .filter(|r| r.published_until().is_none_or(|until| now < until))
            .map(|r| r.jwk.clone())
            .collect();
        json!({ "keys": keys })
    }

    /// Id of the key that signs new tokens.
    pub fn current_kid(&self) -> String {
        self.read().current.kid.clone()
    }

    /// The configured issuer (`iss`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A minimal OpenID Provider metadata document for backends that discover
    /// keys through `/.well-known/openid-configuration`.
    pub fn discovery_document(&self, jwks_uri: &str) -> Value {
        let algs: Vec<&str> = {
            let ring = self.read();
            let mut algs: Vec<&str> = ring.records.iter().map(|r| r.alg.as_str()).collect();
            algs.sort_unstable();
            algs.dedup();
            algs
        };
        json!({
            "issuer": self.issuer,
            "jwks_uri": jwks_uri,
            "id_token_signing_alg_values_supported": algs,
            "subject_types_supported": ["public"],
            "response_types_supported": ["id_token"],
        })
    }

    /// The JWKS as an HTTP response (`application/json`, cacheable briefly).
    pub fn jwks_response(&self) -> Response<Full<Bytes>> {
        let body = Bytes::from(self.jwks().to_string());
        let mut response = Response::new(Full::new(body));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_str(&format!("public, max-age={JWKS_MAX_AGE}"))
                .unwrap_or(header::HeaderValue::from_static("no-cache")),
        );
        response
    }

    /// Answers a request for the JWKS: `GET`/`HEAD` get the document, other
    /// methods 405. Whatever path it is mounted on is the caller's choice
    /// (conventionally `/.well-known/jwks.json`).
    pub fn handle_jwks_request<B>(&self, request: &Request<B>) -> Response<Full<Bytes>> {
        if request.method() == Method::GET || request.method() == Method::HEAD {
            return self.jwks_response();
        }
        let mut response = Response::new(Full::new(Bytes::from_static(b"method not allowed\n")));
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        response
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        // The ring is replaced whole, never left half-updated, so a poisoned
        // lock still guards a consistent value.
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn jwt_algorithm(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::Es256 => Algorithm::ES256,
        JwtAlgorithm::EdDsa => Algorithm::EdDSA,
    }
}

fn rcgen_algorithm(alg: JwtAlgorithm) -> &'static rcgen::SignatureAlgorithm {
    match alg {
        JwtAlgorithm::Es256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        JwtAlgorithm::EdDsa => &rcgen::PKCS_ED25519,
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The public JWK and its RFC 7638 thumbprint, which is the key id: stable,
/// derived from the key alone, and safe in file names (base64url).
fn public_jwk(alg: JwtAlgorithm, raw_public: &[u8]) -> Result<(String, Value), String> {
    let (canonical, mut jwk) = match alg {
        JwtAlgorithm::Es256 => {
            // Uncompressed SEC1 point: 0x04 || x || y.
            if raw_public.len() != 65 || raw_public[0] != 4 {
                return Err("unexpected P-256 public key encoding".into());
            }
            let (x, y) = (b64url(&raw_public[1..33]), b64url(&raw_public[33..]));
            (
                format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
                json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y }),
            )
        }
        JwtAlgorithm::EdDsa => {
            if raw_public.len() != 32 {
                return Err("unexpected Ed25519 public key length".into());
            }
            let x = b64url(raw_public);
            (format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#), json!({ "kty": "OKP", "crv": "Ed25519", "x": x }))
        }
    };
    let kid = b64url(&Sha256::digest(canonical.as_bytes()));
    if let Some(map) = jwk.as_object_mut() {
        map.insert("kid".into(), json!(kid));
        map.insert("use".into(), json!("sig"));
        map.insert("alg".into(), json!(alg.as_str()));
    }
    Ok((kid, jwk))
}

fn encoding_key(alg: JwtAlgorithm, pkcs8_der: &[u8]) -> EncodingKey {
    match alg {
        JwtAlgorithm::Es256 => EncodingKey::from_ec_der(pkcs8_der),
        JwtAlgorithm::EdDsa => EncodingKey::from_ed_der(pkcs8_der),
    }
}

/// Generates a key, writes its private half and appends its record.
fn new_key(
    dir: &Path,
    alg: JwtAlgorithm,
    now: u64,
    lifetime: u64,
    records: &mut Vec<KeyRecord>,
) -> Result<SigningKey, JwtError> {
    let pair = rcgen::KeyPair::generate_for(rcgen_algorithm(alg)).map_err(|e| JwtError::Crypto(e.to_string()))?;
    let (kid, jwk) = public_jwk(alg, pair.public_key_raw()).map_err(JwtError::Crypto)?;
    let pem = Zeroizing::new(pair.serialize_pem());
    write_atomic(&dir.join(format!("{kid}.key")), pem.as_bytes())?;
    let der = Zeroizing::new(pair.serialize_der());
    records.push(KeyRecord { kid: kid.clone(), alg, created_at: now, retired_at: None, max_lifetime: lifetime, jwk });
    Ok(SigningKey { kid, alg, created_at: now, key: encoding_key(alg, &der) })
}

/// Loads the current key's private half and checks it against its record.
fn load_key(dir: &Path, record: &KeyRecord) -> Result<SigningKey, JwtError> {
    let path = dir.join(format!("{}.key", record.kid));
    let corrupt = |reason: &str| JwtError::Corrupt { path: path.clone(), reason: reason.to_owned() };
    let file = fs::File::open(&path).map_err(|source| JwtError::Io { path: path.clone(), source })?;
    let meta = file.metadata().map_err(|source| JwtError::Io { path: path.clone(), source })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(JwtError::Permissions { path, mode });
    }
    let pem =
        Zeroizing::new(std::io::read_to_string(file).map_err(|source| JwtError::Io { path: path.clone(), source })?);
    let pair = rcgen::KeyPair::from_pem(&pem).map_err(|_| corrupt("not a PKCS#8 private key"))?;
    if pair.algorithm() != rcgen_algorithm(record.alg) {
        return Err(corrupt("the key's algorithm differs from keys.json"));
    }
    let (kid, _) = public_jwk(record.alg, pair.public_key_raw()).map_err(|e| corrupt(&e))?;
    if kid != record.kid {
        return Err(corrupt("the key does not match its id in keys.json"));
    }
    let der = Zeroizing::new(pair.serialize_der());
    Ok(SigningKey { kid, alg: record.alg, created_at: record.created_at, key: encoding_key(record.alg, &der) })
}

/// Write-then-rename with mode 0600 from the start, so neither a crash nor a
/// concurrent reader ever sees a partial or world-readable file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), JwtError> {
    let tmp = path.with_extension("tmp");
    let io = |source| JwtError::Io { path: path.to_path_buf(), source };
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use jsonwebtoken::{errors::ErrorKind, jwk::JwkSet, DecodingKey, Validation};

    use super::*;
    use crate::credentials::{clock::ManualClock, test_support};

    const ISSUER: &str = "https://gateway.ci.example";
    const ID: &str = "spiffe://ci.example/repo/acme/api";
    const AUD: &str = "api.internal.example";

    fn config(alg: JwtAlgorithm) -> JwtConfig {
        JwtConfig { issuer: ISSUER.into(), algorithm: alg, ..JwtConfig::default() }
    }

    fn request() -> MintRequest {
        MintRequest {
            subject: ID.into(),
            audience: AUD.into(),
            labels: [("team".to_string(), "payments".to_string())].into(),
            job: [("repository".to_string(), "acme/api".to_string()), ("run_id".to_string(), "42".to_string())].into(),
        }
    }

    /// Fetches the JWKS from a real HTTP server backed by `minter`.
    async fn served_jwks(minter: &Arc<Minter>) -> JwkSet {
        let m = Arc::clone(minter);
        let server = test_support::serve(move |req| m.handle_jwks_request(&req)).await;
        let (status, body) =
            crate::credentials::http_fetch::get(&server.url("/.well-known/jwks.json"), None, Duration::from_secs(60))
                .await
                .unwrap();
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&body).unwrap()
    }

    /// Verification the way a backend would do it: a standard library, the
    /// key picked from the JWKS by `kid`, and the real clock.
    fn verify(jwks: &JwkSet, token: &str, audience: &str, alg: Algorithm) -> Result<GatewayClaims, ErrorKind> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.into_kind())?;
        let kid = header.kid.ok_or(ErrorKind::InvalidToken)?;
        let jwk = jwks.find(&kid).ok_or(ErrorKind::InvalidKeyFormat)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.into_kind())?;
        let mut validation = Validation::new(alg);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[ISSUER]);
        validation.validate_nbf = true;
        validation.leeway = 0;
        jsonwebtoken::decode::<GatewayClaims>(token, &key, &validation).map(|d| d.claims).map_err(|e| e.into_kind())
    }

    #[tokio::test]
    async fn minted_token_verifies_against_served_jwks() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::starting_now();
        let minter = Arc::new(Minter::open(&config(JwtAlgorithm::Es256), dir.path(), Arc::new(clock.clone())).unwrap());
        let minted = minter.mint(&request()).unwrap();
        let jwks = served_jwks(&minter).await;

        let jwk = serde_json::to_value(&jwks.keys[0]).unwrap();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "ES256");
        assert_eq!(jwk["kid"], minted.kid.as_str());

        let claims = verify(&jwks, minted.token.expose(), AUD, Algorithm::ES256).unwrap();
        assert_eq!(claims.sub, ID);
        assert_eq!(claims.aud, AUD);
        assert_eq!(claims.iss, ISSUER);
        assert_eq!(claims.exp - claims.iat, 15 * 60);
        assert_eq!(claims.nbf, claims.iat);
        assert_eq!(claims.jti, minted.jti);
        assert_eq!(claims.labels["team"], "payments");
        assert_eq!(claims.job["repository"], "acme/api");
        let header = jsonwebtoken::decode_header(minted.token.expose()).unwrap();
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert!(!format!("{minted:?}").contains(minted.token.expose()));

        // Wrong audience.
        assert!(matches!(
            verify(&jwks, minted.token.expose(), "other.example", Algorithm::ES256),
            Err(ErrorKind::InvalidAudience)
        ));

        // Expired: minted an hour ago.
        clock.set(crate::credentials::clock::SystemClock.now() - 3600);
        let old = minter.mint(&request()).unwrap();
        assert!(matches!(verify(&jwks, old.token.expose(), AUD, Algorithm::ES256), Err(ErrorKind::ExpiredSignature)));

        // Signed by another key: same kid forged into the header does not help.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Minter::open(&config(JwtAlgorithm::Es256), other_dir.path(), Arc::new(ManualClock::starting_now()))
            .unwrap();
        let foreign = other.mint(&request()).unwrap();
        assert!(verify(&jwks, foreign.token.expose(), AUD, Algorithm::ES256).is_err());
        let own_key = DecodingKey::from_jwk(jwks.find(&minted.kid).unwrap()).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[AUD]);
        let err = jsonwebtoken::decode::<GatewayClaims>(foreign.token.expose(), &own_key, &validation).unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::InvalidSignature));
    }

    #[tokio::test]
    async fn rotation_keeps_old_key_until_its_tokens_expire() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::starting_now();
        let cfg = config(JwtAlgorithm::Es256);
        let minter = Arc::new(Minter::open(&cfg, dir.path(), Arc::new(clock.clone())).unwrap());
        let old_kid = minter.current_kid();
        let before = minter.mint(&request()).unwrap();

        let new_kid = minter.rotate().unwrap();
        assert_ne!(new_kid, old_kid);
        // The retired private key is gone; only the current one is on disk.
        assert!(!dir.path().join(format!("{old_kid}.key")).exists());
        assert!(dir.path().join(format!("{new_kid}.key")).exists());

        let jwks = served_jwks(&minter).await;
        let kids: Vec<_> = jwks.keys.iter().filter_map(|k| k.common.key_id.clone()).collect();
        assert_eq!(kids, vec![new_kid.clone(), old_kid.clone()]);
        verify(&jwks, before.token.expose(), AUD, Algorithm::ES256).unwrap();
        let after = minter.mint(&request()).unwrap();
        assert_eq!(after.kid, new_kid);
        verify(&jwks, after.token.expose(), AUD, Algorithm::ES256).unwrap();

        // Still published while tokens it signed can be alive…
        clock.advance(cfg.lifetime + Duration::from_secs(PRUNE_SKEW - 1));
        assert_eq!(minter.rotate_if_due().unwrap(), None);
        assert_eq!(served_jwks(&minter).await.keys.len(), 2);
        // …and pruned once they cannot.
        clock.advance(Duration::from_secs(1));
        assert_eq!(minter.rotate_if_due().unwrap(), None);
        let jwks = served_jwks(&minter).await;
        assert_eq!(jwks.keys.len(), 1);
        assert!(jwks.find(&old_kid).is_none());

        // The pruned state is what a restart sees.
        let reopened = Minter::open(&cfg, dir.path(), Arc::new(clock.clone())).unwrap();
        assert_eq!(reopened.current_kid(), new_kid);
        assert_eq!(reopened.jwks()["keys"].as_array().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn keys_persist_with_private_permissions_and_rotate_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("jwt");
        let clock = ManualClock::starting_now();
        let cfg = config(JwtAlgorithm::Es256);
        let first = Minter::open(&cfg, &keys, Arc::new(clock.clone())).unwrap();
        let kid = first.current_kid();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&keys), 0o700);
        assert_eq!(mode(&keys.join(format!("{kid}.key"))), 0o600);
        let token = first.mint(&request()).unwrap();
        drop(first);

        let second = Arc::new(Minter::open(&cfg, &keys, Arc::new(clock.clone())).unwrap());
        assert_eq!(second.current_kid(), kid);
        verify(&served_jwks(&second).await, token.token.expose(), AUD, Algorithm::ES256).unwrap();

        clock.advance(cfg.rotate_every - Duration::from_secs(1));
        assert_eq!(second.rotate_if_due().unwrap(), None);
        clock.advance(Duration::from_secs(1));
        let rotated = second.rotate_if_due().unwrap().unwrap();
        assert_ne!(rotated, kid);

        // A world-readable private key is refused rather than trusted.
        fs::set_permissions(keys.join(format!("{rotated}.key")), fs::Permissions::from_mode(0o644)).unwrap();
        let err = Minter::open(&cfg, &keys, Arc::new(clock.clone())).unwrap_err();
        assert!(matches!(err, JwtError::Permissions { .. }), "{err}");
    }

    #[tokio::test]
    async fn eddsa_tokens_verify_and_algorithm_change_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::starting_now();
        let es = Minter::open(&config(JwtAlgorithm::Es256), dir.path(), Arc::new(clock.clone())).unwrap();
        let es_token = es.mint(&request()).unwrap();
        drop(es);
        let ed = Arc::new(Minter::open(&config(JwtAlgorithm::EdDsa), dir.path(), Arc::new(clock.clone())).unwrap());
        let minted = ed.mint(&request()).unwrap();
        let jwks = served_jwks(&ed).await;
        let jwk = serde_json::to_value(jwks.find(&minted.kid).unwrap()).unwrap();
        assert_eq!(jwk["kty"], "OKP");
        assert_eq!(jwk["crv"], "Ed25519");
        assert_eq!(verify(&jwks, minted.token.expose(), AUD, Algorithm::EdDSA).unwrap().sub, ID);
        // The ES256 key is retired, not dropped: its token still verifies.
        verify(&jwks, es_token.token.expose(), AUD, Algorithm::ES256).unwrap();
    }

    #[tokio::test]
    async fn jwks_endpoint_answers_get_only() {
        let dir = tempfile::tempdir().unwrap();
        let minter =
            Minter::open(&config(JwtAlgorithm::Es256), dir.path(), Arc::new(ManualClock::starting_now())).unwrap();
        let get = minter.handle_jwks_request(&Request::get("/.well-known/jwks.json").body(()).unwrap());
        assert_eq!(get.headers()[header::CONTENT_TYPE], "application/json");
        let post = minter.handle_jwks_request(&Request::post("/.well-known/jwks.json").body(()).unwrap());
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        let doc = minter.discovery_document("https://gateway.ci.example/.well-known/jwks.json");
        assert_eq!(doc["issuer"], ISSUER);
        assert_eq!(doc["id_token_signing_alg_values_supported"], json!(["ES256"]));
    }

    #[test]
    fn mint_refuses_empty_fields() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JwtConfig::default();
        let minter = Minter::open(&cfg, dir.path(), Arc::new(ManualClock::starting_now())).unwrap();
        assert!(matches!(minter.mint(&request()), Err(JwtError::Invalid(_))));
    }
}
