//! Categorization: what each new event does to the download jobs, under the `[events]` policy.
//!
//! A pure function of the events and of the latest job of each product they name, so the rules are tested
//! without a database and every store backend applies the same plan. The rules:
//! - an event whose type is set to `record` is kept and queues nothing;
//! - no job yet for the product: queue one;
//! - the latest job is `queued`: the event joins it (one download for New + Public of the same file);
//! - `running`: the event joins it, except one of a newer version (later `archived_date`), which queues a
//!   new job: the transfer under way may carry the older bytes (the new job starts once it has ended);
//! - `done`: a newer version (later `archived_date`) queues a new job; the same or an older one is already
//!   on disk;
//! - `needs_auth`: a Public event re-queues it (the data are public now); others join it;
//! - `failed`: any event re-queues it with fresh attempts (the product may have been late on MAST).

use std::collections::HashMap;

use url::Url;

use crate::config::{EventAction, EventsConfig};
use crate::notice::{Event, EventType};
use crate::product;
use crate::store::DownloadState;

/// What one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// It queued a new download job.
    Queued,
    /// It joined a job already queued, running or waiting for a token.
    Joined,
    /// It re-queued a failed or `needs_auth` job.
    Requeued,
    /// That version of the product is already on disk.
    AlreadyDone,
    /// The policy for its type is `record`.
    RecordOnly,
}

impl Disposition {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Queued => "queued",
            Disposition::Joined => "joined",
            Disposition::Requeued => "requeued",
            Disposition::AlreadyDone => "already_done",
            Disposition::RecordOnly => "record_only",
        }
    }
}

/// The latest job of a product, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestJob {
    /// Its id.
    pub id: i64,
    /// Its state.
    pub state: DownloadState,
    /// The canonical `archived_date` of the newest event it serves.
    pub version: String,
}

/// A job to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// `product::product_key`.
    pub product: String,
    /// As given by the first event.
    pub mission: String,
    /// The file set.
    pub fileset: String,
    /// The file.
    pub filename: String,
    /// The program.
    pub program: i64,
    /// The type of the event that queued it.
    pub event_type: EventType,
    /// The canonical archived date it will fetch (at least).
    pub version: String,
    /// Where it is fetched from.
    pub url: String,
    /// Where it goes, relative to `storage.downloads`.
    pub local_path: String,
}

/// A change to an existing job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUpdate {
    /// The job.
    pub id: i64,
    /// Its version after the notice.
    pub version: String,
    /// Set back to `queued` with fresh attempts, because of this event type.
    pub requeue: Option<EventType>,
}

/// Which job an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobRef {
    /// A job that existed before the notice.
    Existing(i64),
    /// `Plan::new_jobs[i]`.
    New(usize),
}

/// What to record for one event.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedEvent<'a> {
    /// The event.
    pub event: &'a Event,
    /// What it did.
    pub disposition: Disposition,
    /// The job it belongs to, if any.
    pub job: Option<JobRef>,
}

/// Everything one notice changes.
#[derive(Debug, Default, PartialEq)]
pub struct Plan<'a> {
    /// Jobs to insert.
    pub new_jobs: Vec<NewJob>,
    /// Existing jobs to change.
    pub updates: Vec<JobUpdate>,
    /// Events to record, in notice order.
    pub events: Vec<PlannedEvent<'a>>,
}

/// The policy and the URL base that categorization needs.
#[derive(Debug, Clone)]
pub struct Categorizer {
    policy: EventsConfig,
    urls: product::UrlBuilder,
    filters: crate::filters::Filters,
    flat: bool,
    /// Events (by `event_id` and product) not downloaded, with why; shared by clones (`exclude`).
    excluded: std::sync::Arc<std::sync::RwLock<HashMap<(String, String), String>>>,
}

/// A product's job while the plan is made: one that existed, or one the plan adds.
#[derive(Debug, Clone)]
struct Current {
    job: JobRef,
    state: DownloadState,
    version: String,
}

impl Categorizer {
    /// Categorizes under `policy`, building URLs on `base_url`.
    pub fn new(policy: EventsConfig, base_url: &Url) -> Categorizer {
        Categorizer {
            policy,
            urls: product::UrlBuilder::new(base_url),
            filters: crate::filters::Filters::default(),
            flat: false,
            excluded: Default::default(),
        }
    }

