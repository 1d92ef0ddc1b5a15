//! The batch transport's I/O: performs the dispatcher's batch actions
//! (record and submit, look for, poll, read results, close) against a
//! provider's [`BatchApi`](crate::provider::BatchApi) and the ledger, and
//! answers each with its event. It decides nothing: what a refusal, an
//! expiry or a cancellation means is the dispatcher's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::provider::{BatchApi, GenerationRequest, Provider};
use crate::run::{AttemptEnd, BatchItemRecord, BatchRecord, BatchState, RunId, custom_id};
use crate::store::Store;

use super::patience::patiently;
use super::protocol::{Attempt, BatchSubmission, Event, ItemOutcome, Task};
use super::work::{BatchRef, GenerationId};

/// What a batch action needs: the ledger, the run and (but to close a
/// batch) its provider.
pub(super) struct BatchIo {
    pub store: Arc<dyn Store>,
    pub provider: Option<Arc<dyn Provider>>,
    pub run_id: RunId,
    pub patience: Duration,
}

impl BatchIo {
    fn api(&self) -> &dyn BatchApi {
        self.provider
            .as_deref()
            .and_then(|p| p.batches())
            .expect("batch providers are checked before the run starts")
    }

    fn failed(batch: BatchRef, error: Error) -> Event {
        Event::Failed {
            task: Task::Batch(batch),
            error,
        }
    }

    /// Records the batch as an intent (its items' attempts begun), submits
    /// it, and records the provider's id; the provider's answer either way.
    pub async fn submit(
        self,
        submission: BatchSubmission,
        requests: Vec<GenerationRequest>,
    ) -> Event {
        let batch = submission.batch;
        let record = BatchRecord {
            batch_key: uuid::Uuid::now_v7().hyphenated().to_string(),
            run_id: self.run_id.clone(),
            provider: submission.provider,
            model: submission.model,
            wave: submission.wave,
            provider_batch_id: None,
            state: BatchState::Intent,
            created_at: crate::time::now_rfc3339(),
            submitted_at: None,
            items: submission
                .items
                .iter()
                .map(|a| BatchItemRecord {
                    generation_id: a.generation_id,
                    attempt: a.attempt,
                    custom_id: custom_id(a.generation_id, a.attempt),
                    condition_slug: a.condition.slug.clone(),
                    prompt_id: a.prompt_id.clone(),
                    package_version: a.version.clone(),
                    replicate_index: 0,
                })
                .collect(),
        };
        let store = &self.store;
        if let Err(error) = patiently(self.patience, "recording a batch", || {
            store.record_batch(&record)
        })
        .await
        {
            return Self::failed(batch, error);
        }
        let items: Vec<(String, GenerationRequest)> = record
            .items
            .iter()
            .map(|i| i.custom_id.clone())
            .zip(requests)
            .collect();
        let outcome = self.api().submit(&record.batch_key, &items).await;
        if let Ok(id) = &outcome
            && let Err(error) = patiently(self.patience, "recording a submitted batch", || {
                store.update_batch(&record.batch_key, Some(id), BatchState::Submitted)
            })
            .await
        {
            // The intent stays: a resume finds the batch at the provider.
            return Self::failed(batch, error);
        }
        Event::BatchSubmitted {
            batch,
            key: record.batch_key,
            created_at: record.created_at,
            outcome,
        }
    }

    /// Looks for a batch whose submission got no answer; found, it is
    /// recorded as submitted.
    pub async fn find(
        self,
        batch: BatchRef,
        key: String,
        created_at: String,
        items: usize,
    ) -> Event {
        let outcome = self.api().find(&key, &created_at, items).await;
        if let Ok(Some(id)) = &outcome {
            let store = &self.store;
            if let Err(error) = patiently(self.patience, "recording a found batch", || {
                store.update_batch(&key, Some(id), BatchState::Submitted)
            })
            .await
            {
                return Self::failed(batch, error);
            }
        }
        Event::BatchFound { batch, outcome }
    }

    /// Where a batch stands.
    pub async fn poll(self, batch: BatchRef, id: String) -> Event {
        Event::BatchPolled {
            batch,
            outcome: self.api().status(&id).await,
        }
    }

    /// An ended batch's results, by generation (an item with no line in
    /// them is left out: the dispatcher decides what that means).
    pub async fn fetch(
        self,
        batch: BatchRef,
        id: String,
        items: Vec<(Attempt, GenerationRequest)>,
    ) -> Event {
        let ids: Vec<(String, GenerationId)> = items
            .iter()
            .map(|(a, _)| (custom_id(a.generation_id, a.attempt), a.generation_id))
            .collect();
        let requests: HashMap<String, GenerationRequest> = ids
            .iter()
            .map(|(c, _)| c.clone())
            .zip(items.into_iter().map(|(_, r)| r))
            .collect();
        let outcome = self.api().results(&id, &requests).await.map(|mut results| {
            ids.into_iter()
                .filter_map(|(custom, generation)| {
                    results.remove(&custom).map(|outcome| (generation, outcome))
                })
                .collect::<Vec<ItemOutcome>>()
        });
        Event::BatchFetched { batch, outcome }
    }

    /// Stores each item's end, then the batch's state.
    pub async fn close(
        self,
        batch: BatchRef,
        key: String,
        state: BatchState,
        ends: Vec<(GenerationId, u32, AttemptEnd)>,
    ) -> Event {
        let store = &self.store;
        for (generation, attempt, end) in &ends {
            if let Err(error) = patiently(self.patience, "storing a batch result", || {
                store.end_attempt(*generation, *attempt, end)
            })
            .await
            {
                return Self::failed(batch, error);
            }
        }
        match patiently(self.patience, "recording a batch's end", || {
            store.update_batch(&key, None, state)
        })
        .await
        {
            Ok(()) => Event::BatchClosed(batch),
            Err(error) => Self::failed(batch, error),
        }
    }
}

/// Cancels a run's provider batches still in flight; how many were asked
/// to cancel. Their processed items are stored, and the rest sent again,
/// by the run's next execution.
pub(super) async fn cancel_open_batches(
    store: &dyn Store,
    providers: &HashMap<crate::condition::ProviderKind, Arc<dyn Provider>>,
    run_id: &RunId,
) -> Result<usize> {
    let mut cancelled = 0;
    for batch in store.open_batches(run_id).await? {
        let Some(id) = &batch.provider_batch_id else {
            continue;
        };
        let api = providers
            .get(&batch.provider)
            .and_then(|p| p.batches())
            .ok_or_else(|| {
                Error::Preflight(format!("{} has no Batch API client here", batch.provider))
            })?;
        api.cancel(id)
            .await
            .map_err(|e| Error::Preflight(format!("cannot cancel batch {id}: {e}")))?;
        cancelled += 1;
    }
    Ok(cancelled)
}
