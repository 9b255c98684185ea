-- Event types are MAST's four (New, First, Reprocessed, Public) or any other it may add, kept as written:
-- the CHECK constraints on event_type go. An event_id recorded once may come again with other content
-- (another product, type or date): that is a conflict, reported and recorded too, so event_id is no longer
-- unique on its own. The ingest transaction (BEGIN IMMEDIATE, the only writer of events) records an id
-- again only with other mission, fileset, filename, type or date; the index on event_id serves its look-up.
-- SQLite cannot drop a constraint in place, so both tables are rebuilt (downloads first, so that events can
-- point at the new one; the renames carry the reference along).

CREATE TABLE downloads_new (
    id               INTEGER PRIMARY KEY,
    product          TEXT    NOT NULL,                -- '<mission lowercase>/<fileset>/<filename>'
    mission          TEXT    NOT NULL,
    fileset          TEXT    NOT NULL,
    filename         TEXT    NOT NULL,
    program          INTEGER NOT NULL,
    event_type       TEXT    NOT NULL,
    version          TEXT    NOT NULL,                -- archived_date of the newest event it serves
    url              TEXT    NOT NULL,
    local_path       TEXT    NOT NULL,                -- relative to storage.downloads
    state            TEXT    NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'done', 'failed', 'needs_auth')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    bytes_expected   INTEGER,
    bytes_done       INTEGER NOT NULL DEFAULT 0,
    etag             TEXT,
    last_modified    TEXT,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    verify_failures  INTEGER NOT NULL DEFAULT 0,
    not_found_since  INTEGER,
    verified         TEXT
);
INSERT INTO downloads_new (id, product, mission, fileset, filename, program, event_type, version, url,
                           local_path, state, attempts, next_attempt_at, lease_owner, lease_expires_at,
                           bytes_expected, bytes_done, etag, last_modified, last_error, created_at, updated_at,
                           started_at, finished_at, verify_failures, not_found_since, verified)
SELECT id, product, mission, fileset, filename, program, event_type, version, url,
       local_path, state, attempts, next_attempt_at, lease_owner, lease_expires_at,
       bytes_expected, bytes_done, etag, last_modified, last_error, created_at, updated_at,
       started_at, finished_at, verify_failures, not_found_since, verified
FROM downloads;

CREATE TABLE events_new (
    id                  INTEGER PRIMARY KEY,
    event_id            TEXT    NOT NULL,
    notice_id           INTEGER NOT NULL REFERENCES notices (id),
    record_index        INTEGER NOT NULL,
    mission             TEXT    NOT NULL,
    fileset             TEXT    NOT NULL,
    filename            TEXT    NOT NULL,
    program             INTEGER NOT NULL,
    event_type          TEXT    NOT NULL,
    archived_date       TEXT    NOT NULL,
    public_release_date TEXT    NOT NULL,
    uri                 TEXT,
    raw                 TEXT    NOT NULL,
    disposition         TEXT    NOT NULL
                        CHECK (disposition IN ('queued', 'joined', 'requeued', 'already_done', 'record_only')),
    download_id         INTEGER REFERENCES downloads_new (id),
    received_at         INTEGER NOT NULL
);
INSERT INTO events_new (id, event_id, notice_id, record_index, mission, fileset, filename, program,
                        event_type, archived_date, public_release_date, uri, raw, disposition, download_id,
                        received_at)
SELECT id, event_id, notice_id, record_index, mission, fileset, filename, program,
       event_type, archived_date, public_release_date, uri, raw, disposition, download_id, received_at
FROM events;

DROP TABLE events;
DROP TABLE downloads;
ALTER TABLE downloads_new RENAME TO downloads;
ALTER TABLE events_new RENAME TO events;

CREATE INDEX downloads_by_product ON downloads (product, id);
CREATE INDEX downloads_by_state ON downloads (state, next_attempt_at);
CREATE INDEX events_by_event_id ON events (event_id);
CREATE INDEX events_by_notice ON events (notice_id);
CREATE INDEX events_by_download ON events (download_id);
CREATE INDEX events_by_type ON events (event_type);
