//! The matched secret value, which must never reach logs or output in clear.

use std::{
    fmt,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::DetectError;

/// File (inside the state directory) holding the per-installation fingerprint key.
pub const FINGERPRINT_KEY_FILE: &str = "detect-fingerprint.key";

/// Prefix of every fingerprint, so the algorithm can change without ambiguity.
pub const FINGERPRINT_PREFIX: &str = "hmac-sha256:";

const KEY_LEN: usize = 32;
/// 128 bits are plenty to tell findings apart and keep the tag short.
const FINGERPRINT_HEX_LEN: usize = 32;

/// A secret found in traffic or files.
///
/// `Debug` and `Display` show only a length and a redacted [`preview`](Self::preview);
/// the value itself is available through [`as_bytes`](Self::as_bytes) for callers
/// that must compare it (e.g. against credentials the gateway issued).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// Wraps matched bytes.
    pub fn new(bytes: &[u8]) -> Self {
        Self(Arc::from(bytes))
    }

    /// The secret value. Never log or print it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty (it never is for detections).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A redacted preview: at most the first 4 and last 4 characters, fewer for
    /// short secrets so that at least half of the value stays hidden
    /// (`key_…9f3a`, `ab…yz`, `…`).
    pub fn preview(&self) -> String {
        let text = String::from_utf8_lossy(&self.0);
        let chars: Vec<char> = text.chars().collect();
        let shown = (chars.len() / 4).min(4);
        let printable = |c: &char| {
            if c.is_control() || *c == '\u{FFFD}' {
                '?'
            } else {
                *c
            }
        };
        let mut out = String::with_capacity(shown * 2 + 3);
        out.extend(chars[..shown].iter().map(printable));
        out.push('…');
        out.extend(chars[chars.len() - shown..].iter().map(printable));
        out
    }

    /// A stable, keyed fingerprint (`hmac-sha256:` + 32 hex digits) that lets
    /// findings be correlated without storing the secret; without the key it
    /// cannot be used to confirm a guessed value.
    pub fn fingerprint(&self, key: &FingerprintKey) -> String {
        // HMAC accepts keys of any length, so construction cannot fail.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&key.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
        };
        mac.update(&self.0);
        let digest = mac.finalize().into_bytes();
        let mut hex = hex::encode(digest);
        hex.truncate(FINGERPRINT_HEX_LEN);
        format!("{FINGERPRINT_PREFIX}{hex}")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret").field("len", &self.0.len()).field("preview", &self.preview()).finish()
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.preview())
    }
}

/// The per-installation key of [`Secret::fingerprint`].
#[derive(Clone)]
pub struct FingerprintKey([u8; KEY_LEN]);

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintKey(..)")
    }
}

impl FingerprintKey {
    /// A fixed key, for tests and tools.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A fresh random key that is not persisted (e.g. `gateway scan` without access
    /// to the state directory): fingerprints differ from the installation's.
    pub fn ephemeral() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// A short, non-secret name of this key (16 hex digits of an HMAC of a
    /// fixed label): hosts of a fleet compare it to know they share one key,
    /// and so one fingerprint per secret. It says nothing about the key.
    pub fn id(&self) -> String {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
        };
        mac.update(b"ci-gateway fingerprint key id v1");
        let mut hex = hex::encode(mac.finalize().into_bytes());
        hex.truncate(16);
        hex
    }

    /// Path of the key file inside `state_dir`.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FINGERPRINT_KEY_FILE)
    }

    /// Reads the key from `state_dir`; `Ok(None)` when it does not exist yet.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, DetectError> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => Self::parse(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DetectError::Io { path, source }),
        }
    }

    /// Reads the key from `state_dir`, creating it (32 random bytes, mode 0600)
    /// if it does not exist. Concurrent creators agree on one key because the
    /// file is created exclusively and losers re-read the winner's key.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, DetectError> {
        if let Some(key) = Self::load(state_dir)? {
            return Ok(key);
        }
        let path = Self::path(state_dir);
        let key = Self::ephemeral();
        let created = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)
        };
        match created {
            Ok(mut file) => {
                file.write_all(&key.0)
                    .and_then(|()| file.sync_all())
                    .map_err(|source| DetectError::Io { path: path.clone(), source })?;
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let bytes = std::fs::read(&path).map_err(|source| DetectError::Io { path: path.clone(), source })?;
                Self::parse(&path, &bytes)
            }
            Err(source) => Err(DetectError::Io { path, source }),
        }
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Self, DetectError> {
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|_| DetectError::FingerprintKey {
            path: path.to_path_buf(),
            reason: format!("expected {KEY_LEN} bytes, found {}", bytes.len()),
        })?;
        Ok(Self(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_hides_at_least_half() {
        let s = Secret::new(b"key_0123456789abcdef9f3a");
        assert_eq!(s.preview(), "key_…9f3a");
        assert_eq!(Secret::new(b"abcdefgh").preview(), "ab…gh");
        assert_eq!(Secret::new(b"abc").preview(), "…");
        for len in 0..40 {
            let v = vec![b'z'; len];
            let shown = Secret::new(&v).preview().chars().filter(|c| *c == 'z').count();
            assert!(shown * 2 <= len, "len {len} shows {shown}");
        }
    }

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new(b"supersecretvalue-1234567890");
        assert!(!format!("{s:?}").contains("supersecretvalue"));
        assert!(!format!("{s}").contains("supersecretvalue"));
    }

    #[test]
    fn fingerprint_is_keyed_and_stable() {
        let s = Secret::new(b"hunter2hunter2");
        let a = FingerprintKey::from_bytes([1; 32]);
        let b = FingerprintKey::from_bytes([2; 32]);
        assert_eq!(s.fingerprint(&a), s.fingerprint(&a));
        assert_ne!(s.fingerprint(&a), s.fingerprint(&b));
        let fp = s.fingerprint(&a);
        assert!(fp.starts_with(FINGERPRINT_PREFIX));
        assert_eq!(fp.len(), FINGERPRINT_PREFIX.len() + 32);
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        assert!(FingerprintKey::load(dir.path()).unwrap().is_none());
        let k1 = FingerprintKey::load_or_create(dir.path()).unwrap();
        let k2 = FingerprintKey::load_or_create(dir.path()).unwrap();
        assert_eq!(k1.0, k2.0);
        let mode = std::fs::metadata(FingerprintKey::path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
