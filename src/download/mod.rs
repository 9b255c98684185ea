//! The download engine: a pool of workers that claim jobs from the store and fetch products.
//!
//! `fetch.rs` does one attempt (verified resume, verify), `publish.rs` publishes finished attempts and
//! records their ends in batches (group commit), `policy.rs` decides what a failed attempt means for the
//! job, `error.rs` names the failures. This module runs the pool: up to
//! `download.workers` jobs at once, each claimed under a lease that is renewed while it runs; a newly queued
//! job starts at once (ingest wakes the pool), a job whose next attempt time has come is picked up, and a
//! sweep every few seconds is the fallback. Jobs of a process that died (same host, pid gone) or whose
//! lease expired go back to `queued` at start-up and periodically. On shutdown the workers stop at a safe
//! point, keep their `.part` files, and give their jobs back.
//!
//! Clocks: every wait of the pool (the sweep, lease renewals, summaries, naps) runs on tokio's monotonic
//! clock. Stored times (next attempts, lease expiries) are wall-clock milliseconds, since they must
//! survive a restart, so a step of the wall clock must not turn them into hour-long waits or stolen
//! jobs: a queued job due further ahead than any delay the policy sets ([`policy::due_horizon`]) is made
//! due now by the sweep, and a lease held by a process this host can see (this pool, a live mastsub) is
//! judged by whether that process lives, never by its expiry; only a holder out of sight (another host)
//! is judged by its lease.

pub mod cloud;
pub mod error;
pub mod fetch;
pub mod policy;
pub mod publish;
pub mod room;
pub mod throttle;

use crate::store::now_ms;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::service::Vitals;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DownloadConfig};
use crate::store::{DaemonState, DownloadState, Finish, Job, Store};
use error::FetchError;
use fetch::Transfer;

/// A lease expiring further ahead than `download.lease` plus this was written under a clock since set
/// back.
const LEASE_CLOCK_MARGIN: Duration = Duration::from_secs(60);
/// The fallback sweep for due jobs and orphaned leases.
const SWEEP: Duration = Duration::from_secs(5);
/// On a shared store: the sweep (another member's lease that ran out is taken within a second of it),
/// and how often a pool with a free worker asks for a job (another member's ingest does not wake this
/// one: a notice that one member takes is started by all within half a second).
const SHARED_SWEEP: Duration = Duration::from_secs(1);
const SHARED_LOOK: Duration = Duration::from_millis(500);
/// The daemon's figures for `status` this often.
const STATE_EVERY: Duration = Duration::from_secs(5);
/// While the disk has no room, free space is looked at this often.
const ROOM_LOOK: Duration = Duration::from_secs(1);
/// A summary line this often while there is work.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// `node:pid:nonce:machine`: the lease owner name of this process's pool, `node` being `[cluster] node`
/// (the host name by default) and `machine` [`this_machine`].
pub(crate) fn owner_name(node: &str) -> String {
    format!(
        "{node}:{}:{:08x}:{}",
        std::process::id(),
        now_ms() as u32,
        this_machine().unwrap_or("unknown")
    )
}

/// What makes a pid mean this process table: the machine (`/etc/machine-id`), its boot
/// (`/proc/sys/kernel/random/boot_id`) and the pid namespace (`/proc/self/ns/pid`), as 16 hex digits of
/// their SHA-256. A host name is no such thing (two containers, or two hosts of a cluster, may share
/// one), nor is a machine-id alone (a copied image, a reboot). `None` when any of them cannot be read:
/// then no holder is ever judged by its pid.
fn this_machine() -> Option<&'static str> {
    static MACHINE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    MACHINE
        .get_or_init(|| {
            use sha2::Digest;
            let machine_id = std::fs::read_to_string("/etc/machine-id")
                .or_else(|_| std::fs::read_to_string("/var/lib/dbus/machine-id"))
                .ok()
                .filter(|m| !m.trim().is_empty())?;
            let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
            let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
            let digest = sha2::Sha256::digest(
                format!(
                    "{}\n{}\n{}",
                    machine_id.trim(),
                    boot_id.trim(),
                    pid_ns.display()
                )
                .as_bytes(),
            );
            Some(hex::encode(&digest[..8]))
        })
        .as_deref()
}

