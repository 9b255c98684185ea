-- What the IMAP source needs: its position in each mailbox, and the health of every source for `status`.
-- imap_mailboxes: per account (user@host:port) and mailbox, the UIDVALIDITY seen and the highest UID
--   handled; mail above it is new. A new UIDVALIDITY starts the mailbox again from UID 0 (the notice
--   content hash keeps that free of duplicates). Mastsub never relies on \Seen flags.
CREATE TABLE imap_mailboxes (
    account     TEXT    NOT NULL,
    mailbox     TEXT    NOT NULL,
    uidvalidity INTEGER NOT NULL,
    last_uid    INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (account, mailbox)
);

-- source_health: one row per source ('imap', later 'inbox'), rewritten as its state changes.
CREATE TABLE source_health (
    source        TEXT    PRIMARY KEY,
    state         TEXT    NOT NULL,           -- e.g. connecting, idle, polling, reconnecting, stopped
    detail        TEXT,                       -- e.g. the account and mailbox
    connected     INTEGER NOT NULL DEFAULT 0,
    last_contact  INTEGER,                    -- ms since the epoch: the last answer from the server
    last_error    TEXT,
    last_error_at INTEGER,
    taken         INTEGER NOT NULL DEFAULT 0, -- mails taken (notices ingested from them)
    updated_at    INTEGER NOT NULL
);
