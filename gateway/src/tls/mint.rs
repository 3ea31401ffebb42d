//! Leaf certificates minted on demand for intercepted names, and the
//! per-name `ServerConfig`s built from them.
//!
//! Minting costs a key generation and a signature (about a millisecond); a
//! cache hit is a map lookup and an `Arc` clone. Entries are refreshed once
//! half their validity has passed, so a cached leaf never expires under a
//! client that connects later.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ServerSessionMemoryCache, StoresServerSessions},
    sign::{CertifiedKey, SingleCertAndKey},
    ServerConfig,
};

use super::{ca::random_serial, CertificateAuthority, TlsError};

/// The application protocols the HTTP layer serves, the only ones ever offered.
const SERVED_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// Distinct ordered subsets of [`SERVED_ALPN`]: none, h2, http/1.1, both orders.
const ALPN_VARIANTS: usize = 5;
/// Leaves start a little in the past so a job whose clock lags the host's accepts them.
const BACKDATE: Duration = Duration::from_secs(300);
/// Shared TLS session cache size across every intercepted name.
const SESSION_CACHE_SIZE: usize = 4096;
/// X.520 upper bound for a common name; longer names go in the SAN only.
const MAX_CN_LEN: usize = 64;

/// A bounded cache of minted leaves and their server configurations.
pub struct LeafCache {
    ca: Arc<CertificateAuthority>,
    validity: Duration,
    capacity: usize,
    provider: Arc<CryptoProvider>,
    sessions: Arc<dyn StoresServerSessions>,
    entries: Mutex<Lru>,
    minted: AtomicU64,
    hits: AtomicU64,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("validity", &self.validity)
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Counters of a [`LeafCache`], for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafCacheStats {
    /// Leaves minted since the cache was created.
    pub minted: u64,
    /// Requests answered from the cache.
    pub hits: u64,
    /// Names currently cached.
    pub entries: usize,
}

#[derive(Default)]
struct Lru {
    map: HashMap<String, (Arc<Slot>, u64)>,
    tick: u64,
}

/// One name's entry. Its own lock serialises minting for that name, so
/// concurrent first connections to the same host mint once, while different
/// hosts mint in parallel.
#[derive(Default)]
struct Slot {
    state: Mutex<Option<Minted>>,
}

struct Minted {
    key: Arc<CertifiedKey>,
    refresh_at: Instant,
    configs: [Option<Arc<ServerConfig>>; ALPN_VARIANTS],
}

/// A freshly minted leaf.
pub(crate) struct MintedLeaf {
    /// `[leaf, ca]`.
    pub(crate) chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (PKCS#8).
    pub(crate) key: PrivatePkcs8KeyDer<'static>,
}

impl LeafCache {
    /// A cache minting leaves valid for `validity`, keeping at most `capacity` names.
    pub fn new(ca: Arc<CertificateAuthority>, validity: Duration, capacity: usize) -> Self {
        Self {
            ca,
            validity,
            capacity: capacity.max(1),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
            entries: Mutex::new(Lru::default()),
            minted: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// The server configuration for an intercepted connection to `sni`.
    ///
    /// `sni` may also be an IP address (a connection without SNI intercepted on
    /// the operator's request); the leaf then carries an IP SAN. The returned
    /// configuration offers, in the client's order, the protocols among `h2`
    /// and `http/1.1` that the client offered, so the client's preference wins
    /// and nothing the HTTP layer cannot serve is ever negotiated. A client that
    /// offered neither gets no ALPN at all and speaks HTTP/1.1 by default.
    ///
    /// Blocks for about a millisecond on a miss (and while another task mints
    /// the same name); a hit only takes two uncontended locks.
    pub fn server_config(&self, sni: &str, client_alpn: &[Vec<u8>]) -> Result<Arc<ServerConfig>, TlsError> {
        let name = normalize_name(sni)?;
        let (alpn, variant) = mirror_alpn(client_alpn);
        let slot = self.slot(name.clone());
        let mut state = lock(&slot.state);
        let fresh = state.as_ref().is_some_and(|m| Instant::now() < m.refresh_at);
        if fresh {
            self.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            let leaf = mint_leaf(&self.ca, &name, self.validity)?;
            let signing_key = self
                .provider
                .key_provider
                .load_private_key(PrivateKeyDer::Pkcs8(leaf.key))
                .map_err(|e| TlsError::Mint { name: name.clone(), reason: e.to_string() })?;
            self.minted.fetch_add(1, Ordering::Relaxed);
            *state = Some(Minted {
                key: Arc::new(CertifiedKey::new(leaf.chain, signing_key)),
                refresh_at: Instant::now() + self.validity / 2,
                configs: Default::default(),
            });
        }
        let minted = state.as_mut().ok_or_else(|| TlsError::Mint {
            name: name.clone(),
            reason: "internal error: cache slot empty after minting".into(),
        })?;
        if let Some(config) = &minted.configs[variant] {
            return Ok(config.clone());
        }
        let config = Arc::new(self.build_config(&name, minted.key.clone(), alpn)?);
        minted.configs[variant] = Some(config.clone());
        Ok(config)
    }

    /// Current counters.
    pub fn stats(&self) -> LeafCacheStats {
        LeafCacheStats {
            minted: self.minted.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            entries: lock(&self.entries).map.len(),
        }
    }

    /// The slot for `name`, inserting it (and evicting the least recently used
    /// name when full) if needed.
    fn slot(&self, name: String) -> Arc<Slot> {
        let mut lru = lock(&self.entries);
        lru.tick += 1;
        let tick = lru.tick;
        if let Some((slot, used)) = lru.map.get_mut(&name) {
            *used = tick;
            return slot.clone();
        }
        if lru.map.len() >= self.capacity {
            // A linear scan only on misses at capacity: simpler than a linked
            // list and cheap next to the minting that follows.
            if let Some(oldest) = lru.map.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) {
                lru.map.remove(&oldest);
            }
        }
        let slot = Arc::new(Slot::default());
        lru.map.insert(name, (slot.clone(), tick));
        slot
    }

    fn build_config(&self, name: &str, key: Arc<CertifiedKey>, alpn: Vec<Vec<u8>>) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Mint { name: name.to_owned(), reason: e.to_string() })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
        config.alpn_protocols = alpn;
        // One bounded store for all names instead of one per configuration.
        config.session_storage = self.sessions.clone();
        Ok(config)
    }
}

/// Mints a leaf for `name` (a DNS name or an IP address) signed by `ca`.
pub(crate) fn mint_leaf(ca: &CertificateAuthority, name: &str, validity: Duration) -> Result<MintedLeaf, TlsError> {
    let fail = |e: rcgen::Error| TlsError::Mint { name: name.to_owned(), reason: e.to_string() };
    let san = match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into().map_err(fail)?),
    };
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![san];
    let mut dn = DistinguishedName::new();
    // Clients verify the SAN; the CN is only for humans reading the chain.
    if name.len() <= MAX_CN_LEN {
        dn.push(DnType::CommonName, name);
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params.serial_number = Some(random_serial());

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let cert = ca.sign(&params, &key).map_err(fail)?;
    Ok(MintedLeaf {
        chain: vec![cert.der().clone(), ca.cert_der().clone()],
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    })
}

