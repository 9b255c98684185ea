-- Why a queued job waits though its time has come and went (download.min_free_space: no room on the
-- download file system for its announced size). Such a wait never counts as an attempt and never fails
-- the job; the reason is shown by `list --json`, `status`, the status page and the metrics, and cleared
-- when the job ends in any other way.
ALTER TABLE downloads ADD COLUMN waiting_reason TEXT;