    /// Records `event` only, for `why` (the one-shot's `--flat` name taken by an earlier record).
    /// Through `&self`, so that it reaches a categorizer already built into an ingestor.
    pub fn exclude(&self, event: &Event, why: String) {
        let key = (event.event_id.clone(), product::product_key(event));
        let mut excluded = self.excluded.write().unwrap_or_else(|e| e.into_inner());
        excluded.insert(key, why);
    }

    /// Events that `filters` refuses are recorded only.
    pub fn filtered(mut self, filters: crate::filters::Filters) -> Categorizer {
        self.filters = filters;
        self
    }

    /// Files go straight into `storage.downloads`, without the `<mission>/<fileset>/` folders.
    pub fn flat(mut self, flat: bool) -> Categorizer {
        self.flat = flat;
        self
    }

    /// Where `event`'s product goes, relative to `storage.downloads`.
    pub fn local_path(&self, event: &Event) -> String {
        if self.flat {
            event.filename.clone()
        } else {
            product::local_path(event).to_string_lossy().into_owned()
        }
    }

    /// The URL `event`'s product is fetched from.
    pub fn url(&self, event: &Event) -> String {
        self.urls.url(event)
    }

    /// Why `event` is not downloaded by policy or filter, if it is not.
    pub fn skipped(&self, event: &Event) -> Option<String> {
        if self.policy.action_for(&event.event_type) == EventAction::Record {
            return Some(format!(
                "recorded only ([events] {} = \"record\"{})",
                crate::config::EventsConfig::key_for(&event.event_type),
                if event.event_type.is_other() {
                    format!(
                        ", for types mastsub does not know such as {:?}",
                        event.event_type.as_str()
                    )
                } else {
                    String::new()
                }
            ));
        }
        self.filters.refuses(event).or_else(|| {
            let excluded = self.excluded.read().unwrap_or_else(|e| e.into_inner());
            (!excluded.is_empty())
                .then(|| excluded.get(&(event.event_id.clone(), product::product_key(event))))
                .flatten()
                .cloned()
        })
    }

