-- Apex ledger, version 1 (PostgreSQL): the same tables as SQLite's 0001.
CREATE TABLE apex_audition.conditions (
    slug             TEXT PRIMARY KEY,
    provider         TEXT NOT NULL CHECK (provider IN ('openai', 'anthropic')),
    model            TEXT NOT NULL,
    temperature      DOUBLE PRECISION,
    top_p            DOUBLE PRECISION,
    max_tokens       BIGINT NOT NULL CHECK (max_tokens > 0),
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
    estimated_tokens BIGINT NOT NULL,
    byte_len         BIGINT NOT NULL,
    ingested_at      TEXT NOT NULL,
    PRIMARY KEY (prompt_id, version)
);

CREATE TABLE apex_audition.context_packages (
    prompt_id       TEXT PRIMARY KEY,
    current_version TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    FOREIGN KEY (prompt_id, current_version) REFERENCES apex_audition.context_versions (prompt_id, version)
);

CREATE TABLE apex_audition.runs (
    run_id        TEXT PRIMARY KEY,
    created_by    TEXT,
    notes         TEXT,
    flags_json    TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('planned', 'running', 'interrupted', 'finished')),
    replicates    BIGINT NOT NULL CHECK (replicates > 0),
    context_limit BIGINT,
    dry_run       BOOLEAN NOT NULL,
    apex_version  TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    finished_at   TEXT
);

CREATE TABLE apex_audition.run_conditions (
    run_id         TEXT NOT NULL REFERENCES apex_audition.runs (run_id),
    condition_slug TEXT NOT NULL REFERENCES apex_audition.conditions (slug),
    position       BIGINT NOT NULL,
    params_json    TEXT NOT NULL,
    PRIMARY KEY (run_id, condition_slug)
);

CREATE TABLE apex_audition.generations (
    generation_id         BIGSERIAL PRIMARY KEY,
    run_id                TEXT NOT NULL REFERENCES apex_audition.runs (run_id),
    condition_slug        TEXT NOT NULL REFERENCES apex_audition.conditions (slug),
    prompt_id             TEXT NOT NULL,
    package_version       TEXT NOT NULL,
    context_index         BIGINT NOT NULL,
    replicate_index       BIGINT NOT NULL,
    status                TEXT NOT NULL DEFAULT 'pending'
                          CHECK (status IN ('pending', 'running', 'success', 'error')),
    cache_hit             BOOLEAN NOT NULL DEFAULT FALSE,
    attempts              BIGINT NOT NULL DEFAULT 0,
    input_tokens          BIGINT,
    cache_write_tokens    BIGINT,
    cache_write_1h_tokens BIGINT,
    cache_read_tokens     BIGINT,
    output_tokens         BIGINT,
    reasoning_tokens      BIGINT,
    cost_usd              DOUBLE PRECISION,
    latency_ms            BIGINT,
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
    FOREIGN KEY (prompt_id, package_version) REFERENCES apex_audition.context_versions (prompt_id, version),
    UNIQUE (run_id, condition_slug, prompt_id, replicate_index)
);

CREATE INDEX generations_run_status ON apex_audition.generations (run_id, status);

CREATE TABLE apex_audition.attempts (
    generation_id       BIGINT NOT NULL REFERENCES apex_audition.generations (generation_id),
    attempt             BIGINT NOT NULL CHECK (attempt > 0),
    started_at          TEXT NOT NULL,
    finished_at         TEXT,
    outcome             TEXT CHECK (outcome IN ('success', 'error', 'abandoned')),
    http_status         BIGINT,
    error_class         TEXT,
    error_message       TEXT,
    provider_request_id TEXT,
    latency_ms          BIGINT,
    PRIMARY KEY (generation_id, attempt)
);
