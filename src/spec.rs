//! [`RunSpec`]: what a run is made of, before it is recorded.

use apex_core::PlanOptions;

/// What to run: conditions × the current contexts × replicates, and what
/// the run records about itself. (Not a provider batch: those are the
/// Batch APIs' jobs, which `RunOptions::batch` sends a run through.)
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// Condition slugs, in the order they go.
    pub conditions: Vec<String>,
    /// Replicates per (condition, context); 0 means 1.
    pub replicates: u32,
    /// Only the first this many contexts.
    pub limit: Option<u32>,
    /// Who starts it (`--created-by`).
    pub created_by: Option<String>,
    /// Free text (`--notes`).
    pub notes: Option<String>,
    /// The options used, recorded with the run for reproducibility.
    pub flags: serde_json::Value,
    /// Run conditions whose model is past its retirement date (refused
    /// otherwise, since every request would fail).
    pub allow_retired: bool,
}

impl RunSpec {
    /// A run of these conditions, one replicate each.
    pub fn new<S: Into<String>>(conditions: impl IntoIterator<Item = S>) -> Self {
        Self {
            conditions: conditions.into_iter().map(Into::into).collect(),
            replicates: 1,
            flags: serde_json::json!({}),
            ..Self::default()
        }
    }

    /// With `n` replicates per (condition, context).
    pub fn replicates(mut self, n: u32) -> Self {
        self.replicates = n;
        self
    }

    pub(crate) fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            replicates: self.replicates.max(1),
            limit: self.limit,
        }
    }
}
