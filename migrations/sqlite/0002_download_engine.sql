-- What the download engine needs beyond the first schema.
-- verify_failures: consecutive downloads that arrived whole but failed verification (size, FITS shape);
--   one is retried from zero, the second fails the job.
-- not_found_since: when MAST first answered 404 for this job; 404s are retried slowly until a deadline.
ALTER TABLE downloads ADD COLUMN verify_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE downloads ADD COLUMN not_found_since INTEGER;
