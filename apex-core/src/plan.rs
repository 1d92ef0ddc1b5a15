//! The plan: which generation cells a run holds, in context-sequential order.

use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::error::{Error, Result};

/// A context package as listed by a store: enough to plan without its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRef {
    /// The package id, stored as `prompt_id`.
    pub id: String,
    /// The content version (SHA-256 hex).
    pub version: String,
    /// Provider-neutral input token estimate.
    pub estimated_tokens: u64,
    /// UTF-8 bytes of its texts.
    pub byte_len: u64,
    /// Exact input tokens under OpenAI's `o200k_base`.
    pub o200k_tokens: u64,
}

impl PackageRef {
    /// Input tokens as a tokenizer counts them.
    pub fn tokens(&self, tokenizer: crate::tokens::Tokenizer) -> u64 {
        match tokenizer {
            crate::tokens::Tokenizer::O200k => self.o200k_tokens,
            crate::tokens::Tokenizer::Estimate => self.estimated_tokens,
        }
    }
}

/// How big a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// Replicates per (condition, context); at least 1.
    pub replicates: u32,
    /// Only the first N contexts (in id order), if set.
    pub limit: Option<u32>,
}

/// Whether a run sends cache hints: caching asked for, and a later request
/// of the same (condition, context) to read what a hint writes. With one
/// replicate nobody would, and Anthropic (and GPT-5.6+) bill the write.
pub fn sends_cache_hints(cache: bool, replicates: u32) -> bool {
    cache && replicates > 1
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            replicates: 1,
            limit: None,
        }
    }
}

/// One generation cell: (condition, context, replicate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// The condition's slug.
    pub condition_slug: String,
    /// The context package id.
    pub prompt_id: String,
    /// The package version this cell sends.
    pub package_version: String,
    /// Position of the context in the plan (0-based).
    pub context_index: u32,
    /// Replicate number (0-based; replicate 0 is the cache leader).
    pub replicate_index: u32,
}

/// A run's conditions × contexts × replicates. Its cells are made as they
/// are walked ([`Plan::cells`]), never held: a 100,000-generation plan costs
/// what its conditions and contexts cost.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The conditions, in the order given.
    pub conditions: Vec<Condition>,
    /// The contexts planned, in id order, after `limit`.
    pub packages: Vec<PackageRef>,
    /// The sizing used.
    pub options: PlanOptions,
}

impl Plan {
    /// Builds the plan. Packages are taken in id order so that `--limit N`
    /// always means the same N contexts.
    pub fn build(
        conditions: Vec<Condition>,
        mut packages: Vec<PackageRef>,
        options: PlanOptions,
    ) -> Result<Self> {
        if conditions.is_empty() {
            return Err(Error::EmptyPlan(
                "no condition given; pass `--condition-slug SLUG`".into(),
            ));
        }
        for (i, c) in conditions.iter().enumerate() {
            if conditions[..i].iter().any(|d| d.slug == c.slug) {
                return Err(Error::EmptyPlan(format!(
                    "condition `{}` is given twice; name each condition once",
                    c.slug
                )));
            }
        }
        if options.replicates == 0 {
            return Err(Error::EmptyPlan("`--replicates` must be at least 1".into()));
        }
        if options.limit == Some(0) {
            return Err(Error::EmptyPlan("`--limit` must be at least 1".into()));
        }
        if packages.is_empty() {
            return Err(Error::EmptyPlan(
                "no context packages in the store; run `apex ingest DIR` first".into(),
            ));
        }
        packages.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(limit) = options.limit {
            packages.truncate(limit as usize);
        }
        Ok(Self {
            conditions,
            packages,
            options,
        })
    }

    /// The cells in context-sequential order: every replicate of context 1
    /// (for each condition), then context 2, and so on.
    pub fn cells(&self) -> impl Iterator<Item = Cell> + '_ {
        self.packages
            .iter()
            .enumerate()
            .flat_map(move |(context_index, package)| {
                self.conditions.iter().flat_map(move |condition| {
                    (0..self.options.replicates).map(move |replicate_index| Cell {
                        condition_slug: condition.slug.clone(),
                        prompt_id: package.id.clone(),
                        package_version: package.version.clone(),
                        context_index: context_index as u32,
                        replicate_index,
                    })
                })
            })
    }

    /// How many cells (generations) the plan holds.
    pub fn cell_count(&self) -> usize {
        self.packages.len() * self.conditions.len() * self.options.replicates as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::condition::ProviderKind;

    fn condition(slug: &str) -> Condition {
        Condition {
            slug: slug.into(),
            provider: ProviderKind::Anthropic,
            model: "claude-sonnet-4-5".into(),
            temperature: Some(0.7),
            top_p: None,
            max_tokens: 100,
            reasoning_effort: None,
            api: Default::default(),
            thinking: None,
            thinking_budget: None,
            stream: false,
            store: None,
        }
    }

    fn package(id: &str) -> PackageRef {
        PackageRef {
            id: id.into(),
            version: format!("v-{id}"),
            estimated_tokens: 10,
            byte_len: 40,
            o200k_tokens: 9,
        }
    }

    #[test]
    fn context_sequential_with_limit_and_replicates() {
        let plan = Plan::build(
            vec![condition("a"), condition("b")],
            vec![package("ctx-03"), package("ctx-01"), package("ctx-02")],
            PlanOptions {
                replicates: 3,
                limit: Some(2),
            },
        )
        .unwrap();
        assert_eq!(plan.cell_count(), 2 * 2 * 3);
        assert_eq!(plan.cells().count(), plan.cell_count());
        let order: Vec<_> = plan
            .cells()
            .map(|c| format!("{}/{}/{}", c.prompt_id, c.condition_slug, c.replicate_index))
            .collect();
        assert_eq!(order[0], "ctx-01/a/0");
        assert_eq!(order[2], "ctx-01/a/2");
        assert_eq!(order[3], "ctx-01/b/0");
        assert_eq!(order[6], "ctx-02/a/0");
        assert!(plan.cells().all(|c| c.prompt_id != "ctx-03"));
    }

    #[test]
    fn refuses_empty_plans() {
        let opts = PlanOptions::default();
        assert!(Plan::build(vec![], vec![package("x")], opts).is_err());
        assert!(Plan::build(vec![condition("a")], vec![], opts).is_err());
        let zero = PlanOptions {
            replicates: 0,
            limit: None,
        };
        assert!(Plan::build(vec![condition("a")], vec![package("x")], zero).is_err());
        let twice = vec![condition("a"), condition("a")];
        assert!(Plan::build(twice, vec![package("x")], opts).is_err());
    }
}
