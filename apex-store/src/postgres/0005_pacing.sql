-- Version 5: what each process counts against each model's rate limits, so
-- processes sharing a ledger split the budgets instead of each taking all.
CREATE TABLE apex_audition.pacing (
    bucket_key    TEXT NOT NULL,
    worker        TEXT NOT NULL,
    seen_ms       BIGINT NOT NULL,
    requests      BIGINT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    PRIMARY KEY (bucket_key, worker)
);
