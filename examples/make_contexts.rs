//! Writes synthetic context packages of a chosen size, so benchmarks and the
//! offline production example can use realistic 128K-token contexts without
//! committing megabytes. The same text as `apex make-contexts` (both use
//! `apex_providers::simulator::sample`).
//!
//! ```text
//! cargo run --release --example make_contexts -- OUT_DIR [COUNT] [TOKENS]
//! cargo run --release --example make_contexts -- bench-data/contexts 21 128000
//! ```
//!
//! The text is deterministic (same arguments, same bytes, same package
//! versions) and sized by Apex's own estimate of four bytes per token.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use apex::providers::simulator::sample::{SAMPLE_PROMPT, SAMPLE_SYSTEM, sample_context};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        bail!("usage: make_contexts OUT_DIR [COUNT] [TOKENS]");
    };
    let count: usize = args
        .next()
        .map_or(Ok(21), |a| a.parse())
        .context("COUNT must be a whole number")?;
    let tokens: usize = args
        .next()
        .map_or(Ok(128_000), |a| a.parse())
        .context("TOKENS must be a whole number")?;
    if count == 0 || tokens < 100 {
        bail!("COUNT must be at least 1 and TOKENS at least 100");
    }
    let out = PathBuf::from(out);
    for i in 1..=count {
        let dir = out.join(format!("ctx-{i:02}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("system.md"), SAMPLE_SYSTEM)?;
        std::fs::write(dir.join("context.md"), sample_context(i, tokens))?;
        std::fs::write(dir.join("prompt.md"), SAMPLE_PROMPT)?;
    }
    println!(
        "wrote {count} package(s) of ~{tokens} tokens under {}",
        out.display()
    );
    Ok(())
}
