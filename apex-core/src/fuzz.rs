//! Every parser of outside input, thrown arbitrary bytes and near-valid
//! variations of valid input: a typed error or a value, never a panic.
//! Inputs are bounded (a few KiB), so a parser that allocated without bound
//! would show as a test that does not end. Cases: proptest's default (256)
//! or `PROPTEST_CASES`.

use proptest::prelude::*;

use crate::catalog::Catalog;
use crate::condition::parse_conditions;
use crate::context::{ContextPackage, PackageSources, SourceFile};
use crate::limiter::LimitTable;
use crate::run::RunId;

/// Valid input with up to eight random edits: deletions, insertions of any
/// character, duplications of a span.
pub(crate) fn near(valid: &'static str) -> impl Strategy<Value = String> {
    let edits =
        proptest::collection::vec((any::<usize>(), any::<char>(), 0u8..3, 0usize..16), 0..8);
    edits.prop_map(move |edits| {
        let mut text: Vec<char> = valid.chars().collect();
        for (at, c, kind, span) in edits {
            let at = at % (text.len() + 1);
            match kind {
                0 if at < text.len() => {
                    let end = (at + span.max(1)).min(text.len());
                    text.drain(at..end);
                }
                1 => text.insert(at, c),
                _ => {
                    let end = (at + span).min(text.len());
                    let copy: Vec<char> = text[at..end].to_vec();
                    text.splice(at..at, copy);
                }
            }
        }
        text.into_iter().collect()
    })
}

const CONDITIONS: &str = r#"
[[condition]]
slug = "prod-sonnet45"
provider = "anthropic"
model = "claude-sonnet-4-5-20250929"
temperature = 0.7
max_tokens = 2048

[[condition]]
slug = "prod-gpt5"
provider = "openai"
model = "gpt-5"
max_tokens = 4096
reasoning_effort = "low"
"#;

const LIMITS: &str = r#"
[openai."gpt-5"]
rpm = 500
tpm = 500000
[anthropic."claude-sonnet-4-5"]
rpm = 50
itpm = 30000
otpm = 8000
"#;

const CATALOG: &str = r#"
[[model]]
provider = "openai"
ids = ["my-model"]
context_window = 128000
max_output = 16384
[model.prices]
input = 2.5
output = 10.0
cache_read = 1.25
"#;

proptest! {
    #[test]
    fn conditions_files(text in prop_oneof![near(CONDITIONS), "\\PC{0,400}"]) {
        let _ = parse_conditions(&text);
    }

    #[test]
    fn limits_files(text in prop_oneof![near(LIMITS), "\\PC{0,400}"]) {
        let _ = LimitTable::with_file(&text);
    }

    #[test]
    fn catalog_files(text in prop_oneof![near(CATALOG), "\\PC{0,400}"]) {
        let _ = Catalog::with_overrides(&text);
    }

    #[test]
    fn context_packages(
        id in "\\PC{0,40}",
        system in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        context in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..3),
        prompt in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
    ) {
        let file = |name: &str, bytes: Vec<u8>| SourceFile { name: name.into(), bytes };
        let sources = PackageSources {
            system: system.map(|b| file("system.md", b)),
            context: context.into_iter().map(|b| file("context.md", b)).collect(),
            prompt: prompt.map(|b| file("prompt.md", b)),
        };
        if let Ok(package) = ContextPackage::from_sources(&id, sources) {
            prop_assert_eq!(package.version().len(), 64);
        }
    }

    #[test]
    fn run_ids(text in prop_oneof![near("01a22880-6d8a-73b6-be51-0a04d2a1ae72"), "\\PC{0,60}"]) {
        if let Ok(id) = RunId::parse(&text) {
            prop_assert_eq!(id.as_str().len(), 36);
        }
    }
}
