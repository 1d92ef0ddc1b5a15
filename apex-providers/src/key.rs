//! API keys, wrapped so they cannot be printed.

use secrecy::{ExposeSecret, SecretString};

/// An API key. `Debug` prints `ApiKey([REDACTED])`; the text is reachable only
/// where the auth header is built, and that header is marked sensitive.
#[derive(Clone)]
pub struct ApiKey(SecretString);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(SecretString::from(key.into()))
    }

    /// Reads a key from an environment variable; `None` when unset or empty.
    pub fn from_env(var: &str) -> Option<Self> {
        std::env::var(var)
            .ok()
            .filter(|k| !k.trim().is_empty())
            .map(|k| Self::new(k.trim()))
    }

    pub(crate) fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Removes this key, and anything shaped like an API key, from a text
    /// that came back from a provider (an auth error may echo part of it).
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = text.replace(self.expose(), "[REDACTED]");
        for prefix in ["sk-", "sk_"] {
            let mut result = String::with_capacity(out.len());
            let mut rest = out.as_str();
            while let Some(at) = rest.find(prefix) {
                result.push_str(&rest[..at]);
                let tail = &rest[at..];
                let len = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*')))
                    .unwrap_or(tail.len());
                if len >= 8 {
                    result.push_str("[REDACTED]");
                } else {
                    result.push_str(&tail[..len]);
                }
                // `len` is at least the prefix's length: its characters
                // are all in the key alphabet, so the loop advances.
                rest = &tail[len..];
            }
            result.push_str(rest);
            out = result;
        }
        out
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let key = ApiKey::new("sk-test-very-secret-123");
        assert_eq!(format!("{key:?}"), "ApiKey([REDACTED])");
        let scrubbed = key.scrub("Incorrect API key provided: sk-test-very-secret-123. Also sk-abc***wxyz here, sk- alone");
        assert!(!scrubbed.contains("very-secret"), "{scrubbed}");
        assert!(!scrubbed.contains("abc***wxyz"), "{scrubbed}");
        assert!(scrubbed.ends_with("sk- alone"), "{scrubbed}");
    }
}
