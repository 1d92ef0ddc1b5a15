//! Executing a run. The rules are in [`crate::dispatch`]; this module keeps
//! the names callers have always used.

pub use crate::dispatch::{
    BatchExecutor, Executor, NoProgress, Progress, ProgressEvent, RunOptions, RunReport,
    backoff_delay, check_limits, default_worker,
};
