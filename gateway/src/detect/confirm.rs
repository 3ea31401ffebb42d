//! The precise second phase: checks a candidate secret beyond its shape.

use base64::Engine;
use serde::Deserialize;

/// Extra validation a rule can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// GitHub `gh?_` tokens: the last 6 characters are the base62 CRC32 of the
    /// 30 random characters before them.
    GithubCrc32,
    /// A JSON Web Token whose header decodes to a JSON object with `alg`.
    Jwt,
    /// Base64 of `user:password` with a non-placeholder password (or a long user
    /// name, for APIs that take the key as the user name).
    BasicAuth,
    /// URL userinfo: the password must differ from the user name and from
    /// well-known defaults.
    Userinfo,
    /// Base64 of a whole PEM or OpenSSH file: the decoded head must be a
    /// `-----BEGIN … PRIVATE KEY-----` line (public keys and certificates fail).
    Base64PrivateKey,
    /// At least a fifth of the letters are uppercase and a fifth lowercase,
    /// as in a random mixed-case token (`hf_…`, `sk_test_…`); camelCase
    /// identifiers and lowercase words that share the prefix fail.
    MixedCase,
}

/// Shannon entropy in bits per byte.
pub fn shannon_entropy(data: &[u8]) -> f64 {
    if data.is_empty() {
        return 0.0;
    }
    let mut counts = [0u32; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let len = data.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / len;
            -p * p.log2()
        })
        .sum()
}

/// Values that are documentation or template stand-ins rather than credentials.
const PLACEHOLDER_WORDS: &[&[u8]] = &[
    b"example",
    b"placeholder",
    b"changeme",
    b"change_me",
    b"change-me",
    b"redacted",
    b"dummy",
    b"your_",
    b"your-",
    b"yourkey",
    b"your.",
    b"insert_",
    b"insert-",
    b"replace_me",
    b"replace-me",
    b"sample_",
    b"fake_",
    b"0123456789",
    b"123456789",
    b"abcdefghij",
    b"qwertyuiop",
    // "Put it here" fillers seen in docs and tests.
    b"stringhere",
    b"tokenhere",
    b"keyhere",
    b"secrethere",
];

/// Whole values that are never credentials.
const PLACEHOLDER_VALUES: &[&[u8]] = &[
    b"password",
    b"passwd",
    b"pass",
    b"secret",
    b"token",
    b"apikey",
    b"api_key",
    b"api-key",
    b"changeme",
    b"test",
    b"testing",
    b"user",
    b"username",
    b"null",
    b"none",
    b"nil",
    b"undefined",
    b"true",
    b"false",
    b"x-oauth-basic",
    b"admin",
    b"root",
    b"guest",
    b"default",
];

