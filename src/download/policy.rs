//! The retry policy: from how an attempt ended to the job's next state and time.
//!
//! Transient trouble (network, cut bodies, 408, 429, 5xx) backs off exponentially with jitter between
//! `retry_initial` and `retry_max` (backon computes the delay), honouring Retry-After, up to
//! `max_attempts`, then `failed`. 401/403: `needs_auth`. 404: retried every `not_found_retry` until
//! `not_found_give_up` after the first 404 (products can lag their notice), then `failed`. Disk trouble
//! waits and retries without counting the attempt. A body that fails verification (an HTML page, a
//! damaged or cut file by its format's rules) is fetched again from zero with backoff, three times in
//! all, then `failed`. What retrying cannot change (a link in the download folder, a product too large,
//! a disk filled by the product itself) fails at once. Retry-After is honoured up to `retry_max`. A
//! shutdown puts the job back at once, attempt not counted. No rule waits longer than [`longest_delay`],
//! which is what lets the pool tell a next attempt time from a clock that was set back ([`due_horizon`]).

use std::time::Duration;

use backon::BackoffBuilder;

use super::error::FetchError;
use crate::config::DownloadConfig;
use crate::store::{DownloadState, Finish, Job};

/// The longest Retry-After honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How long disk trouble is waited out between attempts, at most.
const DISK_WAIT: Duration = Duration::from_secs(60);
/// How often a job waiting for room on the disk (`download.min_free_space`) asks again.
pub const ROOM_WAIT: Duration = Duration::from_secs(15);
/// ... and after a second refusal in a row.
pub const ROOM_WAIT_AGAIN: Duration = Duration::from_secs(300);
/// Verification failures in a row before the job fails.
const VERIFY_FAILURES_ALLOWED: i64 = 3;
/// Added to [`longest_delay`] for [`due_horizon`]: room for small clock corrections, so that only a
/// time no rule could have set is taken for a clock that was set back.
const HORIZON_MARGIN: Duration = Duration::from_secs(60);

/// The longest delay [`decide`] can set before a next attempt: each rule's bound, the largest of them.
pub fn longest_delay(config: &DownloadConfig) -> Duration {
    [
        // Backoff (transient errors, verification failures), and Retry-After, which it honours only up
        // to retry_max.
        config.retry_max,
        MAX_RETRY_AFTER.min(config.retry_max),
        // Disk trouble, and no room for a product.
        DISK_WAIT.min(config.retry_max),
        ROOM_WAIT_AGAIN,
        // 404.
        config.not_found_retry,
    ]
    .into_iter()
    .max()
    .unwrap_or(config.retry_max)
}

/// A queued job due further ahead than this was given its time under a wall clock that has since been
/// set back (no rule sets a longer delay): the pool makes it due now instead of waiting out the step.
pub fn due_horizon(config: &DownloadConfig) -> Duration {
    longest_delay(config) + HORIZON_MARGIN
}

