//! Counting tokens: exactly with the model's tokenizer where one exists
//! offline (`o200k_base` for current OpenAI models), otherwise by Apex's
//! documented estimate of four bytes of UTF-8 per token (Anthropic publishes
//! no offline tokenizer; usage in each response settles the difference).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{LazyLock, Mutex};

use crate::condition::ProviderKind;
use crate::context::{ContextPackage, estimate_tokens};

/// How a model's tokens are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tokenizer {
    /// OpenAI's `o200k_base` (GPT-4o, GPT-5): exact.
    O200k,
    /// Four bytes per token: an estimate.
    Estimate,
}

impl Tokenizer {
    /// The tokenizer of a provider's current models.
    pub fn for_provider(provider: ProviderKind) -> Self {
        match provider {
            ProviderKind::OpenAi => Self::O200k,
            ProviderKind::Anthropic => Self::Estimate,
        }
    }

    /// The name shown in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::O200k => "o200k_base",
            Self::Estimate => "4-bytes-per-token estimate",
        }
    }

    /// Tokens in a text. Large texts are remembered (by a hash of their
    /// content), so counting a 128K-token context again is free.
    pub fn count(self, text: &str) -> u64 {
        match self {
            Self::Estimate => estimate_tokens(text),
            Self::O200k if text.len() < 4096 => encode_len(text),
            Self::O200k => {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                text.hash(&mut hasher);
                let key = (hasher.finish(), text.len());
                if let Some(n) = MEMO.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
                    return *n;
                }
                let n = encode_len(text);
                MEMO.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, n);
                n
            }
        }
    }

    /// (cacheable prefix: system + context, the rest: the instruction).
    pub fn split(self, package: &ContextPackage) -> (u64, u64) {
        let prefix = package.system().map_or(0, |s| self.count(s)) + self.count(package.context());
        (prefix, self.count(package.prompt()))
    }
}

static MEMO: LazyLock<Mutex<HashMap<(u64, usize), u64>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn encode_len(text: &str) -> u64 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn o200k_counts_exactly_and_remembers() {
        let t = Tokenizer::O200k;
        assert_eq!(t.count("hello world"), 2);
        let long = "The harbour log records tides and storms. ".repeat(200);
        let first = t.count(&long);
        assert_eq!(t.count(&long), first);
        assert!(first > 1000 && first < long.len() as u64 / 3, "{first}");
        assert_eq!(Tokenizer::Estimate.count("abcdefgh"), 2);
    }
}
