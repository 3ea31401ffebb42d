//! OIDC validation against a real issuer: a hyper server on 127.0.0.1
//! serving a JWKS, tokens minted with `jsonwebtoken`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use jsonwebtoken::{jwk::Jwk, EncodingKey, Header};
use serde_json::{json, Value};

use super::*;
use crate::credentials::{
    clock::ManualClock,
    config::JwtConfig,
    jwt::{MintRequest, Minter},
    test_support::{self, TestServer},
};

const ISSUER: &str = "https://ci.example/oidc";
const AUDIENCE: &str = "ci-gateway";

/// A throwaway 2048-bit RSA key (PKCS#1), fixed because generating one in a
/// debug build takes seconds.
const RSA_PEM: &str = include_str!("test_rsa.pem");

/// A signing key of the test issuer.
struct IssuerKey {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
}

impl IssuerKey {
    fn ec(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        Self::with_jwk(kid, Algorithm::ES256, key)
    }

    fn rsa(kid: &str) -> Self {
        let body: String = RSA_PEM.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(body).unwrap();
        Self::with_jwk(kid, Algorithm::RS256, EncodingKey::from_rsa_der(&der))
    }

    fn with_jwk(kid: &str, alg: Algorithm, key: EncodingKey) -> Self {
        let mut jwk = serde_json::to_value(Jwk::from_encoding_key(&key, alg).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        jwk["use"] = json!("sig");
        Self { kid: kid.into(), alg, key, jwk }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// The test issuer: serves whatever JWKS is current, counts fetches.
struct Issuer {
    jwks: Arc<Mutex<Value>>,
    server: TestServer,
}

impl Issuer {
    async fn start(keys: &[&IssuerKey]) -> Self {
        let jwks = Arc::new(Mutex::new(Value::Null));
        let shared = Arc::clone(&jwks);
        let server = test_support::serve(move |_req| {
            let doc = shared.lock().unwrap().clone();
            if doc.is_null() {
                let mut r = Response::new(Full::new(Bytes::from_static(b"down")));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return r;
            }
            Response::new(Full::new(Bytes::from(doc.to_string())))
        })
        .await;
        let issuer = Self { jwks, server };
        issuer.publish(keys);
        issuer
    }

    fn publish(&self, keys: &[&IssuerKey]) {
        *self.jwks.lock().unwrap() = json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() });
    }

    fn go_down(&self) {
        *self.jwks.lock().unwrap() = Value::Null;
    }

    fn provider(&self) -> OidcProvider {
        OidcProvider {
            issuer: ISSUER.into(),
            audiences: vec![AUDIENCE.into(), "other-aud".into()],
            jwks_url: Some(self.server.url("/.well-known/jwks")),
            claims: [
                ("repository".to_string(), "repository".to_string()),
                ("ref".to_string(), "ref".to_string()),
                ("run_id".to_string(), "run_id".to_string()),
                ("workflow".to_string(), "workflow".to_string()),
            ]
            .into(),
            ..OidcProvider::default()
        }
    }
}

fn claims(now: u64) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "repo:acme/api:ref:refs/heads/main",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "repository": "acme/api",
        "ref": "refs/heads/main",
        "run_id": 4711,
    })
}

fn validator(providers: Vec<OidcProvider>, clock: &ManualClock) -> OidcValidator {
    OidcValidator::new(providers, Arc::new(clock.clone()), None).unwrap()
}

#[tokio::test]
async fn valid_token_is_accepted_and_claims_extracted() {
    let key = IssuerKey::ec("k1");
    let issuer = Issuer::start(&[&key]).await;
    let clock = ManualClock::new(1_700_000_000);
    let v = validator(vec![issuer.provider()], &clock);

    let verified = v.validate(&key.sign(&claims(clock.now()))).await.unwrap();
    assert_eq!(verified.subject, "repo:acme/api:ref:refs/heads/main");
    assert_eq!(verified.issuer, ISSUER);
    assert_eq!(verified.expires_at, to_system_time(clock.now() + 300));
    assert_eq!(verified.attributes["repository"], "acme/api");
    assert_eq!(verified.attributes["ref"], "refs/heads/main");
    assert_eq!(verified.attributes["run_id"], "4711");
    assert!(!verified.attributes.contains_key("workflow"), "absent claims stay absent");

    // An audience list naming one accepted audience is fine.
    let mut c = claims(clock.now());
    c["aud"] = json!(["someone-else", "other-aud"]);
    v.validate(&key.sign(&c)).await.unwrap();
    // The JWKS was fetched once and then served from cache.
    assert_eq!(issuer.server.hits(), 1);
}

#[tokio::test]
async fn rsa_tokens_are_accepted_and_algorithms_are_enforced() {
    let rsa = IssuerKey::rsa("rsa-1");
    let ec = IssuerKey::ec("ec-1");
    let issuer = Issuer::start(&[&rsa, &ec]).await;
    let clock = ManualClock::new(1_700_000_000);
    let mut provider = issuer.provider();
    provider.algorithms = vec!["RS256".into()];
    let v = validator(vec![provider], &clock);
    assert_eq!(v.validate(&rsa.sign(&claims(clock.now()))).await.unwrap().attributes["repository"], "acme/api");
    assert_eq!(
        v.validate(&ec.sign(&claims(clock.now()))).await.unwrap_err(),
        OidcError::AlgorithmNotAllowed("ES256".into())
    );
}