/// What the pool can tell of the holder of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// This pool, or a live mastsub process on this host: its workers renew the lease, whatever the wall
    /// clock now says of its expiry.
    Alive,
    /// A process on this host that no longer exists (it crashed or was killed), or whose pid another
    /// program has taken since.
    Gone,
    /// A holder on another host, or an earlier pool of this very process (its loop was started again):
    /// only its lease can tell.
    Unseen,
}

/// Who holds a lease named `owner` (`node:pid:nonce:machine`), seen from the pool named `me`. Its pid
/// is looked at only when its machine is certainly this one (the same machine, boot and pid namespace);
/// any other holder, an older owner name without a machine among them, is judged by its lease.
fn holder(owner: &str, me: &str) -> Holder {
    if owner == me {
        return Holder::Alive;
    }
    let mut parts = owner.rsplitn(4, ':');
    let (machine, _nonce, pid) = (parts.next(), parts.next(), parts.next());
    let here = this_machine().is_some_and(|m| machine == Some(m)) && parts.next().is_some();
    match pid.and_then(|p| p.parse::<i32>().ok()) {
        Some(pid) if here => {
            if pid as u32 == std::process::id() {
                return Holder::Unseen;
            }
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
                Err(nix::errno::Errno::ESRCH) => Holder::Gone,
                _ if !runs_this_program(pid) => Holder::Gone,
                _ => Holder::Alive,
            }
        }
        _ => Holder::Unseen,
    }
}

/// Whether the lease owner name `owner` (`node:pid:nonce:machine`, or an older `node:pid:nonce`) names
/// this process: its pid, and its machine when it has one.
fn of_this_process(owner: &str) -> bool {
    let parts: Vec<&str> = owner.rsplitn(4, ':').collect();
    let (pid, machine) = match parts.as_slice() {
        [machine, _nonce, pid, _node] => (*pid, Some(*machine)),
        [_nonce, pid, _node] => (*pid, None),
        _ => return false,
    };
    pid.parse::<u32>().ok() == Some(std::process::id())
        && machine.is_none_or(|m| m == this_machine().unwrap_or("unknown"))
}

/// Whether the holder named `owner` is certainly gone, seen from the process named `me`: a process of
/// this very machine that no longer runs mastsub. Anyone else (another host, a live process) is judged
/// by their lease or heartbeat.
pub(crate) fn holder_is_gone(owner: &str, me: &str) -> bool {
    holder(owner, me) == Holder::Gone
}

/// Whether process `pid` runs the program this one runs (by `/proc/<pid>/comm`), so that a pid reused by
/// another program does not keep a dead holder's jobs forever; true when that cannot be read.
fn runs_this_program(pid: i32) -> bool {
    let comm = |p: String| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim_end().to_owned())
    };
    match (
        comm(format!("/proc/{pid}/comm")),
        comm("/proc/self/comm".into()),
    ) {
        (Some(theirs), Some(ours)) => theirs == ours,
        _ => true,
    }
}

/// Whether a running job's lease is orphaned: its holder, when seen, decides (a clock stepped forward
/// would make every lease look expired, and the sweep would take the jobs of a live pool); out of sight,
/// its lease does, and a lease that expires further ahead than a lease lasts was written under a clock
/// since set back, so it counts as expired. Times in ms since the epoch.
fn lease_orphaned(holder: Holder, expires: i64, now: i64, lease: Duration) -> bool {
    let longest = i64::try_from((lease + LEASE_CLOCK_MARGIN).as_millis()).unwrap_or(i64::MAX);
    match holder {
        Holder::Alive => false,
        Holder::Gone => true,
        Holder::Unseen => expires <= now || expires > now.saturating_add(longest),
    }
}

