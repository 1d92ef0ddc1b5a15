-- Version 3: one heartbeat row per worker process. A claim is live while its
-- worker's heartbeat is fresh, so keeping claims alive is one small write,
-- however many generations the worker holds.
CREATE TABLE apex_audition.workers (
    worker       TEXT PRIMARY KEY,
    run_id       TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL
);
