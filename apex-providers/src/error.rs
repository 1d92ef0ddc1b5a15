//! The one error type of apex-providers (setting a client up; failed
//! attempts are [`apex_core::AttemptError`]).

/// Failures building a provider client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// A base URL that is not http(s).
    #[error("bad base URL `{url}` in {var}: use http(s)://host[:port][/path]")]
    BadBaseUrl {
        /// The URL given.
        url: String,
        /// The variable it came from.
        var: &'static str,
    },
    /// Plain `http://` to a host that is not loopback, not allowed.
    #[error(
        "{var} is `{url}`: plain http to a host that is not loopback would send the API key in clear text; use https, or set APEX_ALLOW_INSECURE_HTTP=1 to allow it"
    )]
    InsecureBaseUrl {
        /// The URL given.
        url: String,
        /// The variable it came from.
        var: &'static str,
    },
    /// A condition's provider has no key in the environment.
    #[error("condition `{slug}`: no API key for {provider}; set {var}")]
    MissingKey {
        /// The condition.
        slug: String,
        /// Its provider.
        provider: String,
        /// The variable to set.
        var: &'static str,
    },
    /// The HTTP client could not be built (TLS set-up).
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}
