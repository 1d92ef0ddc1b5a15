//! Writes synthetic context packages of a chosen size, so benchmarks and the
//! offline production example can use realistic 128K-token contexts without
//! committing megabytes.
//!
//! ```text
//! cargo run --release --example make_contexts -- OUT_DIR [COUNT] [TOKENS]
//! cargo run --release --example make_contexts -- bench-data/contexts 21 128000
//! ```
//!
//! The text is deterministic (same arguments, same bytes, same package
//! versions) and sized by Apex's own estimate of four bytes per token.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

const SUBJECTS: &[&str] = &[
    "the survey team",
    "the harbour authority",
    "the night shift",
    "the auditors",
    "the field station",
    "the review board",
    "the maintenance crew",
    "the archive",
];
const VERBS: &[&str] = &[
    "recorded",
    "questioned",
    "measured",
    "reported",
    "revised",
    "confirmed",
    "disputed",
    "catalogued",
];
const OBJECTS: &[&str] = &[
    "the tide readings",
    "a shipment of instruments",
    "the quarterly ledger",
    "three anomalies in the sensor logs",
    "the revised safety plan",
    "an unsigned memo",
    "the calibration schedule",
    "a gap in the maintenance records",
];
const TAILS: &[&str] = &[
    "before the storm arrived",
    "after a long delay",
    "with some reluctance",
    "in the presence of two witnesses",
    "without consulting the harbour master",
    "while the power was out",
    "for the third time that month",
    "on the orders of the director",
];

/// A small deterministic generator (xorshift), so output never depends on a
/// random seed from the environment.
struct Rng(u64);

impl Rng {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        items[(self.0 % items.len() as u64) as usize]
    }
}

fn document(index: usize, target_bytes: usize) -> String {
    let mut rng =
        Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut text = format!("# Case file {index:02}\n\n");
    let mut day = 1;
    while text.len() < target_bytes {
        let _ = write!(text, "## Day {day}\n\n");
        for _ in 0..6 {
            let _ = write!(
                text,
                "On day {day}, {} {} {} {}. ",
                rng.pick(SUBJECTS),
                rng.pick(VERBS),
                rng.pick(OBJECTS),
                rng.pick(TAILS)
            );
        }
        text.push_str("\n\n");
        day += 1;
    }
    text.truncate(target_bytes);
    // Never cut inside a character (the text is ASCII, but stay honest).
    while !text.is_char_boundary(text.len()) {
        text.pop();
    }
    text.push('\n');
    text
}

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
        let system = "You are a careful analyst. Answer only from the case file you are given.\n";
        let prompt = "List the three most important events in the case file above, with their days, in at most 150 words.\n";
        let context_bytes = (tokens * 4).saturating_sub(system.len() + prompt.len());
        std::fs::write(dir.join("system.md"), system)?;
        std::fs::write(dir.join("context.md"), document(i, context_bytes))?;
        std::fs::write(dir.join("prompt.md"), prompt)?;
    }
    println!(
        "wrote {count} package(s) of ~{tokens} tokens under {}",
        out.display()
    );
    Ok(())
}
