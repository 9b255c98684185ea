//! `mastsub download`: astroquery's two-line download as one command. The notices go into a store of the
//! download folder's own (`D/.mastsub/`), the daemon's download engine fetches the products (workers,
//! retry, verified resume, fsync + rename), progress shows as bars on a terminal and as lines otherwise,
//! and a manifest like astroquery's ends it: one row per product, COMPLETE, ERROR or SKIPPED, with why.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::categorize::Categorizer;
use crate::config::Config;
use crate::download;
use crate::filters::{Filters, FiltersConfig};
use crate::ingest::Ingestor;
use crate::notice;
use crate::product;
use crate::service::Vitals;
use crate::store::{
    DownloadRow, DownloadState, RunLock, RunLockError, SourceKind, SqliteStore, Store, now_ms,
};

/// A product not in the cloud under `--cloud-only`: astroquery's manifest message.
const CLOUD_SKIPPED: &str = "Product not found in cloud";

/// How often progress is read from the store.
const TICK: Duration = Duration::from_millis(200);

/// What the command line asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Notice files (JSON arrays of MAST events).
    #[arg(required = true, value_name = "NOTICE")]
    pub notices: Vec<PathBuf>,
    /// The download folder: files go to DIR/mastDownload/<mission>/<fileset>/<file>.
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Put the files straight into DIR.
    #[arg(long)]
    pub flat: bool,
    /// `--event-type`, `--mission`, `--program`, `--filename`.
    #[command(flatten)]
    pub filters: FiltersConfig,
    /// Also write the manifest to this file (.csv or .json).
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Print only the manifest.
    #[arg(long, short)]
    pub quiet: bool,
    /// Public products from the cloud bucket (`cloud.bucket_url`, STScI's open-data bucket by default)
    /// first, MAST as the fall-back: astroquery's `enable_cloud_dataset()`.
    #[arg(long)]
    pub cloud: bool,
    /// Only from the cloud bucket, never from MAST (astroquery's `cloud_only`): a product not there is
    /// SKIPPED and the command exits 1.
    #[arg(long)]
    pub cloud_only: bool,
}

/// One manifest row, as astroquery's.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Row {
    /// Where the file is (or would be).
    #[serde(rename = "Local Path")]
    pub local_path: String,
    /// COMPLETE, ERROR or SKIPPED.
    #[serde(rename = "Status")]
    pub status: &'static str,
    /// Why, for ERROR and SKIPPED.
    #[serde(rename = "Message")]
    pub message: String,
    /// Where from.
    #[serde(rename = "URL")]
    pub url: String,
    /// For COMPLETE, what the content was verified by (not one of astroquery's columns; written to
    /// `--manifest` files after them, not printed).
    #[serde(rename = "Verified")]
    pub verified: String,
}

