//! Fake keys in the shapes the detector knows, made up at run time so no
//! test ever holds a real one (nor the same one twice).

use rand::{distr::Alphanumeric, Rng as _};

/// `n` random ASCII letters and digits.
pub fn random(n: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(n).map(char::from).collect()
}

/// A Cursor-style key: `key_` and 64 hex digits (68 bytes, so its
/// protobuf length byte is 0x44, `D`).
pub fn cursor_key() -> String {
    let hex: String = (0..64).map(|_| char::from(b"0123456789abcdef"[rand::rng().random_range(0..16)])).collect();
    format!("key_{hex}")
}

/// An OpenAI project key.
pub fn openai_key() -> String {
    format!("sk-proj-{}T3BlbkFJ{}", random(48), random(48))
}

/// A GitHub personal access token with a valid checksum.
pub fn github_token() -> String {
    let body = random(30);
    let check = gateway::detect::confirm::base62_crc32(body.as_bytes());
    format!("ghp_{body}{}", String::from_utf8_lossy(&check))
}

/// An AWS access key id (`AKIA` and 16 base32 characters).
pub fn aws_access_key_id() -> String {
    let tail: String =
        (0..16).map(|_| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"[rand::rng().random_range(0..32)])).collect();
    format!("AKIA{tail}")
}
