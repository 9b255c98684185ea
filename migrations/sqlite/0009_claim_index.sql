-- A claim skips queued jobs whose local path has a job running. Without an index that test scanned the
-- whole table for every claim (O(jobs) per claim: 150 µs with 400 jobs, milliseconds with 100,000); this
-- partial index holds only the running jobs, so the test is one seek and costs nothing to keep.
CREATE INDEX downloads_running_by_path ON downloads (local_path) WHERE state = 'running';
