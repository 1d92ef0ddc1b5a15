-- Version 5: what each process counts against each model's rate limits, so
-- processes sharing a ledger split the budgets instead of each taking all.
CREATE TABLE apex_audition.pacing (
    bucket_key    TEXT NOT NULL,
    worker        TEXT NOT NULL,
    seen_ms       INTEGER NOT NULL,
    requests      INTEGER NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    PRIMARY KEY (bucket_key, worker)
);
