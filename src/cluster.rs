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
use crate::store::{MemberBeat, Store, StoreError, now_ms};

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
    /// Joins the cluster as `node`. The row is this process's unless another process holds it, was heard
    /// from within a lease, and is not certainly dead (a process of this machine that no longer runs). Even
    /// then it is not refused at once: a dead predecessor whose death cannot be told from here (under
    /// systemd's `ProcSubset=pid` the boot id is hidden, so no pid is ever judged) holds its name until it
    /// has been silent for a lease, as it holds its jobs. It is watched: a live member beats within
    /// seconds, and is refused; one that stays silent for a lease is taken over. `exclusive`: this
    /// process is the only one the store allows (SQLite's run lock), so any row under the name is a
    /// predecessor's, taken at once.
    pub async fn join(
        store: Arc<dyn Store>,
        node: String,
        owner: String,
        lease: Duration,
        exclusive: bool,
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
        let gone =
            move |other: &str| exclusive || crate::download::holder_is_gone(other, &me_owner);
        let Some(other) = store
            .join_member(&me, started_at.saturating_sub(lease_ms), &gone)
            .await?
        else {
            return Ok(Arc::new(Membership {
                store,
                node,
                owner,
                lease,
                started_at,
            }));
        };
        tracing::info!(
            "the cluster member name {node:?} is held by pid {} (heard from {:.1}s ago): waiting to see \
             whether it beats (it is refused) or stays silent for download.lease ({}s: taken over)",
            other.pid,
            (started_at - other.last_heartbeat).max(0) as f64 / 1000.0,
            lease.as_secs()
        );
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = now_ms();
            let row = store
                .members(now)
                .await?
                .into_iter()
                .find(|m| m.node == node);
            let Some(row) = row else {
                // Gone meanwhile (left, or deleted): join as if new.
                return Box::pin(Membership::join(store, node, owner, lease, exclusive)).await;
            };
            if row.stopped_at.is_some() {
                return Box::pin(Membership::join(store, node, owner, lease, exclusive)).await;
            }
            if row.last_heartbeat != other.last_heartbeat || row.pid != other.pid {
                return Err(JoinError::Taken {
                    node,
                    pid: row.pid,
                    ago: (now - row.last_heartbeat).max(0) as f64 / 1000.0,
                    lease: lease.as_secs(),
                });
            }
            if now.saturating_sub(row.last_heartbeat) > lease_ms {
                // Silent for a lease: taken over, unless it beat in the meantime (then refused).
                let me = MemberBeat { now, ..me };
                let never = |_: &str| false;
                return match store
                    .join_member(&me, now.saturating_sub(lease_ms), &never)
                    .await?
                {
                    None => {
                        tracing::warn!(
                            "took over the cluster member name {node:?} from pid {}, silent for {:.1}s",
                            other.pid,
                            (now - other.last_heartbeat).max(0) as f64 / 1000.0
                        );
                        Ok(Arc::new(Membership {
                            store,
                            node,
                            owner,
                            lease,
                            started_at,
                        }))
                    }
                    Some(live) => Err(JoinError::Taken {
                        node,
                        pid: live.pid,
                        ago: (now - live.last_heartbeat).max(0) as f64 / 1000.0,
                        lease: lease.as_secs(),
                    }),
                };
            }
        }
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
                        // The lease runs from before the renewal is asked, and the renewal may take no
                        // longer than what is left of two thirds of the lease: the work stops before the
                        // lease can run out under it.
                        let asked = Instant::now();
                        let now = now_ms();
                        let left = (renew * 2).saturating_sub(renewed.elapsed()).max(Duration::from_millis(100));
                        let answer = tokio::time::timeout(
                            left,
                            self.store.lead(role, &self.node, &self.owner, now, now.saturating_add(lease_ms)),
                        )
                        .await;
                        match answer {
                            Ok(Ok(true)) => renewed = asked,
                            Ok(Ok(false)) => break Some("another member holds the lease"),
                            Ok(Err(e)) => tracing::warn!("cannot renew the {role} leader lease: {e}"),
                            Err(_) => tracing::warn!("the {role} leader lease's renewal did not answer in time"),
                        }
                        if renewed.elapsed() >= renew * 2 {
                            break Some("the lease could not be renewed and runs out soon");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn beat(owner: &str, now: i64) -> MemberBeat {
        MemberBeat {
            node: "node-x".into(),
            owner: owner.into(),
            pid: 999_999,
            started_at: now,
            rate: 0.0,
            now,
        }
    }

    async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
        Arc::new(SqliteStore::open(&dir.path().join("m.db")).await.unwrap())
    }

    /// Another machine's owner name: its pid is never judged from here.
    const OTHER: &str = "node-x:999999:1:0123456789abcdef";

    #[tokio::test]
    async fn a_silent_holder_is_taken_over_after_a_lease_and_a_beating_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let never = |_: &str| false;
        let lease = Duration::from_secs(3);
        // A predecessor that died where its death cannot be told (heard from just now, never again).
        store
            .join_member(&beat(OTHER, now_ms()), 0, &never)
            .await
            .unwrap();
        let joined = Membership::join(
            store.clone(),
            "node-x".into(),
            "node-x:1:2:m".into(),
            lease,
            false,
        )
        .await
        .expect("taken over");
        assert_eq!(joined.owner, "node-x:1:2:m");
        assert!(!store.member_beat(&beat(OTHER, now_ms())).await.unwrap());

        // A live one beats meanwhile: refused, named.
        let beating = store.clone();
        let beater = tokio::spawn(async move {
            loop {
                let _ = beating.member_beat(&beat("node-x:1:2:m", now_ms())).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let refused = Membership::join(
            store.clone(),
            "node-x".into(),
            "node-x:3:4:m".into(),
            lease,
            false,
        )
        .await;
        beater.abort();
        match refused {
            Err(JoinError::Taken { node, pid, .. }) => {
                assert_eq!((node.as_str(), pid), ("node-x", 999_999))
            }
            other => panic!(
                "expected a refusal, got {:?}",
                other.map(|m| m.owner.clone())
            ),
        }
    }

    #[tokio::test]
    async fn on_a_store_only_one_process_may_open_the_row_is_taken_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let never = |_: &str| false;
        store
            .join_member(&beat(OTHER, now_ms()), 0, &never)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        Membership::join(
            store.clone(),
            "node-x".into(),
            "node-x:1:2:m".into(),
            Duration::from_secs(60),
            true,
        )
        .await
        .expect("exclusive: taken at once");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