/// Runs the command.
pub async fn run(mut config: Config, args: Args) -> anyhow::Result<ExitCode> {
    // The command line's filters replace the config's, field by field.
    let f = &args.filters;
    for (given, field) in [
        (&f.event_type, &mut config.filters.event_type),
        (&f.mission, &mut config.filters.mission),
        (&f.program, &mut config.filters.program),
        (&f.filename, &mut config.filters.filename),
    ] {
        if !given.is_empty() {
            field.clone_from(given);
        }
    }
    if args.cloud || args.cloud_only {
        config.cloud.enabled = true;
    }
    if args.cloud_only {
        config.cloud.only = true;
    }
    // What the options turned on is checked as the file's settings were.
    if let Err(e) = config.validate() {
        eprintln!("mastsub: {e}");
        return Ok(ExitCode::from(2));
    }
    if let Err(e) = Filters::new(&config.filters) {
        eprintln!("mastsub: {e}");
        return Ok(ExitCode::from(2));
    }
    let state_dir = args.dir.join(".mastsub");
    std::fs::create_dir_all(&state_dir)?;
    // Its own embedded store, whatever the daemon's is (a shared PostgreSQL store included).
    config.storage.database = state_dir.join("mastsub.db");
    config.storage.password_file = None;
    config.storage.downloads = if args.flat {
        args.dir.clone()
    } else {
        args.dir.join("mastDownload")
    };
    // A one-shot run does not wait hours for a product that is not there.
    config.download.not_found_retry = config.download.not_found_retry.min(Duration::from_secs(5));
    config.download.not_found_give_up = config
        .download
        .not_found_give_up
        .min(Duration::from_secs(30));

    // Two downloads into one folder would write the same .part files: one at a time (held to the end).
    let _run_lock = match RunLock::acquire(&config.storage.database, "download") {
        Ok(lock) => lock,
        Err(e @ RunLockError::Held { .. }) => {
            eprintln!(
                "mastsub: {e}: two downloads into {} would write the same files; wait for it to end, or \
                 download into another --dir",
                args.dir.display()
            );
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    };
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.storage.database).await?);
    let wake = Arc::new(Notify::new());
    let ingestor = Ingestor::new(store.clone(), &config)
        .flat(args.flat)
        .waking(wake.clone());

    // Ingest, with the same clear errors as `ingest`; the records of good notices make the manifest.
    // With --flat, a name goes to the first product that takes it, as astroquery keeps the first record of
    // a file name: later records of other products with that name are recorded only, never downloaded.
    let categorizer = ingestor.categorizer();
    let mut names = FlatNames::default();
    if args.flat {
        names = FlatNames::of_jobs(&store.list_downloads(None).await?);
    }
    let mut bad_notice = false;
    let mut events = Vec::new();
    for file in &args.notices {
        let parsed = std::fs::read(file)
            .ok()
            .and_then(|bytes| notice::parse(&bytes, &Default::default()).ok());
        let taken = match &parsed {
            Some(parsed) if args.flat => names.take(&parsed.events, categorizer),
            _ => Vec::new(),
        };
        match ingestor.ingest_file(file, SourceKind::Cli).await {
            Ok(report) if report.is_accepted() => {}
            Ok(report) => {
                bad_notice = true;
                eprintln!("mastsub: {}: {}", file.display(), report.summary());
                for line in report.error_lines() {
                    eprintln!("  {line}");
                }
            }
            Err(e) => {
                bad_notice = true;
                eprintln!("mastsub: {}: {e}", file.display());
                names.give_back(&taken);
                continue;
            }
        }
        if let Some(parsed) = parsed {
            events.extend(parsed.events);
        }
    }

    // The jobs of these events (each product's latest version); finished ones whose file is gone or
    // damaged go again, failed ones too.
    let rows = store.list_downloads(None).await?;
    let latest = latest_jobs(&rows);
    let mut ours: HashSet<i64> = HashSet::new();
    let (mut redo, mut again) = (Vec::new(), Vec::new());
    for e in &events {
        if categorizer.skipped(e).is_some() {
            continue;
        }
        if let Some(r) = latest.get(&(categorizer.local_path(e), product::product_key(e)))
            && ours.insert(r.id)
        {
            match r.state {
                DownloadState::Done
                    if !looks_complete(&config.storage.downloads, &r.local_path, r.bytes_done) =>
                {
                    redo.push(r.id)
                }
                DownloadState::Failed | DownloadState::NeedsAuth => again.push(r.id),
                _ => {}
            }
        }
    }
    if !redo.is_empty() {
        store.redo(&redo, now_ms()).await?;
    }
    if !again.is_empty() {
        store.retry(Some(&again), now_ms()).await?;
    }

    let mut progress = Progress::new(args.quiet);
    progress.baseline(
        &store
            .list_downloads(None)
            .await?
            .into_iter()
            .filter(|r| ours.contains(&r.id))
            .collect::<Vec<_>>(),
    );
    // The engine, until every job of ours has ended (or Ctrl-C).
    let stop = CancellationToken::new();
    let (_reload_tx, reload) = tokio::sync::watch::channel(Arc::new(config.clone()));
    let pool = tokio::spawn({
        let (config, store, stop) = (config.clone(), store.clone(), stop.clone());
        async move {
            download::run(
                &config,
                store,
                wake,
                Arc::new(Vitals::default()),
                reload,
                stop,
            )
            .await
        }
    });
    let interrupted = loop {
        let rows: Vec<DownloadRow> = store
            .list_downloads(None)
            .await?
            .into_iter()
            .filter(|r| ours.contains(&r.id))
            .collect();
        progress.update(&rows);
        if rows
            .iter()
            .all(|r| !matches!(r.state, DownloadState::Queued | DownloadState::Running))
        {
            break false;
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = tokio::signal::ctrl_c() => break true,
        }
    };
    stop.cancel();
    if let Ok(Err(e)) = pool.await {
        eprintln!("mastsub: {e:#}");
    }
    progress.finish();

    let rows = store.list_downloads(None).await?;
    store.close().await;
    let manifest = manifest(&events, categorizer, &rows, &config.storage.downloads);
    print!("{}", render(&manifest));
    if let Some(path) = &args.manifest {
        write_manifest(path, &manifest)?;
    }
    if interrupted {
        eprintln!("mastsub: interrupted; run the same command again to resume");
        return Ok(ExitCode::from(1));
    }
    // Asked for and not delivered: errors, and products not in the cloud under --cloud-only.
    let errors = manifest
        .iter()
        .filter(|r| r.status == "ERROR" || r.message == CLOUD_SKIPPED)
        .count();
    Ok(if errors > 0 || bad_notice {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// A finished file still there, whole: its size as recorded, and its content proven again by its format's
/// verifier (the checks a download passes before it is published), reached without following links.
fn looks_complete(root: &Path, local_path: &str, size: i64) -> bool {
    let rel = Path::new(local_path);
    let (Some(dir), Some(name)) = (rel.parent(), rel.file_name().and_then(|n| n.to_str())) else {
        return false;
    };
    let check = || -> Option<bool> {
        let dir = crate::fsutil::SafeDir::open(root, dir, false).ok()?;
        let mut file = dir.open_read(name).ok()?;
        let len = file.metadata().ok()?.len();
        Some(len == size.max(0) as u64 && crate::verify::check_file(name, &mut file).is_ok())
    };
    size > 0 && check() == Some(true)
}

/// The latest job (highest version, then id) of each local path and product: the one every event of the
/// product is answered by, since a newer version recorded (in the same notice or later) replaces the file
/// an older one fetched.
fn latest_jobs(rows: &[DownloadRow]) -> HashMap<(String, String), &DownloadRow> {
    let mut out: HashMap<(String, String), &DownloadRow> = HashMap::new();
    for r in rows {
        let slot = out
            .entry((r.local_path.clone(), r.product.clone()))
            .or_insert(r);
        if (r.version.as_str(), r.id) > (slot.version.as_str(), slot.id) {
            *slot = r;
        }
    }
    out
}

/// `--flat` file names and the product each belongs to: a job already in the folder's store, else the
/// first record that names it (astroquery's `download_products` keeps the first row of each file name).
#[derive(Debug, Default)]
struct FlatNames {
    /// Name → (product, held by a job of an earlier run rather than by a record of this one).
    holders: HashMap<String, (String, bool)>,
}

impl FlatNames {
    /// The names the jobs of earlier runs hold (bare names: the `--flat` layout), the oldest job first.
    fn of_jobs(rows: &[DownloadRow]) -> FlatNames {
        let mut names = FlatNames::default();
        let mut rows: Vec<&DownloadRow> = rows
            .iter()
            .filter(|r| !r.local_path.contains('/'))
            .collect();
        rows.sort_by_key(|r| r.id);
        for r in rows {
            names
                .holders
                .entry(r.local_path.clone())
                .or_insert_with(|| (r.product.clone(), true));
        }
        names
    }

    /// Takes the names of `events` in order (those the categorizer would download); an event whose name
    /// another product holds is excluded in `categorizer`, with the holder in the reason. Returns the
    /// names newly taken.
    fn take(&mut self, events: &[notice::Event], categorizer: &Categorizer) -> Vec<String> {
        let mut taken = Vec::new();
        for e in events {
            if categorizer.skipped(e).is_some() {
                continue;
            }
            let (name, key) = (categorizer.local_path(e), product::product_key(e));
            match self.holders.get_mut(&name) {
                None => {
                    taken.push(name.clone());
                    self.holders.insert(name, (key, false));
                }
                Some((holder, earlier_run)) if *holder == key => *earlier_run = false,
                Some((holder, true)) => categorizer.exclude(
                    e,
                    format!(
                        "--flat: the name {name} is taken by {holder} (recorded by an earlier run \
                         in this folder)"
                    ),
                ),
                Some((holder, false)) => categorizer.exclude(
                    e,
                    format!(
                        "--flat: the name {name} is taken by {holder} (the first record); \
                         astroquery keeps the first too"
                    ),
                ),
            }
        }
        taken
    }

    /// Gives back names taken by a notice that was not recorded.
    fn give_back(&mut self, names: &[String]) {
        for name in names {
            self.holders.remove(name);
        }
    }
}

/// A path as astroquery prints it (`pathlib`): no `.` components, so the default folder gives
/// `mastDownload/jwst/...`, not `./mastDownload/jwst/...`.
fn shown(path: &Path) -> String {
    let path: PathBuf = path
        .components()
        .filter(|c| *c != Component::CurDir)
        .collect();
    if path.as_os_str().is_empty() {
        ".".to_string()
    } else {
        path.display().to_string()
    }
}

/// The manifest: one row per product of `events`, in notice order. Every event of a product is answered
/// by the product's latest job (New and Reprocessed of one file are one row, of the newest version).
pub fn manifest(
    events: &[notice::Event],
    categorizer: &Categorizer,
    rows: &[DownloadRow],
    root: &Path,
) -> Vec<Row> {
    let jobs = latest_jobs(rows);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<Row> = Vec::new();
    for e in events {
        let rel = categorizer.local_path(e);
        let local_path = shown(&root.join(&rel));
        let key = product::product_key(e);
        let row = match categorizer.skipped(e) {
            Some(why) => Row {
                local_path: local_path.clone(),
                status: "SKIPPED",
                message: why,
                url: categorizer.url(e),
                verified: String::new(),
            },
            None => match jobs.get(&(rel, key.clone())) {
                Some(j) if j.state == DownloadState::Done => Row {
                    local_path: local_path.clone(),
                    status: "COMPLETE",
                    message: String::new(),
                    // Where the bytes came from: MAST, or the cloud bucket.
                    url: j.fetched_from.clone().unwrap_or_else(|| j.url.clone()),
                    verified: j.verified.clone().unwrap_or_default(),
                },
                Some(j)
                    if j.state == DownloadState::Failed
                        && j.last_error
                            .as_deref()
                            .is_some_and(|e| e.starts_with(CLOUD_SKIPPED)) =>
                {
                    Row {
                        local_path: local_path.clone(),
                        status: "SKIPPED",
                        message: CLOUD_SKIPPED.to_string(),
                        url: j.url.clone(),
                        verified: String::new(),
                    }
                }
                Some(j) => Row {
                    local_path: local_path.clone(),
                    status: "ERROR",
                    message: j
                        .last_error
                        .clone()
                        .unwrap_or_else(|| format!("not downloaded ({})", j.state)),
                    url: j.url.clone(),
                    verified: String::new(),
                },
                None => Row {
                    local_path: local_path.clone(),
                    status: "ERROR",
                    // The folder's store recorded these events before, in the other layout.
                    message: match rows.iter().find(|r| r.product == key) {
                        Some(r) => format!(
                            "recorded in this folder for {} (the other layout: with or without \
                             --flat); use the same layout, or another --dir",
                            r.local_path
                        ),
                        None => "no download job was recorded for it".into(),
                    },
                    url: categorizer.url(e),
                    verified: String::new(),
                },
            },
        };
        // One row per product: a later event of the same file (New, then Public) replaces a SKIPPED row.
        // (With --flat, a product whose name another one took has a SKIPPED row of its own.)
        match seen.get(&key) {
            Some(&i) if out[i].status == "SKIPPED" && row.status != "SKIPPED" => out[i] = row,
            Some(_) => {}
            None => {
                seen.insert(key, out.len());
                out.push(row);
            }
        }
    }
    out
}

/// The manifest as a table, astroquery's columns.
pub fn render(rows: &[Row]) -> String {
    let w = |f: fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).chars().count())
            .max()
            .unwrap_or(0)
            .max(title.len())
    };
    let (wp, ws, wm) = (
        w(|r| &r.local_path, "Local Path"),
        w(|r| r.status, "Status"),
        w(|r| &r.message, "Message"),
    );
    let mut out = format!(
        "{:<wp$} {:<ws$} {:<wm$} URL\n{} {} {} ---\n",
        "Local Path",
        "Status",
        "Message",
        "-".repeat(wp),
        "-".repeat(ws),
        "-".repeat(wm)
    );
    for r in rows {
        let message = if r.message.is_empty() {
            "None"
        } else {
            &r.message
        };
        out.push_str(&format!(
            "{:<wp$} {:<ws$} {:<wm$} {}\n",
            r.local_path, r.status, message, r.url
        ));
    }
    out
}

