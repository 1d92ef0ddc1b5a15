-- Version 6: provider batches (apex run --batch). A batch is recorded with
-- its items before it is submitted and with the provider's id after, so a
-- resume re-attaches to it instead of submitting it again.
CREATE TABLE apex_audition.batches (
    batch_key         TEXT PRIMARY KEY,
    run_id            TEXT NOT NULL,
    provider          TEXT NOT NULL,
    model             TEXT NOT NULL,
    wave              TEXT NOT NULL CHECK (wave IN ('leader', 'follower', 'single')),
    provider_batch_id TEXT,
    state             TEXT NOT NULL
                      CHECK (state IN ('intent', 'submitted', 'ended', 'cancelled', 'failed')),
    item_count        BIGINT NOT NULL,
    created_at        TEXT NOT NULL,
    submitted_at      TEXT,
    ended_at          TEXT
);
CREATE INDEX batches_run ON apex_audition.batches (run_id, state);
CREATE TABLE apex_audition.batch_items (
    batch_key     TEXT NOT NULL,
    generation_id BIGINT NOT NULL,
    attempt       BIGINT NOT NULL,
    custom_id     TEXT NOT NULL,
    PRIMARY KEY (batch_key, custom_id)
);
CREATE INDEX batch_items_generation ON apex_audition.batch_items (generation_id);