/// Whether `secret` looks like a template, variable reference or documentation stand-in.
pub fn is_placeholder(secret: &[u8]) -> bool {
    if secret.is_empty() {
        return true;
    }
    let lower = secret.to_ascii_lowercase();
    if PLACEHOLDER_VALUES.contains(&lower.as_slice()) {
        return true;
    }
    // Template and variable syntaxes: ${VAR}, {{ var }}, $(cmd), %VAR%, <your-key>.
    const SYNTAX: &[&[u8]] = &[b"${", b"{{", b"}}", b"$(", b"<", b">"];
    if SYNTAX.iter().any(|s| contains(&lower, s)) {
        return true;
    }
    // `%(name)s` (Python); not any `%(`, which generated secrets hold (Django's
    // key alphabet has both characters).
    if python_format(&lower) {
        return true;
    }
    // `[PASSWORD]`, `[your token]`: a name in square brackets stands for a value.
    if bracketed_name(&lower) {
        return true;
    }
    // Elided: `ops_eyJlbWFp...`, `...f3a9`, as documentation and dashboards
    // show a key (`…` is U+2026). Ends only: a key whose alphabet has `.`
    // (Azure AD secrets) holds `...` inside about once in 9,000.
    const ELLIPSES: &[&[u8]] = &[b"...", "\u{2026}".as_bytes()];
    if ELLIPSES.iter().any(|e| lower.ends_with(e) || lower.starts_with(e)) {
        return true;
    }
    if secret[0] == b'$' && secret.get(1).is_some_and(|b| b.is_ascii_uppercase() || *b == b'_') {
        return true;
    }
    if secret.len() > 2 && secret[0] == b'%' && secret[secret.len() - 1] == b'%' {
        return true;
    }
    if PLACEHOLDER_WORDS.iter().any(|w| contains(&lower, w)) {
        return true;
    }
    // Masked or filler runs: xxxxxx, ******, ......, ######.
    if [b'x', b'*', b'.', b'#'].iter().any(|&c| has_run(&lower, c, 6)) {
        return true;
    }
    // Typed, not generated: six letters in sequence (`abcdef`, `klmnop`),
    // seven digits (`1234567`, `9876543`), or both interleaved (`a1b2c3d4`),
    // making up a fifth of the value or more. The share keeps real keys
    // safe: a random key holds a short run now and then (six hex letters
    // `abcdef` in a 64-digit hex key about once in 140,000 keys), and a key
    // dismissed as a stand-in is a key let through; a run of a fifth of a
    // 64-digit key (13 in sequence) does not happen by chance.
    let typed = |run: usize, min: usize| run >= min && run * 5 >= secret.len();
    if typed(longest_sequence(&lower, 1, |b| b.is_ascii_lowercase()), 6)
        || typed(longest_sequence(&lower, 1, |b| b.is_ascii_digit()), 7)
        || typed(longest_sequence(&lower, 2, |b| b.is_ascii_alphanumeric()), 8)
    {
        return true;
    }
    // A reference to the environment, not a value: `env.DB_PASSWORD`,
    // `process.env.TOKEN`, `os.environ[...]`, `os.getenv(...)`.
    if ENV_REFERENCES.iter().any(|r| lower.starts_with(r)) {
        return true;
    }
    // A value dominated by one character (aaaa…, 0000…) is filler, not a key.
    let mut counts = [0usize; 256];
    for &b in secret {
        counts[b as usize] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(0);
    max * 10 >= secret.len() * 6
}

/// Whether `lower` holds a Python `%(name)` reference.
fn python_format(lower: &[u8]) -> bool {
    lower.windows(2).enumerate().filter(|(_, w)| *w == b"%(").any(|(i, _)| {
        let name = &lower[i + 2..];
        let n = name.iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'_').count();
        n > 0 && !name[0].is_ascii_digit() && name.get(n) == Some(&b')')
    })
}

/// Whether `lower` holds `[` + a name of three letters or more (letters,
/// `_`, `-`, spaces) + `]`.
fn bracketed_name(lower: &[u8]) -> bool {
    lower.iter().enumerate().filter(|(_, b)| **b == b'[').any(|(i, _)| {
        let name = &lower[i + 1..];
        let n = name.iter().take_while(|b| b.is_ascii_lowercase() || matches!(b, b'_' | b'-' | b' ')).count();
        name.get(n) == Some(&b']') && name[..n].iter().filter(|b| b.is_ascii_lowercase()).count() >= 3
    })
}

/// How values that name an environment variable instead of holding one start.
const ENV_REFERENCES: &[&[u8]] =
    &[b"env.", b"process.env", b"os.environ", b"os.getenv", b"getenv(", b"system.getenv", b"env[", b"env("];

