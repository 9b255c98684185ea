-- What a running daemon says about itself, for `status`: one row, rewritten every few seconds by the
-- download pool. A row not updated for a while means no daemon runs.
CREATE TABLE daemon_state (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    pid        INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    rate       REAL    NOT NULL,  -- bytes per second received over the last few seconds
    updated_at INTEGER NOT NULL
);
