//! apex-core: the domain model of Apex, the traits its backends implement,
//! the planner and the dispatcher. It does no I/O: files, HTTP and SQL live
//! in other crates, reached through the [`Store`] and [`Provider`] traits.
//!
//! # Overview
//!
//! - [`Condition`]: a named, immutable model configuration, parsed from TOML
//!   by [`parse_conditions`].
//! - [`ContextPackage`]: one prompt (system, cacheable context, instruction),
//!   identified by the SHA-256 of its content.
//! - [`Plan`]: the generation cells of a run in context-sequential order.
//! - [`Store`]: the ledger (SQLite or PostgreSQL in `apex-store`).
//! - [`Provider`]: a model API (OpenAI or Anthropic in `apex-providers`).
//! - [`dispatch::Dispatcher`]: the cache-aware, rate-limited dispatch rules
//!   as a synchronous state machine (events in, actions out), and
//!   [`dispatch::Executor`], the async driver that runs it against a store
//!   and providers.
//!
//! # Example
//!
//! ```
//! use apex_core::{parse_conditions, ContextPackage, PackageRef, Plan, PlanOptions};
//!
//! let conditions = parse_conditions(r#"
//! [[condition]]
//! slug = "prod-sonnet45"
//! provider = "anthropic"
//! model = "claude-sonnet-4-5"
//! temperature = 0.7
//! max_tokens = 2048
//! "#)?;
//! let package = ContextPackage::new("ctx-01", None, "A long document.".into(), "Summarise it.".into())?;
//! let packages = vec![PackageRef {
//!     id: package.id().into(),
//!     version: package.version().into(),
//!     estimated_tokens: package.estimated_input_tokens(),
//!     byte_len: package.byte_len() as u64,
//!     o200k_tokens: package.estimated_input_tokens(),
//! }];
//! let plan = Plan::build(conditions, packages, PlanOptions { replicates: 3, limit: None })?;
//! assert_eq!(plan.cell_count(), 3);
//! assert_eq!(plan.cells().next().unwrap().replicate_index, 0);
//! # Ok::<(), apex_core::Error>(())
//! ```

pub mod catalog;
pub mod condition;
pub mod context;
pub mod dispatch;
pub mod error;
pub mod estimate;
pub mod executor;
#[cfg(test)]
mod fuzz;
pub mod limiter;
pub mod plan;
pub mod provider;
pub mod run;
pub mod store;
pub mod testing;
pub mod time;
pub mod tokens;
pub mod worker;

pub use catalog::{Catalog, ModelInfo, Prices};
pub use condition::{Api, Condition, ProviderKind, Thinking, parse_conditions};
pub use context::{ContextPackage, PackageSources, SourceFile};
pub use error::{Error, Result};
pub use plan::{Cell, PackageRef, Plan, PlanOptions};
pub use provider::{
    AttemptError, CacheControls, CacheHint, CacheTtl, ErrorClass, FirstEvent, Generated,
    GenerationRequest, PreparedBody, Provider, RateLimitSnapshot, RequestPreview, SharedBody,
    Usage,
};
pub use run::{
    AfterFailure, AttemptEnd, AttemptRow, ErrorRow, GenerationResult, GenerationRow,
    GenerationStatus, NewRun, RunId, RunInfo, RunState, StatusCounts, StatusRow, Transport,
    UnstoredResult, WorkItem,
};
pub use store::{
    Claim, ConditionInfo, ConditionUsage, IngestReport, PacingShare, QueryResult, RegisterReport,
    SqlValue, Store,
};
