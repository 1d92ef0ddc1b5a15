//! Synthetic case files: deterministic, plausible text for trying Apex and
//! for benchmarks, sized without committing megabytes, and the sentences
//! the simulator's answers are drawn from.

use std::fmt::Write as _;

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

/// The system text of a sample package.
pub const SAMPLE_SYSTEM: &str =
    "You are a careful analyst. Answer only from the case file you are given.\n";
/// The prompt of a sample package.
pub const SAMPLE_PROMPT: &str = "List the three most important events in the case file above, with their days, in at most 150 words.\n";

/// A small deterministic generator (xorshift), so text never depends on a
/// seed from the environment.
pub(crate) struct Xorshift(pub u64);

impl Xorshift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// Case file `index` of `target_bytes` bytes (ASCII, ending in a newline):
/// days of events in varied sentences. The same arguments give the same
/// bytes.
pub fn case_file(index: usize, target_bytes: usize) -> String {
    let mut rng =
        Xorshift(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
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
    text.push('\n');
    text
}

/// The context of sample package `index` for about `tokens` tokens at four
/// bytes per token, system and prompt included.
pub fn sample_context(index: usize, tokens: usize) -> String {
    let bytes = (tokens * 4).saturating_sub(SAMPLE_SYSTEM.len() + SAMPLE_PROMPT.len());
    case_file(index, bytes)
}

/// An answer of about `tokens` tokens (four bytes each) made of whole
/// sentences of `source`, chosen by `seed`: plausible text that differs
/// between seeds. A source without sentences gives the words of a fixed
/// sentence.
pub(crate) fn answer_text(source: &str, tokens: u64, seed: u64) -> String {
    let target = (tokens as usize).saturating_mul(4);
    let sentences: Vec<&str> = source
        .split_inclusive(". ")
        .map(str::trim)
        .filter(|s| s.len() > 20 && s.len() < 400 && !s.contains('#') && !s.contains('\n'))
        .take(4096)
        .collect();
    let fallback = ["The document records several events in order."];
    let sentences: &[&str] = if sentences.is_empty() {
        &fallback
    } else {
        &sentences
    };
    let mut rng = Xorshift(seed | 1);
    let mut text = String::with_capacity(target + 64);
    while text.len() < target {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(sentences[(rng.next() % sentences.len() as u64) as usize]);
    }
    // About the size asked for: at the end of a sentence where one ends
    // in the second half, else at a word.
    if text.len() > target && target > 0 {
        let cut = match text[..target].rfind(". ") {
            Some(end) if end + 1 >= target / 2 => end + 1,
            _ => text[..target].rfind(' ').unwrap_or(target),
        };
        text.truncate(cut);
    }
    if tokens > 0 && text.is_empty() {
        text.push_str("Noted.");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_files_are_deterministic_and_sized() {
        let a = case_file(3, 10_000);
        assert_eq!(a, case_file(3, 10_000));
        assert_ne!(a, case_file(4, 10_000));
        assert_eq!(a.len(), 10_001);
        assert!(a.starts_with("# Case file 03"));
    }

    #[test]
    fn answers_are_sentences_of_the_source_sized_and_seeded() {
        let source = case_file(1, 50_000);
        let a = answer_text(&source, 100, 7);
        assert!(a.len() <= 400 && a.len() > 200, "{}", a.len());
        assert!(a.ends_with('.'), "{a}");
        assert!(a.starts_with("On day "), "{a}");
        assert_eq!(a, answer_text(&source, 100, 7));
        assert_ne!(a, answer_text(&source, 100, 8));
        assert_eq!(answer_text("", 3, 1), "The");
        assert_eq!(answer_text("", 0, 1), "");
    }
}
