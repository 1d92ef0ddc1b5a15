//! Exit codes, and the mapping from errors to them.

use std::process::ExitCode;

use apex_core::Error;
use apex_store::StoreError;

/// An unexpected failure (a bug, or the operating system).
pub const INTERNAL: u8 = 1;
/// The command line itself was wrong (unknown flag, missing argument).
pub const USAGE: u8 = 2;
/// Bad input: a conditions file, a context package, an unknown slug or run,
/// a write statement given to `apex sql`, a preflight failure.
pub const BAD_INPUT: u8 = 3;
/// The ledger could not be opened or used (bad URL, newer schema, I/O).
pub const STORE: u8 = 4;
/// The run ended, but some generations are stored as `error`.
pub const GENERATIONS_FAILED: u8 = 5;
/// The run stopped early: `--verify-first` failed, or a condition failed
/// fatally (auth, quota, unknown model); the rest stays `pending`.
pub const RUN_STOPPED: u8 = 6;
/// The query given to `apex sql` is wrong (syntax, an unknown table or
/// column); the database's message says what.
pub const QUERY: u8 = 7;
/// Interrupted by Ctrl-C; `apex run --resume RUN_ID` finishes the run.
pub const INTERRUPTED: u8 = 130;

/// The exit code for an error that ended a command.
pub fn code_for(error: &anyhow::Error) -> ExitCode {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<Error>() {
            if matches!(e, Error::Query(_)) {
                return ExitCode::from(QUERY);
            }
            return ExitCode::from(if e.is_bad_input() { BAD_INPUT } else { STORE });
        }
        if cause.downcast_ref::<StoreError>().is_some() {
            return ExitCode::from(STORE);
        }
    }
    ExitCode::from(INTERNAL)
}
