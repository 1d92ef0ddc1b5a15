//! Planning and recording a run over what a ledger holds: shared by the
//! benches that drive the executor directly.

use anyhow::Result;
use apex::core::{Condition, NewRun, Plan, PlanOptions, RunId, Store};

/// Plans `replicates` of every condition over the ledger's current contexts
/// and records the run with `flags`.
pub async fn plan_and_record(
    store: &dyn Store,
    conditions: Vec<Condition>,
    replicates: u32,
    flags: serde_json::Value,
) -> Result<(RunId, Plan)> {
    let plan = Plan::build(
        conditions,
        store.current_packages().await?,
        PlanOptions {
            replicates,
            limit: None,
        },
    )?;
    let run_id = RunId::generate();
    store
        .create_run(
            &NewRun {
                run_id: run_id.clone(),
                created_by: Some("bench".into()),
                notes: None,
                flags,
                dry_run: false,
            },
            &plan,
        )
        .await?;
    Ok((run_id, plan))
}

/// A case file of `sentences` sentences (about 11 tokens each).
pub fn case_file(i: usize, sentences: usize) -> Result<apex::core::ContextPackage> {
    let body = format!("Case file {i:02}. ")
        + &format!("On day {i}, the survey team recorded the tide readings. ").repeat(sentences);
    Ok(apex::core::ContextPackage::new(
        format!("ctx-{:02}", i + 1),
        Some("Answer only from the case file.".into()),
        body,
        "List the three most important events.".into(),
    )?)
}
