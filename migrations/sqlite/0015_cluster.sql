-- Members and leaders (issue 17): every `mastsub run` on a database is a member, named by
-- `[cluster] node`; the IMAP mailbox, the mail outbox and the hooks are each run by one member at a
-- time, the holder of a leader lease row. On SQLite there is one member at a time (the run lock), but
-- the rows are the same, so that `status` reads them alike on both backends.
CREATE TABLE members (
    node         TEXT    PRIMARY KEY,
    owner        TEXT    NOT NULL,           -- node:pid:nonce:machine of the process that is the member now
    pid          INTEGER NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,           -- ms since the epoch, by the member's clock
    clock_skew   INTEGER NOT NULL DEFAULT 0, -- the member's clock minus the database's, ms (PostgreSQL)
    rate         REAL    NOT NULL DEFAULT 0, -- bytes per second received lately
    stopped_at   INTEGER                     -- set when it stopped cleanly
);

CREATE TABLE leaders (
    role       TEXT    PRIMARY KEY CHECK (role IN ('imap', 'mail', 'hooks')),
    node       TEXT    NOT NULL,
    owner      TEXT    NOT NULL,
    since      INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);

-- Fencing: every claim of a job increments its count, and an update carries the count of the claim
-- it belongs to, so that a worker whose lease was taken over (even by its own process) changes nothing.
ALTER TABLE downloads ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