fn write_manifest(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let text = match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("json") => serde_json::to_string_pretty(rows)? + "\n",
        _ => {
            let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
            let mut t = String::from("Local Path,Status,Message,URL,Verified\n");
            for r in rows {
                t.push_str(&format!(
                    "{},{},{},{},{}\n",
                    quote(&r.local_path),
                    r.status,
                    quote(&r.message),
                    quote(&r.url),
                    quote(&r.verified)
                ));
            }
            t
        }
    };
    std::fs::write(path, text)
        .map_err(|e| anyhow::anyhow!("cannot write the manifest {}: {e}", path.display()))
}

/// Bars on a terminal, a line per product start and end otherwise, nothing with `--quiet`.
struct Progress {
    mode: Mode,
    states: HashMap<i64, DownloadState>,
    /// Jobs whose start was printed (a fast one can end between two looks).
    started: HashSet<i64>,
    /// Whether the wait for room on the disk (`download.min_free_space`) has been told since it began.
    told_waiting: bool,
}

enum Mode {
    Quiet,
    Lines,
    Bars {
        multi: MultiProgress,
        total: ProgressBar,
        bars: HashMap<i64, ProgressBar>,
    },
}

impl Progress {
    fn new(quiet: bool) -> Progress {
        let mode = if quiet {
            Mode::Quiet
        } else if std::io::stderr().is_terminal() {
            let multi = MultiProgress::new();
            let total = multi.add(ProgressBar::new(0));
            total.set_style(
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} products {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            total.set_prefix("total");
            Mode::Bars {
                multi,
                total,
                bars: HashMap::new(),
            }
        } else {
            Mode::Lines
        };
        Progress {
            mode,
            states: HashMap::new(),
            started: HashSet::new(),
            told_waiting: false,
        }
    }

    /// What was there before the engine started: ended jobs are not reported as if they ran now.
    fn baseline(&mut self, rows: &[DownloadRow]) {
        for r in rows {
            self.states.insert(r.id, r.state);
            if r.state != DownloadState::Queued {
                self.started.insert(r.id);
            }
        }
    }

    fn update(&mut self, rows: &[DownloadRow]) {
        let ended = |s: DownloadState| {
            matches!(
                s,
                DownloadState::Done | DownloadState::Failed | DownloadState::NeedsAuth
            )
        };
        for r in rows {
            let before = self.states.insert(r.id, r.state);
            let changed = before != Some(r.state);
            match &mut self.mode {
                Mode::Quiet => {}
                Mode::Lines => {
                    let begun = r.state == DownloadState::Running || (changed && ended(r.state));
                    if begun && self.started.insert(r.id) {
                        eprintln!("started  {}", r.local_path);
                    }
                    if changed && r.state == DownloadState::Done {
                        eprintln!(
                            "done     {} ({})",
                            r.local_path,
                            crate::status::human_bytes(r.bytes_done.max(0) as u64)
                        );
                    } else if changed && ended(r.state) {
                        eprintln!(
                            "{:<8} {}: {}",
                            r.state.to_string(),
                            r.local_path,
                            r.last_error.as_deref().unwrap_or("")
                        );
                    }
                }
                Mode::Bars { multi, bars, .. } => {
                    if r.state == DownloadState::Running {
                        let bar = bars.entry(r.id).or_insert_with(|| {
                            let b = multi.add(ProgressBar::new(0));
                            b.set_style(
                                ProgressStyle::with_template(
                                    "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                                )
                                .expect("a valid template")
                                .progress_chars("=> "),
                            );
                            b.set_prefix("");
                            b.set_message(r.filename.clone());
                            b
                        });
                        if let Some(total) = r.bytes_expected {
                            bar.set_length(total.max(0) as u64);
                        }
                        bar.set_position(r.bytes_done.max(0) as u64);
                    } else if let Some(bar) = bars.remove(&r.id) {
                        bar.finish_and_clear();
                        multi.remove(&bar);
                    }
                }
            }
        }
        // A wait for room is no failure and may last: said once when it begins, so that nobody stares at
        // bars that do not move without knowing why.
        let waiting: Vec<&DownloadRow> = rows
            .iter()
            // A job asking again (running for a moment) still waits: told once for the whole wait.
            .filter(|r| {
                matches!(r.state, DownloadState::Queued | DownloadState::Running)
                    && r.waiting_reason.is_some()
            })
            .collect();
        if let Some(w) = waiting.first().filter(|_| !self.told_waiting) {
            let line = format!(
                "waiting  {} download(s) for room on the disk: {}",
                waiting.len(),
                w.waiting_reason.as_deref().unwrap_or("")
            );
            match &self.mode {
                Mode::Quiet => {}
                Mode::Lines => eprintln!("{line}"),
                Mode::Bars { multi, .. } => {
                    let _ = multi.println(&line);
                }
            }
        }
        self.told_waiting = !waiting.is_empty();
        if let Mode::Bars { total, .. } = &self.mode {
            total.set_length(rows.len() as u64);
            total.set_position(rows.iter().filter(|r| ended(r.state)).count() as u64);
            total.set_message(if waiting.is_empty() {
                String::new()
            } else {
                format!("({} waiting for room on the disk)", waiting.len())
            });
        }
    }

    fn finish(&mut self) {
        if let Mode::Bars { total, bars, .. } = &mut self.mode {
            for (_, b) in bars.drain() {
                b.finish_and_clear();
            }
            total.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_product_not_in_the_cloud_is_told_by_its_error() {
        assert!(crate::download::cloud::NOT_IN_CLOUD.starts_with(super::CLOUD_SKIPPED));
    }
}
