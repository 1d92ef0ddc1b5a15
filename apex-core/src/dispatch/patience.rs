//! Patience with the ledger: every ledger call of a run is retried with
//! backoff while the ledger is failing (a restarting server, a lock held by
//! another writer, a full disk being cleared), for both transports.

use std::time::Duration;

use crate::error::{Error, Result};

/// Runs a ledger operation, retrying a failing ledger (a restarting
/// server, a lock held by another writer, a full disk being cleared) with
/// backoff from 100 ms to 2 s for up to `patience`. Answers that are not
/// failures of the ledger itself (a claim taken over) return at once.
pub(super) async fn patiently<T, F, Fut>(patience: Duration, what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let started = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    let mut warned = false;
    loop {
        match op().await {
            Err(error @ Error::Store { .. }) if started.elapsed() < patience => {
                if !warned {
                    tracing::warn!(%error, "the ledger failed {what}; retrying for up to {}s", patience.as_secs());
                    warned = true;
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(Error::Store { message, source }) => {
                return Err(Error::Store {
                    message: format!(
                        "{message} (still failing {what} after {}s of retries)",
                        patience.as_secs()
                    ),
                    source,
                });
            }
            other => return other,
        }
    }
}
