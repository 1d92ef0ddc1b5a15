//! Executing a run. The rules are in [`crate::dispatch`]; this module keeps
//! the names callers have always used.

pub use crate::dispatch::{
    Executor, NoProgress, Progress, ProgressEvent, RunOptions, RunReport, backoff_delay,
    check_limits,
};
