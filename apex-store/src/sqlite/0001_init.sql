-- Apex ledger, version 1 (SQLite). Every table lives in the attached
-- `apex_audition` database so that the same SQL runs on SQLite and PostgreSQL.

CREATE TABLE apex_audition.conditions (
    slug             TEXT PRIMARY KEY,
    provider         TEXT NOT NULL CHECK (provider IN ('openai', 'anthropic')),
    model            TEXT NOT NULL,
    temperature      REAL,
    top_p            REAL,
    max_tokens       INTEGER NOT NULL CHECK (max_tokens > 0),
    reasoning_effort TEXT,
    params_json      TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);

CREATE TABLE apex_audition.context_versions (
    prompt_id        TEXT NOT NULL,
    version          TEXT NOT NULL,
    system_text      TEXT,
    context_text     TEXT NOT NULL,
    prompt_text      TEXT NOT NULL,
    estimated_tokens INTEGER NOT NULL,
    byte_len         INTEGER NOT NULL,
    ingested_at      TEXT NOT NULL,
    PRIMARY KEY (prompt_id, version)
);

CREATE TABLE apex_audition.context_packages (
    prompt_id       TEXT PRIMARY KEY,
    current_version TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    FOREIGN KEY (prompt_id, current_version) REFERENCES context_versions (prompt_id, version)
);

CREATE TABLE apex_audition.runs (
    run_id        TEXT PRIMARY KEY,
    created_by    TEXT,
    notes         TEXT,
    flags_json    TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('planned', 'running', 'interrupted', 'finished')),
    replicates    INTEGER NOT NULL CHECK (replicates > 0),
    context_limit INTEGER,
    dry_run       BOOLEAN NOT NULL,
    apex_version  TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    finished_at   TEXT
);

CREATE TABLE apex_audition.run_conditions (
    run_id         TEXT NOT NULL REFERENCES runs (run_id),
    condition_slug TEXT NOT NULL REFERENCES conditions (slug),
    position       INTEGER NOT NULL,
    params_json    TEXT NOT NULL,
    PRIMARY KEY (run_id, condition_slug)
);

CREATE TABLE apex_audition.generations (
    generation_id         INTEGER PRIMARY KEY,
    run_id                TEXT NOT NULL REFERENCES runs (run_id),
    condition_slug        TEXT NOT NULL REFERENCES conditions (slug),
    prompt_id             TEXT NOT NULL,
    package_version       TEXT NOT NULL,
    context_index         INTEGER NOT NULL,
    replicate_index       INTEGER NOT NULL,
    status                TEXT NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'running', 'success', 'error')),
    cache_hit             BOOLEAN NOT NULL DEFAULT FALSE,
    attempts              INTEGER NOT NULL DEFAULT 0,
    input_tokens          INTEGER,
    cache_write_tokens    INTEGER,
    cache_write_1h_tokens INTEGER,
    cache_read_tokens     INTEGER,
    output_tokens         INTEGER,
    reasoning_tokens      INTEGER,
    cost_usd              REAL,
    latency_ms            INTEGER,
    finish_reason         TEXT,
    provider_request_id   TEXT,
    model_snapshot        TEXT,
    request_hash          TEXT,
    response_text         TEXT,
    error_class           TEXT,
    error_message         TEXT,
    created_at            TEXT NOT NULL,
    started_at            TEXT,
    finished_at           TEXT,
    claimed_by            TEXT,
    claimed_at            TEXT,
    FOREIGN KEY (prompt_id, package_version) REFERENCES context_versions (prompt_id, version),
    UNIQUE (run_id, condition_slug, prompt_id, replicate_index)
);

CREATE INDEX apex_audition.generations_run_status ON generations (run_id, status);

CREATE TABLE apex_audition.attempts (
    generation_id       INTEGER NOT NULL REFERENCES generations (generation_id),
    attempt             INTEGER NOT NULL CHECK (attempt > 0),
    started_at          TEXT NOT NULL,
    finished_at         TEXT,
    outcome             TEXT CHECK (outcome IN ('success', 'error', 'abandoned')),
    http_status         INTEGER,
    error_class         TEXT,
    error_message       TEXT,
    provider_request_id TEXT,
    latency_ms          INTEGER,
    PRIMARY KEY (generation_id, attempt)
);
