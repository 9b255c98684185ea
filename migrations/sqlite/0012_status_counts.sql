-- What `status`, the status page and the metrics count, kept as the rows change, so that reading them
-- costs a few rows whatever the number of jobs and events (counting 100,000 jobs each time took most of a
-- second). Triggers keep the counts: every write of `downloads` and `events` passes through them, so no
-- code path can forget one. A progress write (bytes of a running job) does not fire them.

-- Jobs by event type and state; `bytes` sums the bytes of done jobs only (status's bytes_done).
CREATE TABLE download_counts (
    event_type TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    n          INTEGER NOT NULL DEFAULT 0,
    bytes      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (event_type, state)
) WITHOUT ROWID;
INSERT INTO download_counts (event_type, state, n, bytes)
SELECT event_type, state, count(*), coalesce(sum(CASE WHEN state = 'done' THEN bytes_done ELSE 0 END), 0)
FROM downloads GROUP BY event_type, state;

CREATE TRIGGER download_counts_insert AFTER INSERT ON downloads
BEGIN
    INSERT OR IGNORE INTO download_counts (event_type, state) VALUES (NEW.event_type, NEW.state);
    UPDATE download_counts
    SET n = n + 1, bytes = bytes + CASE WHEN NEW.state = 'done' THEN NEW.bytes_done ELSE 0 END
    WHERE event_type = NEW.event_type AND state = NEW.state;
END;

CREATE TRIGGER download_counts_delete AFTER DELETE ON downloads
BEGIN
    UPDATE download_counts
    SET n = n - 1, bytes = bytes - CASE WHEN OLD.state = 'done' THEN OLD.bytes_done ELSE 0 END
    WHERE event_type = OLD.event_type AND state = OLD.state;
END;

CREATE TRIGGER download_counts_update AFTER UPDATE OF state, event_type, bytes_done ON downloads
WHEN OLD.state IS NOT NEW.state OR OLD.event_type IS NOT NEW.event_type
     OR ((OLD.state = 'done' OR NEW.state = 'done') AND OLD.bytes_done IS NOT NEW.bytes_done)
BEGIN
    UPDATE download_counts
    SET n = n - 1, bytes = bytes - CASE WHEN OLD.state = 'done' THEN OLD.bytes_done ELSE 0 END
    WHERE event_type = OLD.event_type AND state = OLD.state;
    INSERT OR IGNORE INTO download_counts (event_type, state) VALUES (NEW.event_type, NEW.state);
    UPDATE download_counts
    SET n = n + 1, bytes = bytes + CASE WHEN NEW.state = 'done' THEN NEW.bytes_done ELSE 0 END
    WHERE event_type = NEW.event_type AND state = NEW.state;
END;

-- Events by type (events are only ever inserted).
CREATE TABLE event_counts (
    event_type TEXT    NOT NULL PRIMARY KEY,
    n          INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO event_counts (event_type, n) SELECT event_type, count(*) FROM events GROUP BY event_type;

CREATE TRIGGER event_counts_insert AFTER INSERT ON events
BEGIN
    INSERT OR IGNORE INTO event_counts (event_type) VALUES (NEW.event_type);
    UPDATE event_counts SET n = n + 1 WHERE event_type = NEW.event_type;
END;

CREATE TRIGGER event_counts_delete AFTER DELETE ON events
BEGIN
    UPDATE event_counts SET n = n - 1 WHERE event_type = OLD.event_type;
END;

-- The latest failures, the oldest queued job, and the jobs waiting for room: partial indexes, written
-- only when a job enters or leaves those states (never by a running job's progress).
CREATE INDEX downloads_failures ON downloads (updated_at) WHERE state IN ('failed', 'needs_auth');
CREATE INDEX downloads_queued_since ON downloads (created_at) WHERE state = 'queued';
CREATE INDEX downloads_waiting ON downloads (updated_at) WHERE state = 'queued' AND waiting_reason IS NOT NULL;
