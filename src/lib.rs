//! Apex: reproducible batches of LLM generations (conditions × contexts ×
//! replicates) against the OpenAI and Anthropic APIs, recorded in a SQL ledger.
//!
//! This facade re-exports the library crates:
//!
//! - [`core`] (`apex-core`): the domain model, the `Provider` and `Store`
//!   traits, and the planner. No I/O.
//! - [`store`] (`apex-store`): the SQLite ledger and the file readers.
//!
//! # Example
//!
//! ```
//! use apex::core::{Plan, PlanOptions, Store, parse_conditions};
//! use apex::store::SqliteStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteStore::open_in_memory()?;
//! let conditions = parse_conditions(
//!     "[[condition]]\nslug = \"c\"\nprovider = \"openai\"\nmodel = \"gpt-4o\"\nmax_tokens = 64\n",
//! )?;
//! store.register_conditions(&conditions).await?;
//! let package = apex::core::ContextPackage::new("ctx-01", None, "Text.".into(), "Summarise.".into())?;
//! store.ingest_packages(&[package]).await?;
//! let plan = Plan::build(conditions, store.current_packages().await?, PlanOptions { replicates: 2, limit: None })?;
//! assert_eq!(plan.cells.len(), 2);
//! # Ok(())
//! # }
//! ```

pub use apex_core as core;
pub use apex_store as store;
