-- E-mail: the outbox (mails wait here until the SMTP server takes them, across restarts), notices already
-- summarized, and the mailer's watermarks.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    kind            TEXT    NOT NULL CHECK (kind IN ('summary', 'alert')),
    cause           TEXT,                 -- alerts: e.g. 'needs_auth', 'failed: MAST answered HTTP 404'
    subject         TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    sent_at         INTEGER
);
CREATE INDEX outbox_unsent ON outbox (sent_at, next_attempt_at);
CREATE INDEX outbox_by_cause ON outbox (cause, created_at);

ALTER TABLE notices ADD COLUMN summarized_at INTEGER;

-- enabled_since: notices received before e-mail was first enabled are not summarized (no flood of old
-- news); alerts_until: job ends up to this time have been looked at for alerts.
CREATE TABLE mailer_state (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    enabled_since INTEGER NOT NULL,
    alerts_until  INTEGER NOT NULL
);
