-- Cloud-first downloads ([cloud]): where each job's bytes came from, and MAST's path look-ups.
--
-- downloads.source: 'cloud' (the open-data bucket) or 'mast', for the bytes of the job's .part file while
-- it runs (a resume goes on only from the same source, whose validator it holds) and for the published
-- file once done; fetched_from: the URL they came from (the manifest's URL column, list --json).
ALTER TABLE downloads ADD COLUMN source TEXT;
ALTER TABLE downloads ADD COLUMN fetched_from TEXT;

-- What MAST's path look-up said of a product's mast: URI: its key in the bucket, or NULL for "not in the
-- cloud", and when it was asked. A key is kept; a "not in the cloud" is asked again after an hour (a
-- product made public is copied to the bucket later).
CREATE TABLE cloud_paths (
    uri TEXT PRIMARY KEY,
    key TEXT,
    looked_up_at INTEGER NOT NULL
) WITHOUT ROWID;
