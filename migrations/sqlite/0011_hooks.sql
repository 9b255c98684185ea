-- [hooks]: the runs of the operator's commands, durable. A product's run is queued in the transaction
-- that records its publication; a notice's once every download of it has ended. The runner claims due
-- runs (pending → running, attempts + 1), and ends them done, pending again (a non-zero exit, retried
-- with backoff) or failed (hooks.max_attempts used). A run left running by a daemon that died is pending
-- again at the next start: hooks run at least once.
CREATE TABLE hook_runs (
    id              INTEGER PRIMARY KEY,
    kind            TEXT    NOT NULL CHECK (kind IN ('product', 'notice')),
    download_id     INTEGER REFERENCES downloads (id),   -- kind 'product': the job published
    notice_id       INTEGER REFERENCES notices (id),     -- kind 'notice': the notice whose downloads ended
    state           TEXT    NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,           -- attempts that failed (a non-zero exit, a timeout)
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    finished_at     INTEGER
);
CREATE INDEX hook_runs_due ON hook_runs (state, next_attempt_at);
-- One run per notice.
CREATE UNIQUE INDEX hook_runs_by_notice ON hook_runs (notice_id) WHERE kind = 'notice';

-- Since when on_notice has been set: older notices get no run when it is first turned on.
CREATE TABLE hook_state (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    notices_since INTEGER NOT NULL
);
