//! Synthetic keys in shapes the built-in rules know, made from fuzz input
//! (never a real key): shared by the targets that need findings to act on.

// Each target includes this file (`#[path]`) and uses part of it.
#![allow(dead_code)]

use arbitrary::Arbitrary;

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// One made-up key.
#[derive(Arbitrary, Debug, Clone)]
pub enum Key {
    /// A GitHub token (`ghp_`, 30 characters, their CRC32 check).
    Github([u8; 30]),
    /// An OpenAI project key.
    OpenAi([u8; 48], [u8; 48]),
    /// An AWS secret access key with its assignment (the key has `+` and
    /// `/`, so its form-encoded copy differs).
    AwsSecret([u8; 40]),
    /// An AWS access key id.
    AwsId([u8; 16]),
    /// A Slack bot token.
    Slack([u8; 12], [u8; 24]),
}

fn pick(alphabet: &[u8], seed: &[u8]) -> String {
    seed.iter().map(|b| char::from(alphabet[usize::from(*b) % alphabet.len()])).collect()
}

impl Key {
    /// The text to put in a body: the key, with the context its rule
    /// wants, if any.
    pub fn text(&self) -> String {
        match self {
            Key::Github(s) => {
                let body = pick(ALNUM, s);
                let check = gateway::detect::confirm::base62_crc32(body.as_bytes());
                format!("ghp_{body}{}", String::from_utf8_lossy(&check))
            }
            Key::OpenAi(a, b) => format!("sk-proj-{}T3BlbkFJ{}", pick(ALNUM, a), pick(ALNUM, b)),
            Key::AwsSecret(s) => format!("aws_secret_access_key = {}", pick(B64, s)),
            Key::AwsId(s) => format!("AKIA{}", pick(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", s)),
            Key::Slack(a, b) => format!("xoxb-{}-{}", pick(b"0123456789", a), pick(ALNUM, b)),
        }
    }

    /// The part of [`text`](Self::text) that is secret (at least 16 bytes).
    pub fn secret(&self) -> String {
        let text = self.text();
        match text.strip_prefix("aws_secret_access_key = ") {
            Some(s) => s.to_owned(),
            None => text,
        }
    }
}