/// The delay before attempt `attempt + 1` after `attempt` transient failures.
pub fn backoff(config: &DownloadConfig, attempt: i64) -> Duration {
    let nth = usize::try_from(attempt.max(1) - 1).unwrap_or(0);
    backon::ExponentialBuilder::default()
        .with_min_delay(config.retry_initial)
        .with_max_delay(config.retry_max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(nth)
        .unwrap_or(config.retry_max)
        .clamp(config.retry_initial, config.retry_max)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What the store should record for a failed attempt of `job` at `now` (ms).
pub fn decide(config: &DownloadConfig, job: &Job, error: &FetchError, now: i64) -> Finish {
    let retry = |at: i64, refund: bool| Finish::Retry {
        at,
        error: error.to_string(),
        refund,
        verify_failures: job.verify_failures,
        not_found_since: None,
        waiting: None,
    };
    match error {
        FetchError::Interrupted | FetchError::LeaseLost => retry(now, true),
        FetchError::Auth { .. } => Finish::GiveUp {
            state: DownloadState::NeedsAuth,
            error: error.to_string(),
        },
        FetchError::Disk { .. } => retry(now + ms(config.retry_max.min(DISK_WAIT)), true),
        // Not a failure: the job waits for room, looked at again after ROOM_WAIT, for as long as it
        // takes, with its reason on record.
        FetchError::NoRoom { .. } => Finish::Retry {
            // A job refused again asks less often, so that one product too large for the room there is
            // cannot hold the pool's claims back every ROOM_WAIT (room appearing wakes it at once).
            at: now
                + ms(if job.waiting_reason.is_some() {
                    ROOM_WAIT_AGAIN
                } else {
                    ROOM_WAIT
                }),
            error: error.to_string(),
            refund: true,
            verify_failures: job.verify_failures,
            not_found_since: job.not_found_since,
            waiting: Some(error.to_string()),
        },
        // Not there yet: a 404 from MAST, or the bucket without the object (or with an older copy) where
        // `cloud.only` forbids MAST.
        FetchError::NotFound
        | FetchError::NotInBucket { .. }
        | FetchError::StaleInBucket { .. } => {
            let since = job.not_found_since.unwrap_or(now);
            if now - since >= ms(config.not_found_give_up) {
                Finish::GiveUp {
                    state: DownloadState::Failed,
                    error: format!(
                        "{error}, still after {}",
                        humantime::format_duration(Duration::from_millis((now - since) as u64))
                    ),
                }
            } else {
                Finish::Retry {
                    at: now + ms(config.not_found_retry),
                    error: error.to_string(),
                    refund: true,
                    verify_failures: job.verify_failures,
                    not_found_since: Some(since),
                    waiting: None,
                }
            }
        }
        FetchError::Verify(_) => {
            let failures = job.verify_failures + 1;
            if failures >= VERIFY_FAILURES_ALLOWED {
                Finish::GiveUp {
                    state: DownloadState::Failed,
                    error: format!("{error} ({failures} times, fetched from zero each time)"),
                }
            } else {
                Finish::Retry {
                    at: now + ms(backoff(config, job.attempt)),
                    error: error.to_string(),
                    refund: false,
                    verify_failures: failures,
                    not_found_since: None,
                    waiting: None,
                }
            }
        }
        e if e.is_transient() && job.attempt < i64::from(config.max_attempts) => {
            let mut delay = backoff(config, job.attempt);
            if let FetchError::Http {
                retry_after: Some(after),
                ..
            }
            | FetchError::Bucket {
                retry_after: Some(after),
                ..
            } = e
            {
                delay = delay.max((*after).min(MAX_RETRY_AFTER).min(config.retry_max));
            }
            retry(now + ms(delay), false)
        }
        e if e.is_transient() => Finish::GiveUp {
            state: DownloadState::Failed,
            error: format!("{e} (attempt {} of {})", job.attempt, config.max_attempts),
        },
        e => Finish::GiveUp {
            state: DownloadState::Failed,
            error: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(attempt: i64) -> Job {
        Job {
            id: 1,
            product: "jwst/f/f.fits".into(),
            mission: "JWST".into(),
            filename: "f.fits".into(),
            program: 1,
            event_type: "New".into(),
            version: "v".into(),
            url: "https://mast.stsci.edu/x".into(),
            local_path: "jwst/f/f.fits".into(),
            attempt,
            claim: attempt,
            bytes_expected: None,
            bytes_done: 0,
            etag: None,
            last_modified: None,
            verify_failures: 0,
            not_found_since: None,
            waiting_reason: None,
            source: None,
            checksum: None,
        }
    }

    fn config() -> DownloadConfig {
        DownloadConfig {
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(60),
            ..DownloadConfig::default()
        }
    }

    #[test]
    fn no_rule_sets_a_delay_beyond_the_longest_and_the_horizon_is_beyond_that() {
        let errors = || {
            vec![
                FetchError::Cut {
                    got: 1,
                    expected: None,
                    reason: "reset".into(),
                },
                FetchError::Http {
                    status: 503,
                    retry_after: Some(Duration::from_secs(7 * 24 * 3600)),
                },
                FetchError::Http {
                    status: 429,
                    retry_after: None,
                },
                FetchError::NotFound,
                FetchError::Verify("not FITS".into()),
                FetchError::local(
                    "write",
                    "/x",
                    std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
                ),
                FetchError::Interrupted,
            ]
        };
        let configs = [
            config(),
            DownloadConfig::default(),
            DownloadConfig {
                retry_max: Duration::from_secs(4 * 3600),
                not_found_retry: Duration::from_secs(60),
                max_attempts: 30,
                ..DownloadConfig::default()
            },
        ];
        for c in &configs {
            let longest = ms(longest_delay(c));
            let mut seen = 0;
            for attempt in 1..i64::from(c.max_attempts) {
                for e in errors() {
                    let mut j = job(attempt);
                    j.not_found_since = Some(-1);
                    if let Finish::Retry { at, .. } = decide(c, &j, &e, 1_000_000) {
                        seen = seen.max(at - 1_000_000);
                        assert!(at - 1_000_000 <= longest, "{e}: {at} beyond {longest}");
                    }
                }
            }
            assert_eq!(seen, longest, "the longest delay is one a rule really sets");
            assert!(due_horizon(c) > longest_delay(c));
        }
        assert_eq!(
            longest_delay(&DownloadConfig::default()),
            DownloadConfig::default()
                .not_found_retry
                .max(DownloadConfig::default().retry_max)
        );
    }

    #[test]
    fn backoff_grows_and_stays_between_initial_and_max() {
        let c = config();
        for attempt in 1..20 {
            let d = backoff(&c, attempt);
            assert!(
                d >= c.retry_initial && d <= c.retry_max,
                "attempt {attempt}: {d:?}"
            );
        }
        assert!(backoff(&c, 1) <= Duration::from_secs(4));
        assert_eq!(backoff(&c, 12), c.retry_max);
    }

    #[test]
    fn transient_errors_retry_until_max_attempts() {
        let c = config();
        let cut = FetchError::Cut {
            got: 1,
            expected: Some(2),
            reason: "reset".into(),
        };
        assert!(
            matches!(decide(&c, &job(1), &cut, 0), Finish::Retry { at, refund: false, .. } if at >= 2000)
        );
        let last = decide(&c, &job(i64::from(c.max_attempts)), &cut, 0);
        assert!(
            matches!(last, Finish::GiveUp { state: DownloadState::Failed, ref error } if error.contains("attempt 8 of 8"))
        );
    }

    #[test]
    fn retry_after_is_honoured() {
        let e = FetchError::Http {
            status: 503,
            retry_after: Some(Duration::from_secs(30)),
        };
        assert!(
            matches!(decide(&config(), &job(1), &e, 0), Finish::Retry { at, .. } if at >= 30_000)
        );
    }

    #[test]
    fn auth_not_found_disk_and_verify_have_their_own_rules() {
        let c = config();
        assert!(matches!(
            decide(&c, &job(1), &FetchError::Auth { status: 401 }, 0),
            Finish::GiveUp {
                state: DownloadState::NeedsAuth,
                ..
            }
        ));
        let nf = decide(&c, &job(1), &FetchError::NotFound, 1000);
        assert!(matches!(
            nf,
            Finish::Retry {
                refund: true,
                not_found_since: Some(1000),
                ..
            }
        ));
        let mut late = job(1);
        late.not_found_since = Some(0);
        let give_up = decide(&c, &late, &FetchError::NotFound, ms(c.not_found_give_up));
        assert!(matches!(
            give_up,
            Finish::GiveUp {
                state: DownloadState::Failed,
                ..
            }
        ));
        let disk = FetchError::local(
            "write",
            "/x",
            std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
        );
        assert!(matches!(
            decide(&c, &job(8), &disk, 0),
            Finish::Retry { refund: true, .. }
        ));
        let v = FetchError::Verify("not FITS".into());
        assert!(matches!(
            decide(&c, &job(1), &v, 0),
            Finish::Retry {
                verify_failures: 1,
                ..
            }
        ));
        let mut again = job(3);
        again.verify_failures = 2;
        assert!(matches!(
            decide(&c, &again, &v, 0),
            Finish::GiveUp {
                state: DownloadState::Failed,
                ..
            }
        ));
        let gone = FetchError::Http {
            status: 410,
            retry_after: None,
        };
        assert!(matches!(
            decide(&c, &job(1), &gone, 0),
            Finish::GiveUp {
                state: DownloadState::Failed,
                ..
            }
        ));
    }
}
