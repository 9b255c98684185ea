-- What each done product's content was verified by ("FITS: 3 HDUs, structure and CHECKSUM/DATASUM of
-- all 3", "JSON: parses", "size only (no verifier for .dat files)"), for `list --json` and the one-shot
-- manifest.
ALTER TABLE downloads ADD COLUMN verified TEXT;
