//! [`Clients`]: the provider clients a process uses, each built once per
//! configuration (building one loads TLS roots), from the environment or
//! from a configuration given in its place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_core::{Condition, Provider, ProviderKind};

use crate::error::ProviderError;
use crate::transport::ProviderConfig;

/// The clients of the providers a process uses.
#[derive(Default)]
pub struct Clients {
    configs: HashMap<ProviderKind, ProviderConfig>,
    request_timeout: Option<Duration>,
    stream_idle_timeout: Option<Duration>,
    built: Mutex<HashMap<ProviderKind, Arc<dyn Provider>>>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("configs", &self.configs)
            .finish_non_exhaustive()
    }
}

impl Clients {
    /// Sends `kind`'s requests with this configuration instead of the
    /// environment's.
    pub fn configure(&mut self, kind: ProviderKind, config: ProviderConfig) {
        self.configs.insert(kind, config);
        self.forget();
    }

    /// Abandons (and retries) a request answered in one body that has not
    /// completed after this long, whichever provider it goes to.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = Some(timeout);
        self.forget();
    }

    /// Abandons (and retries) a streamed request that sends nothing for this
    /// long.
    pub fn set_stream_idle_timeout(&mut self, timeout: Duration) {
        self.stream_idle_timeout = Some(timeout);
        self.forget();
    }

    /// Clients built with an older configuration are built again.
    fn forget(&mut self) {
        self.built
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The configuration `kind`'s client is built with.
    pub fn config(&self, kind: ProviderKind) -> ProviderConfig {
        let mut config = self
            .configs
            .get(&kind)
            .cloned()
            .unwrap_or_else(|| ProviderConfig::from_env(kind));
        if let Some(timeout) = self.request_timeout {
            config.request_timeout = timeout;
        }
        if let Some(timeout) = self.stream_idle_timeout {
            config.stream_idle_timeout = timeout;
        }
        config
    }

    /// One client per provider the conditions use; `need_keys`: a missing
    /// key is an error naming the condition and the variable to set.
    pub fn for_conditions(
        &self,
        conditions: &[Condition],
        need_keys: bool,
    ) -> Result<HashMap<ProviderKind, Arc<dyn Provider>>, ProviderError> {
        let mut providers = HashMap::new();
        for c in conditions {
            if providers.contains_key(&c.provider) {
                continue;
            }
            let config = self.config(c.provider);
            if need_keys && config.api_key.is_none() {
                return Err(ProviderError::MissingKey {
                    slug: c.slug.clone(),
                    provider: c.provider.to_string(),
                    var: c.provider.api_key_env(),
                });
            }
            let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
            let provider = match built.get(&c.provider) {
                Some(provider) => Arc::clone(provider),
                None => {
                    let provider = crate::build(c.provider, config)?;
                    built.insert(c.provider, Arc::clone(&provider));
                    provider
                }
            };
            providers.insert(c.provider, provider);
        }
        Ok(providers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_is_built_once_per_configuration() {
        let conditions = apex_core::parse_conditions(
            "[[condition]]\nslug = \"c\"\nprovider = \"openai\"\nmodel = \"gpt-4o\"\nmax_tokens = 8\n",
        )
        .unwrap();
        let config = |url: &str| ProviderConfig {
            base_url: url.into(),
            api_key: Some(crate::ApiKey::new("sk-test")),
            ..ProviderConfig::from_env(ProviderKind::OpenAi)
        };
        let mut clients = Clients::default();
        clients.configure(ProviderKind::OpenAi, config("http://127.0.0.1:9"));
        let first = clients.for_conditions(&conditions, true).unwrap();
        let again = clients.for_conditions(&conditions, false).unwrap();
        assert!(Arc::ptr_eq(
            &first[&ProviderKind::OpenAi],
            &again[&ProviderKind::OpenAi]
        ));
        clients.configure(ProviderKind::OpenAi, config("http://127.0.0.1:10"));
        let rebuilt = clients.for_conditions(&conditions, true).unwrap();
        assert!(!Arc::ptr_eq(
            &first[&ProviderKind::OpenAi],
            &rebuilt[&ProviderKind::OpenAi]
        ));
        clients.configure(
            ProviderKind::OpenAi,
            ProviderConfig {
                api_key: None,
                ..config("http://127.0.0.1:10")
            },
        );
        let Err(missing) = clients.for_conditions(&conditions, true) else {
            panic!("a missing key is refused");
        };
        assert_eq!(
            missing.to_string(),
            "condition `c`: no API key for openai; set OPENAI_API_KEY"
        );
    }
}