/// The MAST token: `mast.token`, else the contents of `mast.token_file`, else env `MAST_API_TOKEN`.
pub fn load_token(config: &Config) -> Result<Option<String>, String> {
    if let Some(t) = &config.mast.token {
        return Ok(Some(t.expose().trim().to_string()).filter(|t| !t.is_empty()));
    }
    if let Some(path) = &config.mast.token_file {
        return std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()).filter(|t| !t.is_empty()))
            .map_err(|e| format!("cannot read mast.token_file {}: {e}", path.display()));
    }
    Ok(std::env::var("MAST_API_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

/// Builds the HTTP client: rustls, connect and read timeouts (no whole-transfer deadline), User-Agent.
pub fn http_client(config: &DownloadConfig) -> reqwest::Result<reqwest::Client> {
    // reqwest is built without a default crypto provider; ring is ours. Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("mastsub/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(config.connect_timeout)
        .read_timeout(config.read_timeout)
        .redirect(reqwest::redirect::Policy::limited(10))
        .build()
}

/// Shared by the pool and its workers.
struct Pool {
    transfer: Transfer,
    config: DownloadConfig,
    /// The store admits one process at a time (SQLite's run lock): a lease of another process is a dead
    /// one's, wherever its pid may be judged or not.
    exclusive: bool,
    /// Where workers hand their ends over and claim their next jobs.
    publication: publish::Publication,
}

/// Runs the pool until `shutdown`; `wake` is notified when jobs are queued.
pub async fn run(
    config: &Config,
    store: Arc<dyn Store>,
    wake: Arc<Notify>,
    vitals: Arc<Vitals>,
    mut reload: crate::config::Reload,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let token = match load_token(config) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e}; downloading without a token (public data only)");
            None
        }
    };
    let base = url::Url::parse(&config.mast.base_url)?;
    let owner = owner_name(&config.cluster.node_name());
    let publication = publish::Publication::start(publish::Context {
        store: store.clone(),
        owner: owner.clone(),
        config: config.download.clone(),
        lease: config.download.lease,
        shared: crate::store::is_shared(&config.storage),
        vitals: vitals.clone(),
    });
    let client = http_client(&config.download)?;
    let cloud = config.cloud.enabled.then(|| {
        Arc::new(cloud::Cloud::new(
            client.clone(),
            &base,
            config,
            store.clone(),
        ))
    });
    let pool = Arc::new(Pool {
        exclusive: !crate::store::is_shared(&config.storage),
        transfer: Transfer {
            client,
            token: std::sync::RwLock::new(token),
            mast_origin: base.origin(),
            root: config.storage.downloads.clone(),
            keep_previous: config.download.keep_previous,
            store: store.clone(),
            owner,
            lease: config.download.lease,
            vitals: vitals.clone(),
            limits: fetch::Limits::from_config(&config.download),
            throttle: Arc::new(throttle::Throttle::new(
                config.download.max_rate.map(|r| r.0),
            )),
            room: room::Room::new(config.download.min_free_space.as_u64()),
            cloud,
        },
        config: config.download.clone(),
        publication,
    });
    let horizon = policy::due_horizon(&config.download);
    let orphans = pool.sweep(&store, horizon).await?;
    if orphans > 0 {
        tracing::info!(
            "{orphans} interrupted download(s) queued again (their .part files are resumed)"
        );
    }
    if pool.has_token() {
        let n = store.requeue_needs_auth(now_ms()).await?;
        if n > 0 {
            tracing::info!("a MAST token is set: {n} download(s) waiting for one queued again");
        }
    }
    tracing::info!(
        "downloading with {} worker(s) into {} from {}{}{}{}, keeping {} free",
        pool.config.workers,
        pool.transfer.root.display(),
        config.mast.base_url,
        match &pool.transfer.cloud {
            Some(c) if c.only() => format!(
                " (public products from the cloud bucket {} only)",
                c.bucket()
            ),
            Some(c) => format!(
                " (public products from the cloud bucket {} first, MAST as the fall-back)",
                c.bucket()
            ),
            None => String::new(),
        },
        if pool.has_token() {
            " (with a MAST token)"
        } else {
            ""
        },
        config
            .download
            .max_rate
            .map_or(String::new(), |r| format!(", at most {r} in all")),
        config.download.min_free_space.display().iec()
    );

    let stop_work = CancellationToken::new();
    let mut workers: JoinSet<()> = JoinSet::new();
    let mut last_sweep = Instant::now();
    let mut last_summary = Instant::now();
    let mut received_at_summary = 0u64;
    let started_at = now_ms();
    // The figures `status` shows for a running daemon, written every few seconds.
    let mut last_state: Option<(Instant, u64)> = None;
    loop {
        vitals.downloads_alive();
        if last_state.is_none_or(|(at, _)| at.elapsed() >= STATE_EVERY) {
            let received = vitals.received.load(Ordering::Relaxed);
            let rate = last_state.map_or(0.0, |(at, before)| {
                (received - before) as f64 / at.elapsed().as_secs_f64().max(1e-3)
            });
            let state = DaemonState {
                pid: i64::from(std::process::id()),
                started_at,
                rate,
                updated_at: now_ms(),
            };
            if let Err(e) = store.record_daemon_state(&state).await {
                tracing::warn!("cannot record the daemon's figures for status: {e}");
            }
            last_state = Some((Instant::now(), received));
        }
        // Orphans and jobs made due by the sweep are claimed in the same turn.
        let sweep_every = if pool.exclusive { SWEEP } else { SHARED_SWEEP };
        if last_sweep.elapsed() >= sweep_every {
            last_sweep = Instant::now();
            if let Err(e) = pool.sweep(&store, horizon).await {
                tracing::error!("cannot look for orphaned download jobs: {e}");
            }
        }
        // A full disk: nothing is claimed until room appears or the wait is over.
        let room = &pool.transfer.room;
        if room.is_blocked() {
            let free = crate::fsutil::space_of(&pool.transfer.root).map(|(free, _)| free);
            if room.check(free) == Some(room::Unblocked::RoomAppeared) {
                match store.due_now_waiting(now_ms()).await {
                    Ok(n) => tracing::info!(
                        "room appeared on the download file system: {n} download(s) waiting for it ask again"
                    ),
                    Err(e) => tracing::error!("cannot queue the downloads waiting for room: {e}"),
                }
            }
        }
        // Fill free worker slots with due jobs, claimed together.
        let free = if room.is_blocked() {
            0
        } else {
            pool.config.workers.saturating_sub(workers.len())
        };
        if free > 0 {
            let now = now_ms();
            let lease_until = now + pool.config.lease.as_millis() as i64;
            match store
                .end_and_claim(&pool.transfer.owner, &[], free, now, lease_until)
                .await
            {
                Ok((_, jobs)) => {
                    for job in jobs {
                        let (pool, cancel) = (pool.clone(), stop_work.clone());
                        // A worker goes on with the jobs it claims as it ends each one, and leaves its
                        // slot when there is none.
                        workers.spawn(async move {
                            let mut next = Some(job);
                            while let Some(job) = next {
                                next = pool.clone().work(job, cancel.clone()).await;
                            }
                        });
                    }
                }
                Err(e) => tracing::error!("cannot claim a download job: {e}"),
            }
        }
        if last_summary.elapsed() >= SUMMARY_EVERY {
            let received = vitals.received.load(Ordering::Relaxed);
            let rate =
                (received - received_at_summary) as f64 / last_summary.elapsed().as_secs_f64();
            received_at_summary = received;
            last_summary = Instant::now();
            if let Ok(s) = store.status(0).await {
                let n = |st| s.downloads.get(&st).copied().unwrap_or(0);
                if n(DownloadState::Queued) + n(DownloadState::Running) > 0 || rate > 0.0 {
                    tracing::info!("downloads: {}", crate::status::counts_line(&s, rate));
                }
            }
        }
        // Sleep until a job is queued, a worker ends, a retry comes due, or the sweep. With every slot
        // busy, or with due jobs that cannot be claimed (their product is running), only a worker's end
        // can change anything: asking the store when the next job is due would spin on a past time.
        // The next due time is a stored wall-clock time: never a nap longer than the sweep's.
        let mut nap = if room.is_blocked() {
            ROOM_LOOK
        } else {
            sweep_every
        };
        let idle = workers.len() < pool.config.workers && !room.is_blocked();
        if idle && let Ok(Some(at)) = store.next_due().await {
            let now = now_ms();
            if at > now {
                nap = Duration::from_millis((at - now) as u64).min(sweep_every);
            }
        }
        if idle && !pool.exclusive {
            nap = nap.min(SHARED_LOOK);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            Ok(()) = reload.changed() => {
                let config = reload.borrow_and_update().clone();
                pool.reload_token(&config, &store).await;
                pool.set_rate(&config);
            }
            Some(_) = workers.join_next(), if !workers.is_empty() => {}
            _ = tokio::time::sleep(nap) => {}
        }
    }

    // Stop at a safe point: running transfers flush and keep their .part files, jobs go back to queued.
    stop_work.cancel();
    let running = workers.len();
    if running > 0 {
        tracing::info!("stopping {running} running download(s); their .part files are kept");
    }
    // Within `download.drain_timeout`, with a second left for releasing the leases and the database.
    let drain = config
        .download
        .drain_timeout
        .saturating_sub(Duration::from_secs(1))
        .max(Duration::from_millis(500));
    let draining = Instant::now();
    if tokio::time::timeout(drain, async {
        while workers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "downloads did not stop within {}s; their leases expire and they resume later",
            drain.as_secs_f64()
        );
        workers.abort_all();
        while workers.join_next().await.is_some() {}
    }
    // What was handed over is published and recorded before the leases are given back, in what is
    // left of the same time (and half a second at least).
    let left = drain
        .saturating_sub(draining.elapsed())
        .max(Duration::from_millis(500));
    if tokio::time::timeout(left, pool.publication.flush())
        .await
        .is_err()
    {
        tracing::warn!(
            "finished downloads were not published within {:.1}s; their .part files are published or \
             fetched again on the next run",
            left.as_secs_f64()
        );
    }
    // Whatever did not give its job back (aborted), the pool gives back now: no lease outlives it.
    match store.release_leases(&pool.transfer.owner, now_ms()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("{n} download(s) given back for the next run"),
        Err(e) => {
            tracing::warn!("cannot give back the running downloads: {e}; their leases expire")
        }
    }
    Ok(())
}