    /// Plans the changes for `events` (already free of recorded and repeated event ids), given the latest
    /// job of each product they name.
    pub fn plan<'a>(&self, events: &[&'a Event], latest: &HashMap<String, LatestJob>) -> Plan<'a> {
        let mut plan = Plan::default();
        let mut current: HashMap<String, Current> = HashMap::new();
        let mut updates: HashMap<i64, JobUpdate> = HashMap::new();
        let mut update_order: Vec<i64> = Vec::new();

        for &event in events {
            if self.skipped(event).is_some() {
                plan.events.push(PlannedEvent {
                    event,
                    disposition: Disposition::RecordOnly,
                    job: None,
                });
                continue;
            }
            let key = product::product_key(event);
            let version = event.archived_date.canonical();
            let cur = current.get(&key).cloned().or_else(|| {
                latest.get(&key).map(|j| Current {
                    job: JobRef::Existing(j.id),
                    state: j.state,
                    version: j.version.clone(),
                })
            });
            let newer = |cur: &Current| version > cur.version.as_str();
            let (disposition, next) = match cur {
                None => (Disposition::Queued, None),
                Some(c) => match c.state {
                    DownloadState::Queued => (Disposition::Joined, Some(c)),
                    // The transfer under way may carry the older bytes: a newer version waits behind it.
                    DownloadState::Running if newer(&c) => (Disposition::Queued, None),
                    DownloadState::Running => (Disposition::Joined, Some(c)),
                    DownloadState::Done if newer(&c) => (Disposition::Queued, None),
                    DownloadState::Done => (Disposition::AlreadyDone, Some(c)),
                    DownloadState::NeedsAuth if event.event_type == EventType::Public => {
                        (Disposition::Requeued, Some(c))
                    }
                    DownloadState::NeedsAuth => (Disposition::Joined, Some(c)),
                    DownloadState::Failed => (Disposition::Requeued, Some(c)),
                },
            };
            let job = match (disposition, next) {
                (Disposition::Queued, _) => {
                    plan.new_jobs.push(NewJob {
                        product: key.clone(),
                        mission: event.mission.clone(),
                        fileset: event.fileset.clone(),
                        filename: event.filename.clone(),
                        program: event.program,
                        event_type: event.event_type.clone(),
                        version: version.to_string(),
                        url: self.urls.url(event),
                        local_path: self.local_path(event),
                    });
                    let job = JobRef::New(plan.new_jobs.len() - 1);
                    current.insert(
                        key,
                        Current {
                            job,
                            state: DownloadState::Queued,
                            version: version.to_string(),
                        },
                    );
                    job
                }
                (_, Some(mut c)) => {
                    let requeue = disposition == Disposition::Requeued;
                    let raises = version > c.version.as_str();
                    if raises {
                        c.version = version.to_string();
                    }
                    match c.job {
                        JobRef::New(i) => plan.new_jobs[i].version = c.version.clone(),
                        JobRef::Existing(id) if raises || requeue => {
                            let u = updates.entry(id).or_insert_with(|| {
                                update_order.push(id);
                                JobUpdate {
                                    id,
                                    version: c.version.clone(),
                                    requeue: None,
                                }
                            });
                            u.version = c.version.clone();
                            if requeue {
                                u.requeue = Some(event.event_type.clone());
                            }
                        }
                        JobRef::Existing(_) => {}
                    }
                    if requeue {
                        c.state = DownloadState::Queued;
                    }
                    let job = c.job;
                    current.insert(key, c);
                    job
                }
                (_, None) => unreachable!("only Queued comes without a current job"),
            };
            plan.events.push(PlannedEvent {
                event,
                disposition,
                job: Some(job),
            });
        }
        plan.updates = update_order
            .into_iter()
            .filter_map(|id| updates.remove(&id))
            .collect();
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notice::MastTime;

    fn ev(n: u32, file: &str, t: EventType, archived: &str) -> Event {
        Event {
            index: n as usize,
            event_id: format!("00000000-0000-0000-0000-{n:012}"),
            mission: "JWST".into(),
            fileset: "fs".into(),
            filename: file.into(),
            program: 5105,
            event_type: t,
            archived_date: MastTime::parse(archived).unwrap(),
            public_release_date: MastTime::parse(archived).unwrap(),
            uri: None,
            raw: "{}".into(),
        }
    }

    fn cat() -> Categorizer {
        cat_with(EventsConfig::default())
    }

    fn cat_with(policy: EventsConfig) -> Categorizer {
        Categorizer::new(policy, &Url::parse("https://mast.stsci.edu").unwrap())
    }

    fn latest(state: DownloadState, version: &str) -> HashMap<String, LatestJob> {
        HashMap::from([(
            "jwst/fs/a.fits".to_string(),
            LatestJob {
                id: 7,
                state,
                version: MastTime::parse(version).unwrap().canonical().to_string(),
            },
        )])
    }

    fn dispositions(plan: &Plan) -> Vec<Disposition> {
        plan.events.iter().map(|e| e.disposition).collect()
    }

    const D1: &str = "2026-01-01T00:00:00";
    const D2: &str = "2026-02-01T00:00:00";

    #[test]
    fn new_and_public_of_one_file_give_one_download() {
        let (a, b) = (
            ev(1, "a.fits", EventType::New, D1),
            ev(2, "a.fits", EventType::Public, D1),
        );
        let plan = cat().plan(&[&a, &b], &HashMap::new());
        assert_eq!(plan.new_jobs.len(), 1);
        assert_eq!(
            dispositions(&plan),
            [Disposition::Queued, Disposition::Joined]
        );
        assert_eq!(plan.events[1].job, Some(JobRef::New(0)));
    }

    #[test]
    fn new_for_a_done_or_queued_product_queues_nothing() {
        let a = ev(1, "a.fits", EventType::New, D1);
        for state in [
            DownloadState::Done,
            DownloadState::Queued,
            DownloadState::Running,
        ] {
            let plan = cat().plan(&[&a], &latest(state, D1));
            assert!(plan.new_jobs.is_empty(), "{state:?}");
            assert!(plan.updates.is_empty(), "{state:?}");
        }
    }

    #[test]
    fn reprocessed_queues_a_new_version_of_a_done_product() {
        let a = ev(1, "a.fits", EventType::Reprocessed, D2);
        let plan = cat().plan(&[&a], &latest(DownloadState::Done, D1));
        assert_eq!(plan.new_jobs.len(), 1);
        assert_eq!(
            plan.new_jobs[0].version,
            MastTime::parse(D2).unwrap().canonical()
        );
        // The same version again is already on disk.
        let plan = cat().plan(&[&a], &latest(DownloadState::Done, D2));
        assert_eq!(dispositions(&plan), [Disposition::AlreadyDone]);
        assert!(plan.new_jobs.is_empty());
    }

    #[test]
    fn first_and_new_of_one_version_are_one_download_and_unknown_types_are_recorded() {
        let n = ev(1, "a.fits", EventType::New, D1);
        let f = ev(2, "a.fits", EventType::First, D1);
        let plan = cat().plan(&[&n, &f], &HashMap::new());
        assert_eq!(plan.new_jobs.len(), 1);
        assert_eq!(
            dispositions(&plan),
            [Disposition::Queued, Disposition::Joined]
        );

        let o = ev(3, "b.fits", EventType::Other("Retracted".into()), D1);
        let plan = cat().plan(&[&o], &HashMap::new());
        assert_eq!(dispositions(&plan), [Disposition::RecordOnly]);
        let why = cat().skipped(&o).unwrap();
        assert!(
            why.contains("[events] other") && why.contains("Retracted"),
            "{why}"
        );
        let download_others = cat_with(EventsConfig {
            other: crate::config::EventAction::Download,
            ..Default::default()
        });
        let plan = download_others.plan(&[&o], &HashMap::new());
        assert_eq!(dispositions(&plan), [Disposition::Queued]);
    }

    #[test]
    fn a_newer_version_while_running_queues_behind_it() {
        for t in EventType::KNOWN {
            let a = ev(1, "a.fits", t.clone(), D2);
            let plan = cat().plan(&[&a], &latest(DownloadState::Running, D1));
            assert_eq!(dispositions(&plan), [Disposition::Queued], "{t}");
            assert!(
                plan.updates.is_empty(),
                "{t}: the running job's version was changed"
            );
        }
    }

    #[test]
    fn reprocessed_joins_a_queued_job_and_raises_its_version() {
        let a = ev(1, "a.fits", EventType::Reprocessed, D2);
        let plan = cat().plan(&[&a], &latest(DownloadState::Queued, D1));
        assert_eq!(dispositions(&plan), [Disposition::Joined]);
        assert_eq!(
            plan.updates,
            [JobUpdate {
                id: 7,
                version: MastTime::parse(D2).unwrap().canonical().to_string(),
                requeue: None
            }]
        );
    }

    #[test]
    fn public_requeues_needs_auth_and_new_does_not() {
        let p = ev(1, "a.fits", EventType::Public, D1);
        let plan = cat().plan(&[&p], &latest(DownloadState::NeedsAuth, D1));
        assert_eq!(plan.updates[0].requeue, Some(EventType::Public));
        let n = ev(2, "a.fits", EventType::New, D1);
        let plan = cat().plan(&[&n], &latest(DownloadState::NeedsAuth, D1));
        assert_eq!(dispositions(&plan), [Disposition::Joined]);
        assert!(plan.updates.is_empty());
    }

    #[test]
    fn a_failed_product_is_requeued_by_any_event() {
        let n = ev(1, "a.fits", EventType::New, D1);
        let plan = cat().plan(&[&n], &latest(DownloadState::Failed, D1));
        assert_eq!(plan.updates[0].requeue, Some(EventType::New));
        assert_eq!(plan.events[0].job, Some(JobRef::Existing(7)));
    }

    #[test]
    fn record_policy_keeps_the_event_only() {
        let c = cat_with(EventsConfig {
            public: EventAction::Record,
            ..EventsConfig::default()
        });
        let (a, b) = (
            ev(1, "a.fits", EventType::Public, D1),
            ev(2, "b.fits", EventType::New, D1),
        );
        let plan = c.plan(&[&a, &b], &HashMap::new());
        assert_eq!(
            dispositions(&plan),
            [Disposition::RecordOnly, Disposition::Queued]
        );
        assert_eq!(plan.new_jobs.len(), 1);
        assert_eq!(plan.new_jobs[0].filename, "b.fits");
    }
}