#[tokio::test]
async fn tampered_foreign_and_unsigned_tokens_are_rejected() {
    let key = IssuerKey::ec("k1");
    let issuer = Issuer::start(&[&key]).await;
    let clock = ManualClock::new(1_700_000_000);
    let v = validator(vec![issuer.provider()], &clock);
    let token = key.sign(&claims(clock.now()));
    let parts: Vec<&str> = token.split('.').collect();

    // Payload changed after signing.
    let mut forged = claims(clock.now());
    forged["repository"] = json!("acme/admin");
    let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.to_string());
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_eq!(v.validate(&tampered).await.unwrap_err(), OidcError::BadSignature);

    // Signed by a key the issuer never published, under a published kid.
    let impostor = IssuerKey::ec("k1");
    assert_eq!(v.validate(&impostor.sign(&claims(clock.now()))).await.unwrap_err(), OidcError::BadSignature);

    // alg: none, with and without a signature part.
    let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    for unsigned in [format!("{none_header}.{}.", parts[1]), format!("{none_header}.{}.{}", parts[1], parts[2])] {
        let e = v.validate(&unsigned).await.unwrap_err();
        assert_eq!(e, OidcError::AlgorithmNotAllowed("none".into()));
        assert_eq!(e.code(), "algorithm_not_allowed");
    }
    let none_upper = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"NONE"}"#);
    assert!(matches!(v.validate(&format!("{none_upper}.{}.", parts[1])).await, Err(OidcError::AlgorithmNotAllowed(_))));
    // HS256 with the public key as secret: algorithm confusion.
    let hs = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"k1"}"#);
    assert!(matches!(
        v.validate(&format!("{hs}.{}.{}", parts[1], parts[2])).await,
        Err(OidcError::AlgorithmNotAllowed(_))
    ));

    for garbage in ["", "abc", "a.b", "a.b.c.d", "!!!.@@@.###"] {
        assert!(matches!(v.validate(garbage).await, Err(OidcError::Malformed(_))), "{garbage}");
    }
}

#[tokio::test]
async fn expiry_respects_leeway() {
    let key = IssuerKey::ec("k1");
    let issuer = Issuer::start(&[&key]).await;
    let clock = ManualClock::new(1_700_000_000);
    let v = validator(vec![issuer.provider()], &clock);
    let issued = clock.now();
    let token = key.sign(&claims(issued));

    clock.set(issued + 300 + 59); // expired 59 s ago: within the default 60 s leeway
    v.validate(&token).await.unwrap();
    clock.set(issued + 300 + 60);
    assert_eq!(v.validate(&token).await.unwrap_err(), OidcError::Expired);
    clock.set(issued + 3600);
    let e = v.validate(&token).await.unwrap_err();
    assert_eq!(e.to_string(), "token expired");

    // Not yet valid beyond the leeway.
    let mut future = claims(issued);
    future["nbf"] = json!(issued + 3600 + 120);
    future["exp"] = json!(issued + 7200);
    assert_eq!(v.validate(&key.sign(&future)).await.unwrap_err(), OidcError::NotYetValid);

    // Missing exp.
    let mut no_exp = claims(clock.now());
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_eq!(v.validate(&key.sign(&no_exp)).await.unwrap_err(), OidcError::MissingClaim("exp"));
}

#[tokio::test]
async fn wrong_issuer_and_audience_are_rejected() {
    let key = IssuerKey::ec("k1");
    let issuer = Issuer::start(&[&key]).await;
    let clock = ManualClock::new(1_700_000_000);
    let v = validator(vec![issuer.provider()], &clock);

    let mut c = claims(clock.now());
    c["iss"] = json!("https://evil.example/oidc");
    let e = v.validate(&key.sign(&c)).await.unwrap_err();
    assert_eq!(e, OidcError::IssuerMismatch("https://evil.example/oidc".into()));
    // A prefix or suffix of the issuer is not the issuer.
    c["iss"] = json!(format!("{ISSUER}/"));
    assert!(matches!(v.validate(&key.sign(&c)).await, Err(OidcError::IssuerMismatch(_))));

    let mut c = claims(clock.now());
    c["aud"] = json!("someone-else");
    assert_eq!(v.validate(&key.sign(&c)).await.unwrap_err(), OidcError::WrongAudience);
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(v.validate(&key.sign(&c)).await.unwrap_err(), OidcError::WrongAudience);
}