impl Pool {
    /// Puts orphaned jobs back to `queued` (returns how many), and makes due now the queued jobs whose
    /// next attempt lies beyond `horizon` (logged: the clock was set back).
    async fn sweep(
        &self,
        store: &Arc<dyn Store>,
        horizon: Duration,
    ) -> Result<u64, crate::store::StoreError> {
        let now = now_ms();
        let me = self.transfer.owner.as_str();
        let lease = self.config.lease;
        let exclusive = self.exclusive;
        let orphaned = |owner: &str, expires: i64| {
            let judged = match holder(owner, me) {
                Holder::Unseen if exclusive && !of_this_process(owner) => Holder::Gone,
                judged => judged,
            };
            lease_orphaned(judged, expires, now, lease)
        };
        let orphans = store.requeue_orphans(now, &orphaned).await?;
        let horizon_ms = i64::try_from(horizon.as_millis()).unwrap_or(i64::MAX);
        let pulled_in = store.due_now_beyond(now, horizon_ms).await?;
        if pulled_in > 0 {
            tracing::warn!(
                "{pulled_in} queued download(s) had their next attempt more than {} ahead, longer than \
                 any delay mastsub sets (was the clock set back?): due now",
                humantime::format_duration(horizon)
            );
        }
        Ok(orphans)
    }