/// The most characters of `class` in `data` (lowercase) that run in
/// sequence, `stride` apart, each one up (or each one down) from the
/// previous within `0-9` or `a-z`. With `stride` 2 the two interleaved
/// chains must both be sequences (`a1b2c3d4`: 8); the count is both
/// chains' characters while they run together.
fn longest_sequence(data: &[u8], stride: usize, class: fn(u8) -> bool) -> usize {
    let next = |a: u8, b: u8, step: i16| {
        let same_class =
            (a.is_ascii_digit() && b.is_ascii_digit()) || (a.is_ascii_lowercase() && b.is_ascii_lowercase());
        class(a) && class(b) && same_class && i16::from(b) - i16::from(a) == step
    };
    // Characters in one chain from `i`, going `step`.
    let chain = |i: usize, step: i16| {
        let mut n = 1;
        while i + n * stride < data.len() && next(data[i + (n - 1) * stride], data[i + n * stride], step) {
            n += 1;
        }
        n
    };
    let mut best = 0;
    for i in 0..data.len().saturating_sub(stride - 1) {
        for step in [1i16, -1] {
            // Every chain starting at i..i+stride must run: the shortest counts.
            let together = (0..stride).map(|o| chain(i + o, step)).min().unwrap_or(0);
            if together >= 2 {
                best = best.max(together * stride);
            }
        }
    }
    best
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn has_run(data: &[u8], c: u8, n: usize) -> bool {
    let mut run = 0;
    for &b in data {
        run = if b == c { run + 1 } else { 0 };
        if run >= n {
            return true;
        }
    }
    false
}

/// Whether one of `keywords` (already lowercase) occurs in `context`, case-insensitively.
pub fn has_keyword(context: &[u8], keywords: &[Vec<u8>]) -> bool {
    if keywords.is_empty() {
        return true;
    }
    let lower = context.to_ascii_lowercase();
    keywords.iter().any(|k| contains(&lower, k))
}

impl Check {
    /// Runs the check; `user` is the URL user name for [`Check::Userinfo`].
    pub fn passes(self, secret: &[u8], user: Option<&[u8]>) -> bool {
        match self {
            Check::GithubCrc32 => github_crc32_ok(secret),
            Check::Jwt => jwt_ok(secret),
            Check::BasicAuth => basic_auth_ok(secret),
            Check::Userinfo => userinfo_ok(secret, user.unwrap_or_default()),
            Check::Base64PrivateKey => base64_private_key_ok(secret),
            Check::MixedCase => mixed_case_ok(secret),
        }
    }
}

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Base62 of a CRC32, left-padded with `0` to 6 digits as GitHub does.
pub fn base62_crc32(data: &[u8]) -> [u8; 6] {
    let mut n = crc32fast::hash(data);
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

fn github_crc32_ok(secret: &[u8]) -> bool {
    // `ghp_` + 30 random + 6 check digits; fine-grained or other shapes fail.
    let Some(pos) = secret.iter().position(|&b| b == b'_') else {
        return false;
    };
    let body = &secret[pos + 1..];
    if body.len() != 36 {
        return false;
    }
    let (random, check) = body.split_at(30);
    base62_crc32(random) == check
}

/// HMAC keys documentation signs its sample tokens with (jwt.io's defaults,
/// old and new). A weak key a real service may still use (`secret`) is not
/// one: a token it signs still opens that service.
const PUBLISHED_JWT_KEYS: &[&[u8]] = &[
    b"your-256-bit-secret",
    b"your-384-bit-secret",
    b"your-512-bit-secret",
    b"a-string-secret-at-least-256-bits-long",
];

fn jwt_ok(secret: &[u8]) -> bool {
    let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = secret.split(|&b| b == b'.');
    let (Some(header), Some(claims), Some(signature)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let json_object = |part: &[u8]| match b64.decode(part).map(|d| serde_json::from_slice::<serde_json::Value>(&d)) {
        Ok(Ok(serde_json::Value::Object(map))) => Some(map),
        _ => None,
    };
    let Some(header_map) = json_object(header) else {
        return false;
    };
    // `alg: none` tokens are unsigned test fixtures, not credentials.
    let Some(alg) = header_map.get("alg").and_then(|a| a.as_str()).filter(|a| !a.eq_ignore_ascii_case("none")) else {
        return false;
    };
    // A JWS's claims are a JSON object too: garbage there is not a token.
    if json_object(claims).is_none() {
        return false;
    }
    // A token that verifies under a published key is a sample anyone can
    // mint: it guards nothing.
    let Ok(sig) = b64.decode(signature) else {
        return true;
    };
    let signed = &secret[..header.len() + 1 + claims.len()];
    !PUBLISHED_JWT_KEYS.iter().any(|key| hmac_verifies(alg, key, signed, &sig))
}

/// Whether `sig` is the JWS HMAC (`HS256`/`HS384`/`HS512`) of `signed` under `key`.
fn hmac_verifies(alg: &str, key: &[u8], signed: &[u8], sig: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    match alg {
        "HS256" => {
            Hmac::<sha2::Sha256>::new_from_slice(key).is_ok_and(|m| m.chain_update(signed).verify_slice(sig).is_ok())
        }
        "HS384" => {
            Hmac::<sha2::Sha384>::new_from_slice(key).is_ok_and(|m| m.chain_update(signed).verify_slice(sig).is_ok())
        }
        "HS512" => {
            Hmac::<sha2::Sha512>::new_from_slice(key).is_ok_and(|m| m.chain_update(signed).verify_slice(sig).is_ok())
        }
        _ => false,
    }
}

fn basic_auth_ok(secret: &[u8]) -> bool {
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(secret) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
    // A JSON object (a JWT header sent after `Basic`) has a colon too.
    if user.iter().any(|b| matches!(b, b'"' | b'{' | b'}')) {
        return false;
    }
    if password.is_empty() {
        // Key-as-user-name APIs (Cursor, Stripe): the user name is the secret.
        return user.len() >= 16 && !is_placeholder(user) && shannon_entropy(user) >= 3.0;
    }
    !is_placeholder(password) && password != user
}

fn mixed_case_ok(secret: &[u8]) -> bool {
    let upper = secret.iter().filter(|b| b.is_ascii_uppercase()).count();
    let lower = secret.iter().filter(|b| b.is_ascii_lowercase()).count();
    let letters = upper + lower;
    letters > 0 && upper * 5 >= letters && lower * 5 >= letters
}

fn base64_private_key_ok(secret: &[u8]) -> bool {
    // Decode what is there (a run cut short still decodes up to its last
    // whole quantum), then judge it as the `private-key` rule judges PEM: a
    // `-----BEGIN … PRIVATE KEY-----` line, then key material that is not a
    // stand-in (`...`, `XXXX`) and has the entropy of base64.
    let trimmed = secret.strip_suffix(b"==").or_else(|| secret.strip_suffix(b"=")).unwrap_or(secret);
    let usable = &trimmed[..trimmed.len() - trimmed.len() % 4];
    let Ok(decoded) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(usable) else {
        return false;
    };
    let mut lines = decoded.split(|&b| b == b'\n').map(<[u8]>::trim_ascii);
    let first = lines.next().unwrap_or_default();
    if !(first.starts_with(b"-----BEGIN ") && first.ends_with(b"PRIVATE KEY-----")) {
        return false;
    }
    // Header lines such as `Proc-Type: 4,ENCRYPTED` are not key material.
    let body: Vec<u8> =
        lines.take_while(|l| !l.starts_with(b"-----")).filter(|l| !l.contains(&b':')).flatten().copied().collect();
    body.len() >= 40 && !is_placeholder(&body) && shannon_entropy(&body) >= 4.5
}

/// Default passwords of database images and brokers; finding them is noise.
const DEFAULT_PASSWORDS: &[&[u8]] = &[
    b"postgres",
    b"mysql",
    b"root",
    b"admin",
    b"guest",
    b"redis",
    b"mongo",
    b"mongodb",
    b"sa",
    b"clickhouse",
    b"rabbitmq",
    b"123456",
    b"pass",
    b"passw0rd",
    b"p@ssw0rd",
];

/// Spellings of "password" that documentation uses as the password
/// (`P@ssw0rd`, MongoDB's `D1fficultP%40ssw0rd`).
const PASSWORD_WORDS: &[&[u8]] = &[b"password", b"passw0rd", b"ssw0rd", b"p@ss", b"p%40ss"];

fn userinfo_ok(secret: &[u8], user: &[u8]) -> bool {
    let lower = secret.to_ascii_lowercase();
    // `pass456`, `secret1`, `admin123`: a default word with digits appended.
    let stem = &lower[..lower.len() - lower.iter().rev().take_while(|b| b.is_ascii_digit()).count()];
    !is_placeholder(secret)
        && !secret.eq_ignore_ascii_case(user)
        && !DEFAULT_PASSWORDS.contains(&lower.as_slice())
        && !DEFAULT_PASSWORDS.contains(&stem)
        && !PLACEHOLDER_VALUES.contains(&stem)
        && !PASSWORD_WORDS.iter().any(|w| contains(&lower, w))
        // Leaves room for `*`/`:` in URLs that are really `scheme://host:port@...` noise.
        && secret.iter().any(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_bounds() {
        assert_eq!(shannon_entropy(b""), 0.0);
        assert_eq!(shannon_entropy(b"aaaa"), 0.0);
        assert!((shannon_entropy(b"abcd") - 2.0).abs() < 1e-9);
    }

    #[test]
    fn placeholders() {
        for p in [
            &b"${API_KEY}"[..],
            b"{{ token }}",
            b"<your-key>",
            b"xxxxxxxxxxxx",
            b"AKIAIOSFODNN7EXAMPLE",
            b"aaaaaaaaaaaaaaaaaaab",
            b"$API_KEY",
            b"%API_KEY%",
            b"********",
            b"changeme",
            b"password",
        ] {
            assert!(is_placeholder(p), "{}", String::from_utf8_lossy(p));
        }
        for p in
            [&b"shpss_a1b2c3d4e5f6a7b8c9d0e1f2"[..], b"sk-klmnopqrstuvwx-3456yza7", b"Zq98765432wL", b"env.DB_PASSWORD"]
        {
            assert!(is_placeholder(p), "{}", String::from_utf8_lossy(p));
        }
        for p in [&b"Zx8Q2mL0pR7vT4nB6wK1yH3j"[..], b"ghp_R8xk2Lq9", b"abcde9fghij", b"a1b2c3x4", b"f0e1d2234567a9"] {
            assert!(!is_placeholder(p));
        }
        // Real keys hold short runs by chance: a run that is not a fifth of
        // the value does not make it a stand-in (a missed key is let through).
        for p in [
            &b"key_9f3e0a7c55abcdef01c4d2b8e6f1a0937c2d4e8f6a1b3c5d7e9f0a2b4c6d8e0f1"[..],
            b"key_0c7f2e9a1b2c3d4e5f6a8b0c2d4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7",
            b"7d1e3f5a9c1234567b0e2d4f6a8c0e2f4a6c8e0b2d4f6a8c0e2f4a6b8d0f2e4c6a8",
            b"sk_live_51Hx9QmKlmnopqAbR7tY2uVw3xZ4",
        ] {
            assert!(!is_placeholder(p), "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn template_and_elision_placeholders() {
        for p in [
            &b"neo4j:[PASSWORD]"[..],
            b"[your token]",
            b"ops_eyJlbWFpbCI6ImNpQGFjbWUtYnVpbGRzLm5ldCIs...",
            b"...4f9a2c7e1b",
            "sk-proj-Xq7vT2Lp\u{2026}".as_bytes(),
            b"%(db_password)s",
        ] {
            assert!(is_placeholder(p), "{}", String::from_utf8_lossy(p));
        }
        // Generated secrets hold `%(`, `[`, `.` in other shapes.
        for p in [
            &b"django-insecure-$q=w(=^7b3!%(^khx4py8g!pa_n0rl)yk+ei$$2iiaan"[..],
            b"Xq7[vT2]Lp9W8mZr4Nc1",
            b"WKf4Q~q1MVGfGo8Z7y1FaANFtYQ2VN.hC7Ob1bKc",
            b"Zx8Q2mL0pR7vT4nB[ab]",
        ] {
            assert!(!is_placeholder(p), "{}", String::from_utf8_lossy(p));
        }
    }

    #[test]
    fn jwt_structure_and_published_keys() {
        use hmac::{Hmac, Mac};
        let b64 = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
        let sign = |key: &[u8], header: &str, claims: &str| {
            let signed = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
            mac.update(signed.as_bytes());
            format!("{signed}.{}", b64(&mac.finalize().into_bytes()))
        };
        let header = r#"{"alg":"HS256","typ":"JWT"}"#;
        let claims = r#"{"sub":"ci-deploy","iat":1718193826}"#;
        assert!(jwt_ok(sign(b"Zx8Q2mL0pR7vT4nB6wK1yH3j", header, claims).as_bytes()));
        // A weak key a real service may use still makes a credential.
        assert!(jwt_ok(sign(b"secret", header, claims).as_bytes()));
        for key in PUBLISHED_JWT_KEYS {
            assert!(!jwt_ok(sign(key, header, claims).as_bytes()));
        }
        // Claims that are not a JSON object: not a token.
        assert!(!jwt_ok(sign(b"Zx8Q2mL0pR7vT4nB6wK1yH3j", header, "[1,2,3]").as_bytes()));
        let garbled = format!(
            "{}.eyJhdWQiOiJhcGkiLCJqdGkiOiJa3Kq9ZxLp0Wm2Rt7Yb4Nc8Vd.Tq8mZ2vR5xKp0LwN7cYb3HdF",
            b64(header.as_bytes())
        );
        assert!(!jwt_ok(garbled.as_bytes()));
        // Asymmetric algorithms are not tried against keys (nothing to verify with).
        let rs = format!("{}.{}.{}", b64(br#"{"alg":"RS256"}"#), b64(claims.as_bytes()), b64(&[7u8; 256]));
        assert!(jwt_ok(rs.as_bytes()));
    }

    #[test]
    fn github_check_digits() {
        let random = b"aBcDeFgHiJkLmNoPqRsTuVwXyZ0123";
        let mut token = b"ghp_".to_vec();
        token.extend_from_slice(random);
        token.extend_from_slice(&base62_crc32(random));
        assert!(github_crc32_ok(&token));
        let last = token.len() - 1;
        token[last] = if token[last] == b'A' { b'B' } else { b'A' };
        assert!(!github_crc32_ok(&token));
    }

    #[test]
    fn base64_private_keys() {
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let body =
            "MIIEowIBAAKCAQEAzZ3w0aLmQ2v8Xb9yR7tU1kP4nJ6hG5fD3sA2qW9eE8rT7yU6iO\nk3Jd8Qm2Lx7Vb4Nc1Zp9Rt5Yw0Hs6Gf\n";
        let pem = |kind: &str| enc(&format!("-----BEGIN {kind}-----\n{body}-----END {kind}-----\n"));
        assert!(base64_private_key_ok(pem("RSA PRIVATE KEY").as_bytes()));
        assert!(base64_private_key_ok(pem("OPENSSH PRIVATE KEY").as_bytes()));
        // Cut short (a prefix of the run) still counts once the body is long enough.
        assert!(base64_private_key_ok(&pem("PRIVATE KEY").as_bytes()[..150]));
        assert!(!base64_private_key_ok(pem("PUBLIC KEY").as_bytes()));
        assert!(!base64_private_key_ok(pem("CERTIFICATE").as_bytes()));
        let stand_in = enc("-----BEGIN PRIVATE KEY-----\nXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\n-----END PRIVATE KEY-----\n");
        assert!(!base64_private_key_ok(stand_in.as_bytes()));
        assert!(!base64_private_key_ok(b"LS0tLS1CRUdJTi!!!"));
    }

    #[test]
    fn mixed_case() {
        assert!(mixed_case_ok(b"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"));
        assert!(!mixed_case_ok(b"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"));
        assert!(!mixed_case_ok(b"sk_test_35lqkviqmyau9kraduep9fwoznp7bq"));
        assert!(!mixed_case_ok(b"0123456789"));
    }

    #[test]
    fn basic_auth() {
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert!(basic_auth_ok(enc("ci:Zx8Q2mL0pR7vT4nB").as_bytes()));
        assert!(basic_auth_ok(enc("key_9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d:").as_bytes()));
        assert!(!basic_auth_ok(enc("user:password").as_bytes()));
        assert!(!basic_auth_ok(enc("user").as_bytes()));
        assert!(!basic_auth_ok(enc(r#"{"alg":"HS256","typ":"JWT"}"#).as_bytes()));
    }

    #[test]
    fn userinfo() {
        assert!(userinfo_ok(b"Zx8Q2mL0pR7vT4nB", b"ci"));
        for weak in [&b"pass456"[..], b"admin123", b"D1fficultP%40ssw0rd", b"secret1", b"ci"] {
            assert!(!userinfo_ok(weak, b"ci"), "{}", String::from_utf8_lossy(weak));
        }
    }
}