#[tokio::test]
async fn unknown_kid_refetches_the_jwks_rate_limited() {
    let old = IssuerKey::ec("2024-01");
    let issuer = Issuer::start(&[&old]).await;
    let clock = ManualClock::new(1_700_000_000);
    let v = validator(vec![issuer.provider()], &clock);
    v.validate(&old.sign(&claims(clock.now()))).await.unwrap();
    assert_eq!(issuer.server.hits(), 1);

    // The issuer rotates.
    let new = IssuerKey::ec("2024-02");
    issuer.publish(&[&new, &old]);
    let token = new.sign(&claims(clock.now()));

    // Right after a fetch, an unknown kid does not cause another one.
    clock.advance(Duration::from_secs(MIN_REFETCH_INTERVAL - 1));
    assert_eq!(v.validate(&token).await.unwrap_err(), OidcError::UnknownKid("2024-02".into()));
    assert_eq!(issuer.server.hits(), 1);

    clock.advance(Duration::from_secs(1));
    let verified = v.validate(&token).await.unwrap();
    assert_eq!(verified.attributes["repository"], "acme/api");
    assert_eq!(issuer.server.hits(), 2);

    // A made-up kid right after costs no request either.
    let bogus = IssuerKey::ec("made-up").sign(&claims(clock.now()));
    assert_eq!(v.validate(&bogus).await.unwrap_err(), OidcError::UnknownKid("made-up".into()));
    assert_eq!(issuer.server.hits(), 2);
}

#[tokio::test]
async fn periodic_refresh_and_outages_keep_working_keys() {
    let key = IssuerKey::ec("k1");
    let issuer = Issuer::start(&[&key]).await;
    let clock = ManualClock::new(1_700_000_000);
    let provider = issuer.provider();
    let refresh = provider.refresh;
    let v = validator(vec![provider], &clock);
    v.validate(&key.sign(&claims(clock.now()))).await.unwrap();

    // After `refresh`, the next validation fetches again.
    clock.advance(refresh);
    v.validate(&key.sign(&claims(clock.now()))).await.unwrap();
    assert_eq!(issuer.server.hits(), 2);

    // The issuer goes down: cached keys keep working.
    issuer.go_down();
    clock.advance(refresh);
    v.validate(&key.sign(&claims(clock.now()))).await.unwrap();
    assert_eq!(issuer.server.hits(), 3);
}

#[tokio::test]
async fn unreachable_jwks_is_reported() {
    let key = IssuerKey::ec("k1");
    let issuer = Issuer::start(&[&key]).await;
    issuer.go_down();
    let clock = ManualClock::new(1_700_000_000);
    let v = validator(vec![issuer.provider()], &clock);
    let e = v.validate(&key.sign(&claims(clock.now()))).await.unwrap_err();
    assert!(matches!(&e, OidcError::JwksUnavailable(reason) if reason.contains("503")), "{e}");
    assert_eq!(v.refresh_all().await.len(), 0, "rate-limited: no second request within the interval");

    issuer.publish(&[&key]);
    clock.advance(Duration::from_secs(MIN_REFETCH_INTERVAL));
    v.validate(&key.sign(&claims(clock.now()))).await.unwrap();
}

#[tokio::test]
async fn jwks_from_file() {
    let key = IssuerKey::ec("file-key");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, json!({ "keys": [key.jwk.clone()] }).to_string()).unwrap();
    let clock = ManualClock::new(1_700_000_000);
    let provider = OidcProvider {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        jwks_file: Some(path),
        ..OidcProvider::default()
    };
    let v = validator(vec![provider], &clock);
    assert_eq!(v.validate(&key.sign(&claims(clock.now()))).await.unwrap().issuer, ISSUER);
}

#[tokio::test]
async fn gateway_minted_tokens_validate_through_the_served_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000);
    let jwt = JwtConfig { issuer: "https://gateway.ci.example".into(), ..JwtConfig::default() };
    let minter = Arc::new(Minter::open(&jwt, dir.path(), Arc::new(clock.clone())).unwrap());
    let m = Arc::clone(&minter);
    let server = test_support::serve(move |req| m.handle_jwks_request(&req)).await;
    let provider = OidcProvider {
        issuer: jwt.issuer.clone(),
        audiences: vec!["api.internal.example".into()],
        jwks_url: Some(server.url("/.well-known/jwks.json")),
        algorithms: vec!["ES256".into(), "EdDSA".into()],
        claims: [("identity".to_string(), "sub".to_string())].into(),
        ..OidcProvider::default()
    };
    let v = validator(vec![provider], &clock);
    let request = MintRequest {
        subject: "spiffe://ci.example/repo/acme/api".into(),
        audience: "api.internal.example".into(),
        ..MintRequest::default()
    };
    let minted = minter.mint(&request).unwrap();
    let verified = v.validate(minted.token.expose()).await.unwrap();
    assert_eq!(verified.subject, request.subject);
    assert_eq!(verified.attributes["identity"], request.subject);

    // After a rotation the validator picks up the new key by its kid.
    clock.advance(Duration::from_secs(MIN_REFETCH_INTERVAL));
    minter.rotate().unwrap();
    let rotated = minter.mint(&request).unwrap();
    v.validate(rotated.token.expose()).await.unwrap();
    v.validate(minted.token.expose()).await.unwrap();

    let mut wrong = request.clone();
    wrong.audience = "api.other.example".into();
    assert_eq!(v.validate(minter.mint(&wrong).unwrap().token.expose()).await.unwrap_err(), OidcError::WrongAudience);
}
