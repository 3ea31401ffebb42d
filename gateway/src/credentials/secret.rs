//! A string that must never reach logs or output in clear.

use std::{fmt, sync::Arc};

use zeroize::Zeroizing;

/// A secret string (an upstream credential, a minted token).
///
/// `Debug` and `Display` print `[redacted]`; the value is only reachable
/// through [`expose`](Self::expose). Clones share one allocation, which is
/// zeroed when the last clone is dropped, so the value is not scattered over
/// the heap by cloning it into every request.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Arc<Zeroizing<String>>);

impl SecretString {
    /// Wraps a value.
    pub fn new(value: String) -> Self {
        Self(Arc::new(Zeroizing::new(value)))
    }

    /// The value. Never log or print it.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self::new(value.to_owned())
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString([redacted])")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let s = SecretString::from("sk-live-very-secret-value");
        for text in [format!("{s:?}"), format!("{s}"), format!("{s:#?}"), format!("{:?}", Some(s.clone()))] {
            assert!(!text.contains("very-secret"), "{text}");
            assert!(text.contains("redacted"), "{text}");
        }
        assert_eq!(s.expose(), "sk-live-very-secret-value");
    }
}
