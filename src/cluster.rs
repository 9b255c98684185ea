//! This daemon as a member of a cluster: several `mastsub run` sharing one store (PostgreSQL), each a
//! member named by `[cluster] node`. On SQLite the cluster has one member (the run lock sees to that),
//! and the same code runs.
//!
//! - **Membership**: at start the member's row is taken, refused while another live process holds the
//!   name; then a heartbeat every [`beat_every`] (with the rate it receives), which `status` shows.
//! - **Leader leases**: what must be done once for the cluster (reading the IMAP mailbox, sending mail,
//!   running hooks) runs on the member holding that role's lease row, renewed every third of
//!   `download.lease`. A lease row, not a session-level advisory lock: a host that loses power keeps a
//!   session lock until TCP gives up, which can be hours; a lease runs out after `download.lease`. A
//!   leader that cannot renew stops its work before its lease runs out, so that two never overlap for
//!   longer than a renewal's round trip.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::service::Vitals;
use crate::store::{Member, MemberBeat, Store, StoreError, now_ms};

/// How often a standby member asks for a leader lease that may have run out.
const STANDBY_ASK: Duration = Duration::from_secs(1);

/// How often a member's heartbeat is written: a third of the lease, at most 5 s.
pub fn beat_every(lease: Duration) -> Duration {
    (lease / 3).min(Duration::from_secs(5))
}

/// This process as a member.
pub struct Membership {
    store: Arc<dyn Store>,
    /// `[cluster] node`.
    pub node: String,
    /// `node:pid:nonce:machine`.
    pub owner: String,
    lease: Duration,
    started_at: i64,
}

/// Why this process cannot be a member.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Another live process is the member of that name.
    #[error(
        "another mastsub is the cluster member {node:?} (pid {pid}, heard from {ago:.1}s ago): give this \
         one another [cluster] node (each host its own), or stop that one first; a member that died is \
         taken over once it has been silent for download.lease ({lease}s)"
    )]
    Taken {
        /// The name.
        node: String,
        /// Its pid (on its host).
        pid: i64,
        /// Seconds since its last heartbeat.
        ago: f64,
        /// `download.lease` in seconds.
        lease: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Membership {
    /// Joins the cluster as `node`: the row is this process's, unless another process holds it and was
    /// heard from within a lease (and is not certainly dead: a process of this machine that no longer
    /// runs is).
    pub async fn join(
        store: Arc<dyn Store>,
        node: String,
        owner: String,
        lease: Duration,
    ) -> Result<Arc<Membership>, JoinError> {
        let started_at = now_ms();
        let me = MemberBeat {
            node: node.clone(),
            owner: owner.clone(),
            pid: i64::from(std::process::id()),
            started_at,
            rate: 0.0,
            now: started_at,
        };
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let me_owner = owner.clone();
        let gone = move |other: &str| crate::download::holder_is_gone(other, &me_owner);
        if let Some(Member {
            pid,
            last_heartbeat,
            ..
        }) = store
            .join_member(&me, started_at.saturating_sub(lease_ms), &gone)
            .await?
        {
            return Err(JoinError::Taken {
                node,
                pid,
                ago: (started_at - last_heartbeat).max(0) as f64 / 1000.0,
                lease: lease.as_secs(),
            });
        }
        Ok(Arc::new(Membership {
            store,
            node,
            owner,
            lease,
            started_at,
        }))
    }

    /// Heartbeats until `shutdown`; then the member is recorded as stopped and its leases given up. An
    /// error when another process took the name (it judged this one gone: a process paused for longer
    /// than a lease, or two hosts given one `[cluster] node`): this one must stop.
    pub async fn beat(
        self: Arc<Self>,
        vitals: Arc<Vitals>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(beat_every(self.lease));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<(Instant, u64)> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let received = vitals.received.load(Ordering::Relaxed);
            let rate = last.map_or(0.0, |(at, before)| {
                received.saturating_sub(before) as f64 / at.elapsed().as_secs_f64().max(1e-3)
            });
            last = Some((Instant::now(), received));
            let beat = MemberBeat {
                node: self.node.clone(),
                owner: self.owner.clone(),
                pid: i64::from(std::process::id()),
                started_at: self.started_at,
                rate,
                now: now_ms(),
            };
            match self.store.member_beat(&beat).await {
                Ok(true) => {}
                Ok(false) => {
                    anyhow::bail!(
                        "another mastsub process took over the cluster member name {:?} (it judged this \
                         one gone: was this process paused for longer than download.lease, or do two \
                         hosts share one [cluster] node?); stopping",
                        self.node
                    );
                }
                Err(e) => tracing::warn!("cannot record this member's heartbeat: {e}"),
            }
        }
        if let Err(e) = self
            .store
            .leave_member(&self.node, &self.owner, now_ms())
            .await
        {
            tracing::warn!("cannot record that this member stopped: {e}");
        }
        Ok(())
    }

    /// Runs `work` (given a token that stops it) while this member holds the leader lease of `role`,
    /// until `shutdown`: a standby asks every second, a leader renews every third of the lease and stops
    /// the work when it loses the lease, or cannot renew it for two thirds of a lease (before it runs
    /// out and another member may take it).
    pub async fn lead<F, Fut>(
        self: Arc<Self>,
        role: &'static str,
        shutdown: CancellationToken,
        work: F,
    ) where
        F: Fn(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let lease_ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        let renew = self.lease / 3;
        let mut failing_since: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            let now = now_ms();
            match self
                .store
                .lead(
                    role,
                    &self.node,
                    &self.owner,
                    now,
                    now.saturating_add(lease_ms),
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    failing_since = None;
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(STANDBY_ASK) => continue,
                    }
                }
                Err(e) => {
                    if failing_since.is_none() {
                        tracing::warn!("cannot ask for the {role} leader lease: {e}; asking again");
                        failing_since = Some(Instant::now());
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(STANDBY_ASK) => continue,
                    }
                }
            }
            failing_since = None;
            tracing::info!(
                "this member ({}) now leads {role} for the cluster",
                self.node
            );
            let stop = shutdown.child_token();
            let mut running = tokio::spawn(work(stop.clone()));
            let mut renewed = Instant::now();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + renew, renew);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let why = loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break None,
                    _ = &mut running => break Some("its work ended"),
                    _ = tick.tick() => {
                        let now = now_ms();
                        match self.store.lead(role, &self.node, &self.owner, now, now.saturating_add(lease_ms)).await {
                            Ok(true) => renewed = Instant::now(),
                            Ok(false) => break Some("another member holds the lease"),
                            Err(e) => {
                                tracing::warn!("cannot renew the {role} leader lease: {e}");
                                if renewed.elapsed() >= renew * 2 {
                                    break Some("the lease could not be renewed and runs out soon");
                                }
                            }
                        }
                    }
                }
            };
            stop.cancel();
            if !running.is_finished() {
                let _ = running.await;
            }
            if let Some(why) = why {
                tracing::warn!("this member stopped leading {role}: {why}");
            }
            if let Err(e) = self.store.resign(role, &self.owner).await {
                tracing::debug!("cannot give up the {role} leader lease: {e}");
            }
            if why.is_some() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(STANDBY_ASK) => {}
                }
            }
        }
    }
}