    /// SIGHUP: `download.max_rate` read again.
    fn set_rate(&self, config: &Config) {
        let rate = config.download.max_rate.map(|r| r.0);
        if rate != self.transfer.throttle.rate() {
            self.transfer.throttle.set_rate(rate);
            match config.download.max_rate {
                Some(r) => tracing::info!("download.max_rate is now {r}, for all workers together"),
                None => tracing::info!("download.max_rate removed: downloads are no longer capped"),
            }
        }
    }

    fn has_token(&self) -> bool {
        self.transfer.token.read().is_ok_and(|t| t.is_some())
    }

    /// SIGHUP: reads the token again; a token that appeared queues the jobs waiting for one.
    async fn reload_token(&self, config: &Config, store: &Arc<dyn Store>) {
        let token = match load_token(config) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("{e}; keeping the token read before");
                return;
            }
        };
        let had = self.has_token();
        let has = token.is_some();
        if let Ok(mut slot) = self.transfer.token.write() {
            *slot = token;
        }
        tracing::info!(
            "secrets read again: {}",
            if has {
                "a MAST token is set"
            } else {
                "no MAST token"
            }
        );
        if has && !had {
            match store.requeue_needs_auth(now_ms()).await {
                Ok(n) if n > 0 => {
                    tracing::info!("{n} download(s) waiting for a token queued again")
                }
                Ok(_) => {}
                Err(e) => tracing::error!("cannot queue the jobs waiting for a token: {e}"),
            }
        }
    }

    /// Runs one claimed job to the end of this attempt, renewing its lease meanwhile; returns the job
    /// claimed next, if any.
    async fn work(self: Arc<Self>, job: Job, cancel: CancellationToken) -> Option<Job> {
        let t = &self.transfer;
        let started = Instant::now();
        tracing::info!(
            "downloading {}, attempt {}{}",
            job.about(),
            job.attempt,
            if job.bytes_done > 0 {
                format!(", resuming at byte {}", job.bytes_done)
            } else {
                String::new()
            }
        );
        let renew = async {
            loop {
                tokio::time::sleep(self.config.lease / 3).await;
                match t
                    .store
                    .renew_lease(
                        job.held(),
                        &t.owner,
                        now_ms() + self.config.lease.as_millis() as i64,
                    )
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => return FetchError::LeaseLost,
                    Err(e) => tracing::warn!("cannot renew the lease of {}: {e}", job.about()),
                }
            }
        };
        // A small product costs less than a claim: once the attempt has its small body whole, the worker
        // asks for its next job, so that the claim is ready when the write and check are done. (Any
        // other product asks at its end, so no job sits claimed behind a transfer: `status` never shows
        // more jobs running than workers, but for those moments.)
        let (small, mut small_rx) = tokio::sync::oneshot::channel();
        // The attempt runs as its own task, so that a panic (a bug) ends this job as failed instead of
        // leaving it `running` to be retried into the same panic forever.
        let mut attempt = tokio::spawn({
            let (pool, job, cancel) = (self.clone(), job.clone(), cancel.clone());
            async move { pool.transfer.fetch(&job, &cancel, small).await }
        });
        let mut ahead = None;
        let mut signalled = false;
        let result = {
            tokio::pin!(renew);
            loop {
                tokio::select! {
                    r = &mut attempt => {
                        break r.unwrap_or_else(|e| Err(FetchError::Internal(e.to_string())))
                    }
                    lost = &mut renew => {
                        attempt.abort();
                        break Err(lost);
                    }
                    said = &mut small_rx, if !signalled => {
                        signalled = true;
                        if said.is_ok() && !cancel.is_cancelled() && !self.transfer.room.is_blocked() {
                            ahead = Some(self.publication.claim_later());
                        }
                    }
                }
            }
        };
        let outcome = match result {
            Ok(fetched) => publish::Outcome::Fetched(Box::new(fetched)),
            Err(FetchError::LeaseLost) => {
                tracing::warn!(
                    "{}: another worker took this job over (lease lost); leaving it",
                    job.about()
                );
                // A job claimed ahead is this worker's to run.
                return match ahead {
                    Some(claimed) => claimed.await.ok().flatten(),
                    None => None,
                };
            }
            Err(e) => {
                let now = now_ms();
                let finish = policy::decide(&self.config, &job, &e, now);
                log_failure(&job, &e, &finish, now);
                publish::Outcome::Ended(finish)
            }
        };
        // The end goes to the publisher, and the worker on to its next job without waiting for it.
        self.publication.hand(publish::Hand {
            job,
            outcome,
            started,
        });
        // On shutdown a job claimed ahead stays with the pool's lease, which the pool gives back.
        if cancel.is_cancelled() {
            return None;
        }
        match ahead {
            Some(claimed) => claimed.await.ok().flatten(),
            // A full disk: the pool claims again once room appears.
            None if self.transfer.room.is_blocked() => None,
            None => self.publication.claim().await,
        }
    }
}

