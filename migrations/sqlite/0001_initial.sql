-- The whole state of mastsub. Times are integer milliseconds since the Unix epoch (UTC) unless they are
-- MAST dates, which are kept as canonical text (7 fractional digits, no zone) so that they sort as times.

-- One row per distinct notice content, whatever its source and however often it arrived.
CREATE TABLE notices (
    id              INTEGER PRIMARY KEY,
    sha256          TEXT    NOT NULL UNIQUE,          -- of the file's bytes: the same content is one notice
    source_kind     TEXT    NOT NULL CHECK (source_kind IN ('inbox', 'cli', 'imap', 'download')),
    source_ref      TEXT    NOT NULL,                 -- a path, or the mail's Message-ID and UID
    name            TEXT    NOT NULL,                 -- the file or attachment name
    size            INTEGER NOT NULL,
    received_at     INTEGER NOT NULL,
    last_seen_at    INTEGER NOT NULL,
    times_seen      INTEGER NOT NULL DEFAULT 1,
    status          TEXT    NOT NULL CHECK (status IN ('accepted', 'partial', 'rejected')),
    records         INTEGER NOT NULL,                 -- records in the array (0 if not an array)
    events_recorded INTEGER NOT NULL DEFAULT 0,
    error           TEXT                              -- why a part or the whole was refused
);

-- One row per product version to fetch: the job the download workers claim.
CREATE TABLE downloads (
    id               INTEGER PRIMARY KEY,
    product          TEXT    NOT NULL,                -- '<mission lowercase>/<fileset>/<filename>'
    mission          TEXT    NOT NULL,
    fileset          TEXT    NOT NULL,
    filename         TEXT    NOT NULL,
    program          INTEGER NOT NULL,
    event_type       TEXT    NOT NULL CHECK (event_type IN ('New', 'Reprocessed', 'Public')),
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
    finished_at      INTEGER
);
CREATE INDEX downloads_by_product ON downloads (product, id);
CREATE INDEX downloads_by_state ON downloads (state, next_attempt_at);

-- One row per event id, with every field and the record exactly as it arrived.
CREATE TABLE events (
    id                  INTEGER PRIMARY KEY,
    event_id            TEXT    NOT NULL UNIQUE,
    notice_id           INTEGER NOT NULL REFERENCES notices (id),
    record_index        INTEGER NOT NULL,
    mission             TEXT    NOT NULL,
    fileset             TEXT    NOT NULL,
    filename            TEXT    NOT NULL,
    program             INTEGER NOT NULL,
    event_type          TEXT    NOT NULL CHECK (event_type IN ('New', 'Reprocessed', 'Public')),
    archived_date       TEXT    NOT NULL,
    public_release_date TEXT    NOT NULL,
    uri                 TEXT,
    raw                 TEXT    NOT NULL,
    disposition         TEXT    NOT NULL
                        CHECK (disposition IN ('queued', 'joined', 'requeued', 'already_done', 'record_only')),
    download_id         INTEGER REFERENCES downloads (id),
    received_at         INTEGER NOT NULL
);
CREATE INDEX events_by_notice ON events (notice_id);
CREATE INDEX events_by_download ON events (download_id);
CREATE INDEX events_by_type ON events (event_type);