/// Lower-cases and strips a trailing dot, so `API.example.com.` and
/// `api.example.com` share one leaf; rejects what cannot be a SAN.
fn normalize_name(sni: &str) -> Result<String, TlsError> {
    let name = sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase();
    if name.parse::<IpAddr>().is_ok() {
        return Ok(name);
    }
    DnsName::try_from(name.as_str())
        .map_err(|_| TlsError::Mint { name: sni.to_owned(), reason: "not a valid DNS name or IP address".into() })?;
    Ok(name)
}

/// The protocols to offer back, in the client's order, and their variant index.
fn mirror_alpn(client_alpn: &[Vec<u8>]) -> (Vec<Vec<u8>>, usize) {
    let mut offered: Vec<Vec<u8>> = Vec::with_capacity(2);
    for proto in client_alpn {
        if SERVED_ALPN.contains(&proto.as_slice()) && !offered.contains(proto) {
            offered.push(proto.clone());
        }
    }
    let variant = match offered.as_slice() {
        [] => 0,
        [one] if one == b"h2" => 1,
        [_] => 2,
        [first, _] if first == b"h2" => 3,
        _ => 4,
    };
    (offered, variant)
}

/// Locks ignoring poisoning: the guarded data is a cache, always consistent
/// between statements, so a panic elsewhere must not take interception down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::test_support::{client_config, tcp_pair, temp_ca};
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Runs a real handshake over loopback TCP and returns the negotiated ALPN
    /// and the leaf the client saw.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Result<(Option<Vec<u8>>, CertificateDer<'static>), String> {
        let (c, s) = tcp_pair().await;
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let server_task = tokio::spawn(async move {
            let mut tls = acceptor.accept(s).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.shutdown().await?;
            Ok::<_, std::io::Error>(())
        });
        let mut tls = connector.connect(server_name, c).await.map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut echo = [0u8; 4];
        tls.read_exact(&mut echo).await.map_err(|e| e.to_string())?;
        assert_eq!(&echo, b"ping");
        server_task.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let leaf = conn.peer_certificates().and_then(|c| c.first()).cloned().ok_or("no peer certificate")?;
        Ok((conn.alpn_protocol().map(<[u8]>::to_vec), leaf))
    }

    fn alpn(list: &[&[u8]]) -> Vec<Vec<u8>> {
        list.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn mirrors_alpn_in_client_order() {
        assert_eq!(mirror_alpn(&alpn(&[b"h2", b"http/1.1"])), (alpn(&[b"h2", b"http/1.1"]), 3));
        assert_eq!(mirror_alpn(&alpn(&[b"http/1.1", b"spdy/3", b"h2"])), (alpn(&[b"http/1.1", b"h2"]), 4));
        assert_eq!(mirror_alpn(&alpn(&[b"h3", b"h2", b"h2"])), (alpn(&[b"h2"]), 1));
        assert_eq!(mirror_alpn(&alpn(&[b"http/1.1"])), (alpn(&[b"http/1.1"]), 2));
        assert_eq!(mirror_alpn(&alpn(&[b"grpc-exp"])), (vec![], 0));
        assert_eq!(mirror_alpn(&[]), (vec![], 0));
    }

    #[tokio::test]
    async fn minted_leaf_verifies_and_alpn_follows_the_client() {
        let (_dir, ca) = temp_ca();
        let cache = LeafCache::new(ca.clone(), Duration::from_secs(86400), 16);
        let roots = [ca.cert_der().clone()];

        for (offered, expected) in [
            (&[b"h2".as_slice(), b"http/1.1"][..], Some(b"h2".to_vec())),
            (&[b"http/1.1".as_slice(), b"h2"][..], Some(b"http/1.1".to_vec())),
            (&[b"spdy/3".as_slice(), b"http/1.1"][..], Some(b"http/1.1".to_vec())),
            (&[][..], None),
        ] {
            let server = cache.server_config("API2.Cursor.sh.", &alpn(offered)).expect("config");
            let (negotiated, leaf) =
                handshake(server, client_config(&roots, offered), "api2.cursor.sh").await.expect("handshake");
            assert_eq!(negotiated, expected, "offered {offered:?}");
            let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).expect("parse");
            let san = parsed.subject_alternative_name().expect("san").expect("present").value;
            assert_eq!(format!("{:?}", san.general_names), r#"[DNSName("api2.cursor.sh")]"#);
            assert!(!parsed.is_ca());
            let days = (parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp()) / 60;
            assert_eq!(days, 24 * 60 + 5, "validity plus backdate, in minutes");
        }
        // Every variant came from one minted leaf.
        assert_eq!(cache.stats().minted, 1);
        assert_eq!(cache.stats().entries, 1);
    }

    #[tokio::test]
    async fn a_client_that_does_not_trust_the_ca_fails() {
        let (_dir, ca) = temp_ca();
        let (_other_dir, other) = temp_ca();
        let cache = LeafCache::new(ca, Duration::from_secs(86400), 16);
        let server = cache.server_config("api.cursor.com", &[]).expect("config");
        let err = handshake(server, client_config(&[other.cert_der().clone()], &[]), "api.cursor.com")
            .await
            .expect_err("must not verify");
        assert!(err.contains("UnknownIssuer") || err.contains("unknown issuer"), "{err}");
    }

    #[tokio::test]
    async fn ip_names_get_ip_sans() {
        let (_dir, ca) = temp_ca();
        let cache = LeafCache::new(ca.clone(), Duration::from_secs(86400), 16);
        let server = cache.server_config("127.0.0.1", &[]).expect("config");
        let (_, leaf) = handshake(server, client_config(&[ca.cert_der().clone()], &[]), "127.0.0.1")
            .await
            .expect("handshake by IP");
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).expect("parse");
        let san = parsed.subject_alternative_name().expect("san").expect("present").value;
        assert_eq!(format!("{:?}", san.general_names), "[IPAddress([127, 0, 0, 1])]");
        let server = cache.server_config("::1", &[]).expect("v6 config");
        handshake(server, client_config(&[ca.cert_der().clone()], &[]), "::1").await.expect("handshake by IPv6");
    }

    #[test]
    fn hits_are_the_same_arc_and_lru_evicts_the_oldest() {
        let (_dir, ca) = temp_ca();
        let cache = LeafCache::new(ca, Duration::from_secs(86400), 2);
        let h2 = alpn(&[b"h2"]);
        let a1 = cache.server_config("a.example", &h2).expect("a");
        let a2 = cache.server_config("A.EXAMPLE.", &h2).expect("a again");
        assert!(Arc::ptr_eq(&a1, &a2));
        assert_eq!(cache.stats(), LeafCacheStats { minted: 1, hits: 1, entries: 1 });

        cache.server_config("b.example", &h2).expect("b");
        cache.server_config("a.example", &h2).expect("touch a");
        cache.server_config("c.example", &h2).expect("c evicts b");
        assert_eq!(cache.stats().entries, 2);
        assert_eq!(cache.stats().minted, 3);
        let a3 = cache.server_config("a.example", &h2).expect("a survives");
        assert!(Arc::ptr_eq(&a1, &a3));
        cache.server_config("b.example", &h2).expect("b re-minted");
        assert_eq!(cache.stats().minted, 4);
    }

    #[test]
    fn concurrent_requests_for_one_name_mint_once() {
        let (_dir, ca) = temp_ca();
        let cache = Arc::new(LeafCache::new(ca, Duration::from_secs(86400), 16));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let configs: Vec<_> = (0..8)
            .map(|_| {
                let (cache, barrier) = (cache.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache.server_config("same.example", &[b"h2".to_vec()]).expect("config")
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        assert_eq!(cache.stats().minted, 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
    }

    #[test]
    fn invalid_names_are_refused() {
        let (_dir, ca) = temp_ca();
        let cache = LeafCache::new(ca, Duration::from_secs(86400), 2);
        for bad in ["", "bad name", "a..b", "ünicode.example", "*.wild.example"] {
            let err = cache.server_config(bad, &[]).expect_err(bad);
            assert!(err.to_string().contains("cannot mint a certificate for"), "{err}");
        }
        assert_eq!(cache.stats().minted, 0);
    }
}