pub(crate) fn log_failure(job: &Job, error: &FetchError, finish: &Finish, now: i64) {
    let what = job.about();
    match finish {
        Finish::Retry { .. } if matches!(error, FetchError::Interrupted) => {
            tracing::info!(
                "{what}: stopped for shutdown; the .part file is kept and resumed next time"
            );
        }
        Finish::Retry {
            waiting: Some(reason),
            ..
        } => {
            // Said once when the wait begins, and again only if it is still waiting at debug level.
            if job.waiting_reason.is_none() {
                tracing::warn!("{what}: {reason}");
            } else {
                tracing::debug!("{what}: still {reason}");
            }
        }
        Finish::Retry { at, .. } => {
            let wait = Duration::from_millis((at - now).max(0) as u64);
            let next = chrono::DateTime::from_timestamp_millis(*at)
                .map(|t| t.format("%H:%M:%S UTC").to_string())
                .unwrap_or_default();
            let kind = match error {
                FetchError::Disk { .. } => "disk trouble, waiting for it to clear",
                FetchError::NotFound => "not on MAST yet",
                _ => "will retry",
            };
            tracing::warn!(
                "{what}: attempt {} failed: {error}; {kind}, next try in {} (at {next})",
                job.attempt,
                humantime::format_duration(Duration::from_secs(wait.as_secs()))
            );
        }
        Finish::GiveUp {
            state: DownloadState::NeedsAuth,
            ..
        } => tracing::warn!(
            "{what}: {error}. Set mast.token_file (or MAST_API_TOKEN) to a MAST token and restart, or run \
             `mastsub retry {}` once it is set; a Public event for it also queues it again",
            job.id
        ),
        Finish::GiveUp { error, .. } => {
            tracing::error!(
                "{what}: failed: {error}; `mastsub retry {}` queues it again",
                job.id
            )
        }
        Finish::Done { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_vanished_process_of_this_machine_is_gone_and_this_pool_is_alive() {
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        let here = this_machine().expect("this machine can be told");
        assert_eq!(here.len(), 16);
        let me = owner_name("node-a");
        assert!(me.starts_with("node-a:") && me.ends_with(here), "{me}");
        assert_eq!(holder(&me, &me), Holder::Alive, "this very pool");
        assert_eq!(
            holder(
                &format!("node-a:{}:0000abcd:{here}", std::process::id()),
                &me
            ),
            Holder::Unseen,
            "an earlier pool of this process"
        );
        // Pid 2^22 + 1 is above Linux's pid_max: no such process.
        assert_eq!(
            holder(&format!("node-b:4194305:0000abcd:{here}"), &me),
            Holder::Gone
        );
        // Pid 1 lives, but runs another program: a pid taken by someone else since.
        assert_eq!(
            holder(&format!("node-b:1:0000abcd:{here}"), &me),
            Holder::Gone
        );
        // The same host name on another machine (or boot, or container): its pids are not ours.
        assert_eq!(
            holder(&format!("{host}:4194305:0000abcd:0000000000000000"), &me),
            Holder::Unseen,
            "a process elsewhere is not ours to judge"
        );
        // An owner name from before machines were named: by its lease only, whatever its host.
        assert_eq!(
            holder(&format!("{host}:4194305:0000abcd"), &me),
            Holder::Unseen
        );
        assert_eq!(holder("garbage", &me), Holder::Unseen);
    }

    #[test]
    fn an_owner_name_of_this_process_is_told_from_others_with_or_without_a_machine() {
        let here = this_machine().unwrap_or("unknown");
        let pid = std::process::id();
        assert!(of_this_process(&owner_name("node-a")));
        assert!(of_this_process(&format!("node-a:{pid}:0000abcd:{here}")));
        assert!(of_this_process(&format!(
            "host:with:colons:{pid}:0000abcd:{here}"
        )));
        assert!(
            of_this_process(&format!("node-a:{pid}:0000abcd")),
            "an older name"
        );
        assert!(!of_this_process(&format!(
            "node-a:{pid}:0000abcd:0000000000000000"
        )));
        assert!(!of_this_process(&format!(
            "node-a:{}:0000abcd:{here}",
            pid + 1
        )));
        assert!(!of_this_process("garbage"));
    }

    const LEASE: Duration = Duration::from_secs(60);

    #[test]
    fn a_lease_is_judged_by_its_holder_when_seen_and_by_its_clock_only_out_of_sight() {
        let now = 10_000_000_000;
        let hour = 3_600_000;
        // The clock stepped forward an hour: every lease looks expired. A live holder keeps its jobs.
        assert!(!lease_orphaned(Holder::Alive, now - hour, now, LEASE));
        assert!(lease_orphaned(Holder::Gone, now + 30_000, now, LEASE));
        assert!(
            !lease_orphaned(Holder::Unseen, now + 30_000, now, LEASE),
            "a fresh lease"
        );
        assert!(
            lease_orphaned(Holder::Unseen, now - 1, now, LEASE),
            "run out"
        );
        // The clock set back an hour: the lease of a holder out of sight would look fresh for an hour.
        assert!(lease_orphaned(Holder::Unseen, now + hour, now, LEASE));
    }
}
