//! The one error type of apex-core.

use std::error::Error as StdError;

/// Everything that can go wrong in the domain layer, and in the backends that
/// implement its traits (they wrap their own failures in [`Error::Store`]).
///
/// Messages are lowercase fragments that name the problem and, where there is
/// one, the fix; the CLI prints them on one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A conditions file that is not valid TOML, or has unknown keys.
    #[error("invalid conditions file: {0}")]
    ConditionsFile(String),
    /// A model catalog override file that cannot be read or parsed.
    #[error("invalid model catalog file: {0}")]
    CatalogFile(String),
    /// A limits file that cannot be read or parsed.
    #[error("invalid limits file: {0}")]
    LimitsFile(String),
    /// A condition whose parameters are wrong on their own.
    #[error("condition `{slug}`: {problem}")]
    InvalidCondition {
        /// The condition's slug.
        slug: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// A slug used by a run was registered again with other parameters.
    #[error(
        "condition `{slug}` is used by run {run_id} and cannot change ({change}); register the new parameters under a new slug"
    )]
    ConditionImmutable {
        /// The condition's slug.
        slug: String,
        /// One run that used it.
        run_id: String,
        /// The first parameter that differs.
        change: String,
    },
    /// A slug that is not registered.
    #[error(
        "unknown condition `{0}`; register it with `apex conditions register FILE` (see `apex conditions list`)"
    )]
    UnknownCondition(String),
    /// A context package that cannot be used.
    #[error("context package `{id}`: {problem}")]
    InvalidPackage {
        /// The package id (its directory name).
        id: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// Nothing to plan: no packages ingested, or a limit of zero.
    #[error("empty plan: {0}")]
    EmptyPlan(String),
    /// A run id that is not in the store.
    #[error("unknown run `{0}`; `apex runs` lists the runs in this store")]
    UnknownRun(String),
    /// Text given as a run id that is not one.
    #[error(
        "`{0}` is not a run id: run ids are UUIDs like 01a2b3c4-…; `apex runs` lists the runs in this store"
    )]
    NotARunId(String),
    /// A request that must not be sent, found before anything was sent.
    #[error("preflight: {0}")]
    Preflight(String),
    /// A statement given to the read-only SQL entry point that would write.
    #[error("refused: {0}")]
    ReadOnly(String),
    /// A query given to the read-only SQL entry point that the database
    /// refused as written (syntax, an unknown table or column): the
    /// caller's mistake, with the database's own message.
    #[error("query failed: {0}")]
    Query(String),
    /// A generation this process meant to send is no longer its to send:
    /// it finished, or another process took its claim over.
    #[error("generation {0} is finished or held by another process; it will not be sent")]
    NotClaimable(i64),
    /// The ledger holds data Apex did not write that way (edited by hand,
    /// or by another tool): retrying cannot help.
    #[error("ledger: {0}")]
    Corrupt(String),
    /// The store (database) failed.
    #[error("store: {message}")]
    Store {
        /// What failed, already phrased for a person.
        message: String,
        /// The backend's error, if any.
        #[source]
        source: Option<Box<dyn StdError + Send + Sync>>,
    },
}

impl Error {
    /// A store failure with a message and its cause.
    pub fn store(
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Self::Store {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// A store failure described by a message only.
    pub fn store_msg(message: impl Into<String>) -> Self {
        Self::Store {
            message: message.into(),
            source: None,
        }
    }

    /// Whether this error is the user's input (as opposed to the store or a bug).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, Self::Store { .. } | Self::Corrupt(_))
    }
}

/// A `Result` with apex-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
