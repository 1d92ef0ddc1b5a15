//! Apex: reproducible batches of LLM generations (conditions × contexts ×
//! replicates) against the OpenAI and Anthropic APIs, recorded in a SQL ledger.
//!
//! # Overview
//!
//! - [`Apex`]: what `apex run` does, as a library: open a ledger by URL,
//!   register conditions, ingest contexts, plan and preflight a
//!   [`RunSpec`], record it, execute it (synchronously or through the
//!   providers' Batch APIs) with a progress callback, resume it.
//! - [`core`] (`apex-core`): the domain model, the `Provider` and `Store`
//!   traits, the planner and the dispatcher. No I/O.
//! - [`store`] (`apex-store`): the SQLite and PostgreSQL ledgers and the
//!   file readers.
//! - [`providers`] (`apex-providers`): the OpenAI and Anthropic clients
//!   (and, with its `simulator` feature, a loopback simulator of both).
//!
//! # Example
//!
//! ```
//! use apex::{Apex, RunSpec};
//! use apex::core::{ContextPackage, parse_conditions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let apex = Apex::open("sqlite::memory:").await?;
//! apex.register(&parse_conditions(
//!     "[[condition]]\nslug = \"c\"\nprovider = \"openai\"\nmodel = \"gpt-4o\"\nmax_tokens = 64\n",
//! )?).await?;
//! apex.ingest(&[ContextPackage::new("ctx-01", None, "Text.".into(), "Summarise.".into())?]).await?;
//! let plan = apex.plan(&RunSpec::new(["c"]).replicates(2)).await?;
//! assert_eq!(plan.cell_count(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! `examples/embed.rs` runs a small batch against the simulator.

mod apex;
mod spec;

pub use apex::{Apex, Preview, progress};
pub use apex_core as core;
pub use apex_providers as providers;
pub use apex_store as store;
pub use spec::RunSpec;
