//! `[cloud]`: public products from STScI's open-data bucket (any S3-compatible one), MAST as the fall-back,
//! as astroquery's `Observations.enable_cloud_dataset()` does.
//!
//! Which key a product has in the bucket is MAST's to say: its path look-up (`GET
//! {mast.base_url}/api/v0.1/path_lookup/?uri=mast:...&uri=...&use_cloud_path=True`, at most
//! [`LOOKUP_BATCH`] URIs a request, since longer URLs are refused with 414) answers one object keyed by URI,
//! `{"status_code": 200, "path": "/jwst/public/..."}`, or a null path for a product not in the cloud. A
//! worker that needs an answer asks for its own product and for the next queued ones that have none, one
//! look-up at a time for the whole pool, and the answers are kept in the store (`cloud_paths`): a key is
//! kept, a "not in the cloud" is asked again after [`NOT_IN_CLOUD_FOR`] (a product made public is copied
//! to the bucket later).
//!
//! [`Cloud::route`] decides where an attempt goes. The bucket is used for a product its look-up names, of
//! an event type `cloud.event_types` allows, for the first [`BUCKET_ATTEMPTS`] attempts and until the
//! bucket's bytes fail verification once; after that (a bucket down, slow or serving damaged copies) the
//! job goes to MAST, unless `cloud.only`. A look-up that fails sends that attempt to MAST (with
//! `cloud.only`: it is retried like any network failure). `fetch.rs` does the transfer with the same
//! engine as from MAST (verified resume, verification, retries), asks S3 for its checksums
//! (`x-amz-checksum-mode: ENABLED`) and checks them and a single-part object's ETag (its MD5) as the bytes
//! pass; an object the bucket does not have (403 or 404), or holds only in an older copy, sends the
//! attempt to MAST at once. Keys come from MAST, never from a notice, and are used only below
//! `cloud.bucket_url`: a key with `..`, an empty segment or a control character is not used.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::CloudConfig;
use crate::store::{CloudPath, Job, Provenance, Store, now_ms};

use super::error::FetchError;

/// URIs in one path look-up: MAST refuses longer URLs with 414.
pub const LOOKUP_BATCH: usize = 40;
/// How long a "not in the cloud" answer is believed.
pub const NOT_IN_CLOUD_FOR: Duration = Duration::from_secs(3600);
/// Attempts a job makes at the bucket before it goes to MAST (without `cloud.only`; fewer when
/// `download.max_attempts` leaves no attempt for MAST after them).
pub const BUCKET_ATTEMPTS: i64 = 3;
/// After a look-up fails, the pool does not ask again for this long (its attempts go to MAST meanwhile, or
/// under `cloud.only` are retried): a look-up service that hangs would otherwise hold every worker in turn.
const LOOKUP_PAUSE: Duration = Duration::from_secs(30);
/// The error of a product not in the cloud under `cloud.only` (and how the manifest recognises it).
pub const NOT_IN_CLOUD: &str = "Product not found in cloud: MAST's path look-up has no cloud path for it, \
     and cloud.only is set, so it was not fetched from MAST";
/// The largest look-up answer read.
const MAX_ANSWER: usize = 4 * 1024 * 1024;
/// Queued jobs looked at for a batch's other products.
const LOOK_AHEAD: usize = 200;

/// Where one attempt goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// MAST's own URL (the job's).
    Mast,
    /// The bucket's object.
    Cloud {
        /// `{bucket_url}/{key}`, the key's segments percent-encoded.
        url: String,
        /// The key.
        key: String,
        /// The product's `mast:` URI (what the look-up was asked).
        uri: String,
    },
}

impl Route {
    /// Where the bytes of an attempt at `job` along this route come from.
    pub fn origin(&self, job: &Job) -> crate::store::Origin {
        crate::store::Origin {
            source: self.source(),
            url: match self {
                Route::Mast => job.url.clone(),
                Route::Cloud { url, .. } => url.clone(),
            },
        }
    }

    /// MAST or the bucket.
    pub fn source(&self) -> Provenance {
        match self {
            Route::Mast => Provenance::Mast,
            Route::Cloud { .. } => Provenance::Cloud,
        }
    }
}

/// The bucket and MAST's path look-up, shared by the workers.
pub struct Cloud {
    client: reqwest::Client,
    /// `{mast.base_url}/api/v0.1/path_lookup/`.
    lookup_url: String,
    /// `cloud.bucket_url` without its trailing `/`.
    bucket: String,
    config: CloudConfig,
    store: Arc<dyn Store>,
    /// One look-up at a time for the pool: a worker that waited finds its answer recorded.
    looking_up: tokio::sync::Mutex<()>,
    /// Attempts at the bucket before MAST.
    bucket_attempts: i64,
    /// The last look-up failed: until then, with why.
    failing: std::sync::Mutex<Option<(tokio::time::Instant, String)>>,
}

impl Cloud {
    /// The cloud side of a pool on `mast_base` with `config`.
    pub fn new(
        client: reqwest::Client,
        mast_base: &url::Url,
        config: &crate::config::Config,
        store: Arc<dyn Store>,
    ) -> Cloud {
        let max_attempts = i64::from(config.download.max_attempts);
        let config = &config.cloud;
        Cloud {
            client,
            lookup_url: crate::product::UrlBuilder::new(mast_base).path_lookup(),
            bucket: config.bucket_url.trim_end_matches('/').to_string(),
            config: config.clone(),
            store,
            looking_up: tokio::sync::Mutex::new(()),
            // MAST keeps at least one attempt, unless there is only one in all.
            bucket_attempts: BUCKET_ATTEMPTS.min(max_attempts - 1).max(1),
            failing: std::sync::Mutex::new(None),
        }
    }

    /// `cloud.only`.
    pub fn only(&self) -> bool {
        self.config.only
    }

    /// `cloud.bucket_url`, for log lines.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Where this attempt at `job` goes. `Err(NotInCloud)` under `cloud.only` for a product MAST's look-up
    /// says is not in the cloud; a failed look-up is an error only under `cloud.only`.
    pub async fn route(&self, job: &Job) -> Result<Route, FetchError> {
        if !self.config.takes(&job.event_type) {
            return Ok(Route::Mast);
        }
        let bucket_attempts = self.bucket_attempts;
        if !self.config.only && (job.attempt > bucket_attempts || job.verify_failures > 0) {
            // Said at the attempt that changes over: the first after a verification failure of the
            // bucket's copy (the attempts before it went to the bucket), or the first past them.
            let turning = if job.verify_failures > 0 {
                job.verify_failures == 1 && job.attempt <= bucket_attempts + 1
            } else {
                job.attempt == bucket_attempts + 1
            };
            if turning {
                tracing::info!(
                    "{}: from MAST now: {}",
                    job.about(),
                    if job.verify_failures > 0 {
                        "the bucket's copy failed verification".to_string()
                    } else {
                        format!("{bucket_attempts} attempt(s) at the cloud bucket failed")
                    }
                );
            }
            return Ok(Route::Mast);
        }
        let uri = crate::product::mast_uri(&job.mission, &job.filename, &job.url);
        match self.key_of(&uri).await {
            Ok(Some(key)) => match object_url(&self.bucket, &key) {
                Some(url) => Ok(Route::Cloud { url, key, uri }),
                None => {
                    tracing::warn!(
                        "{}: MAST's path look-up gave the key {key:?}, which is not a plain path below \
                         cloud.bucket_url; not using the bucket for it",
                        job.about()
                    );
                    self.not_in_cloud(job)
                }
            },
            Ok(None) => self.not_in_cloud(job),
            Err(e) if self.config.only => Err(FetchError::Transport(format!(
                "MAST's path look-up ({}) failed: {e}",
                self.lookup_url
            ))),
            Err(e) => {
                tracing::warn!(
                    "{}: MAST's path look-up ({}) failed: {e}; from MAST this time",
                    job.about(),
                    self.lookup_url
                );
                Ok(Route::Mast)
            }
        }
    }

    fn not_in_cloud(&self, job: &Job) -> Result<Route, FetchError> {
        if self.config.only {
            return Err(FetchError::NotInCloud);
        }
        tracing::info!(
            "{}: not in the cloud (MAST's path look-up); from MAST",
            job.about()
        );
        Ok(Route::Mast)
    }

    /// The bucket does not have `uri`'s object after all (403 or 404): recorded as not in the cloud, so
    /// that it is not asked for again until the answer is old.
    pub async fn forget(&self, uri: &str) {
        if let Err(e) = self
            .store
            .record_cloud_paths(&[(uri.to_string(), None)], now_ms())
            .await
        {
            tracing::warn!("cannot record that {uri} is not in the cloud bucket: {e}");
        }
    }

    /// What the look-up says of `uri` (asking MAST if the store has no answer young enough).
    async fn key_of(&self, uri: &str) -> Result<Option<String>, String> {
        if let Some(known) = self.known(uri).await? {
            return Ok(known);
        }
        self.still_failing()?;
        let _one_at_a_time = self.looking_up.lock().await;
        // Another worker may have asked while this one waited (or found the look-up failing).
        if let Some(known) = self.known(uri).await? {
            return Ok(known);
        }
        self.still_failing()?;
        let asked = self.ask_with_others(uri).await;
        if let (Err(e), Ok(mut failing)) = (&asked, self.failing.lock()) {
            *failing = Some((tokio::time::Instant::now() + LOOKUP_PAUSE, e.clone()));
        }
        asked
    }

    /// An error while a failed look-up's pause lasts.
    fn still_failing(&self) -> Result<(), String> {
        match self.failing.lock().map(|f| f.clone()) {
            Ok(Some((until, why))) if tokio::time::Instant::now() < until => Err(format!(
                "{why} (not asked again for {}s)",
                LOOKUP_PAUSE.as_secs()
            )),
            _ => Ok(()),
        }
    }

    /// One look-up for `uri` and the next queued products without an answer; the answers are recorded.
    async fn ask_with_others(&self, uri: &str) -> Result<Option<String>, String> {
        let mut uris = vec![uri.to_string()];
        let upcoming = self
            .store
            .upcoming(LOOK_AHEAD)
            .await
            .map_err(|e| e.to_string())?;
        let mut others: Vec<String> = upcoming
            .iter()
            .filter(|u| self.config.takes(&u.event_type))
            .map(|u| crate::product::mast_uri(&u.mission, &u.filename, &u.url))
            .filter(|u| u != uri)
            .collect();
        others.sort();
        others.dedup();
        let known = self
            .store
            .cloud_paths(&others)
            .await
            .map_err(|e| e.to_string())?;
        let now = now_ms();
        uris.extend(
            others
                .into_iter()
                .filter(|u| known.get(u).is_none_or(|p| !fresh(p, now)))
                .take(LOOKUP_BATCH - 1),
        );
        let answers = self.look_up(&uris).await?;
        let mut recorded: Vec<(String, Option<String>)> = answers.into_iter().collect();
        recorded.sort();
        self.store
            .record_cloud_paths(&recorded, now_ms())
            .await
            .map_err(|e| e.to_string())?;
        recorded
            .into_iter()
            .find(|(u, _)| u == uri)
            .map(|(_, key)| key)
            .ok_or_else(|| format!("its answer does not say whether {uri} is in the cloud"))
    }

    /// The store's answer for `uri`, if young enough to believe.
    async fn known(&self, uri: &str) -> Result<Option<Option<String>>, String> {
        let paths = self
            .store
            .cloud_paths(&[uri.to_string()])
            .await
            .map_err(|e| e.to_string())?;
        Ok(paths
            .get(uri)
            .filter(|p| fresh(p, now_ms()))
            .map(|p| p.key.clone()))
    }

    /// One path look-up request for `uris` (at most [`LOOKUP_BATCH`]).
    async fn look_up(&self, uris: &[String]) -> Result<HashMap<String, Option<String>>, String> {
        let mut url = url::Url::parse(&self.lookup_url).map_err(|e| e.to_string())?;
        {
            let mut q = url.query_pairs_mut();
            for uri in uris {
                q.append_pair("uri", uri);
            }
            q.append_pair("use_cloud_path", "True");
        }
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| FetchError::from(e).to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::from(e).to_string())?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_ANSWER {
                return Err(format!("its answer is larger than {MAX_ANSWER} bytes"));
            }
        }
        let answer = parse_answer(&body)?;
        tracing::debug!(
            "MAST's path look-up: {} product(s) asked, {} in the cloud",
            uris.len(),
            answer.values().filter(|k| k.is_some()).count()
        );
        Ok(uris
            .iter()
            .filter_map(|u| answer.get(u).map(|k| (u.clone(), k.clone())))
            .collect())
    }
}

/// `{bucket}/{key}` with each segment percent-encoded; `None` for a key that is not a plain relative path
/// (empty, `.` or `..` segments, control characters, backslashes), which could leave the bucket's path.
fn object_url(bucket: &str, key: &str) -> Option<String> {
    let plain = |s: &str| {
        !s.is_empty() && s != "." && s != ".." && !s.chars().any(|c| c.is_control() || c == '\\')
    };
    if !key.split('/').all(plain) {
        return None;
    }
    let path: Vec<String> = key
        .split('/')
        .map(|s| percent_encoding::utf8_percent_encode(s, crate::product::SEGMENT).to_string())
        .collect();
    Some(format!("{bucket}/{}", path.join("/")))
}

/// A key is believed for good; "not in the cloud" for [`NOT_IN_CLOUD_FOR`].
fn fresh(p: &CloudPath, now: i64) -> bool {
    p.key.is_some()
        || now.saturating_sub(p.looked_up_at)
            < i64::try_from(NOT_IN_CLOUD_FOR.as_millis()).unwrap_or(i64::MAX)
}

/// The look-up's answer: URI → key (`None`: not in the cloud). An entry without a path whose status is
/// neither 404 nor absent (a failure on MAST's side for that URI) says nothing, and is left out.
fn parse_answer(body: &[u8]) -> Result<HashMap<String, Option<String>>, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        status_code: Option<u16>,
        path: Option<String>,
    }
    let map: HashMap<String, Option<Entry>> = serde_json::from_slice(body)
        .map_err(|e| format!("its answer is not the JSON object expected: {e}"))?;
    Ok(map
        .into_iter()
        .filter_map(|(uri, entry)| match entry {
            Some(Entry {
                path: Some(path), ..
            }) => Some((uri, key_of_path(&path))),
            Some(Entry {
                status_code: None | Some(404),
                ..
            })
            | None => Some((uri, None)),
            Some(_) => None,
        })
        .collect())
}

/// The bucket key for a path the look-up gives, as astroquery makes it: the leading `/` goes, and the
/// few collections kept elsewhere in the bucket are moved (GALEX under no `mast/`, Pan-STARRS under
/// `panstarrs/ps1/public/`, HLSPs under `mast/`).
fn key_of_path(path: &str) -> Option<String> {
    let key = if path.contains("galex") {
        path.trim_start_matches('/')
            .trim_start_matches("mast/")
            .to_string()
    } else if path.contains("/ps1/") {
        path.replacen("/ps1/", "panstarrs/ps1/public/", 1)
    } else if path.contains("hlsp") {
        path.replacen("/hlsp_local/public/", "mast/", 1)
            .trim_start_matches('/')
            .to_string()
    } else {
        path.trim_start_matches('/').to_string()
    };
    Some(key).filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_look_up_answer_gives_keys_and_nulls() {
        let body = br#"{
            "mast:JWST/product/a.fits": {"status_code": 200, "path": "/jwst/public/jw01234/a.fits"},
            "mast:JWST/product/b.fits": {"status_code": 404, "path": null},
            "mast:HST/product/c.fits": null,
            "mast:HST/product/d.fits": {"status_code": 500, "path": null}
        }"#;
        let a = parse_answer(body).unwrap();
        assert_eq!(
            a["mast:JWST/product/a.fits"].as_deref(),
            Some("jwst/public/jw01234/a.fits")
        );
        assert_eq!(a["mast:JWST/product/b.fits"], None);
        assert_eq!(a["mast:HST/product/c.fits"], None);
        assert!(
            !a.contains_key("mast:HST/product/d.fits"),
            "a failure is not a no"
        );
        assert!(parse_answer(b"[1, 2]").is_err());
        assert!(parse_answer(b"<html>").is_err());
    }

    #[test]
    fn keys_stay_below_the_bucket() {
        let b = "https://stpubdata.s3.amazonaws.com";
        assert_eq!(
            object_url(b, "jwst/public/jw01234/a b#c?.fits").as_deref(),
            Some("https://stpubdata.s3.amazonaws.com/jwst/public/jw01234/a%20b%23c%3F.fits")
        );
        for bad in [
            "../x",
            "a/../../b",
            "a//b",
            "/a",
            "a/",
            "a\\b",
            "a/\u{7}b",
            "",
            "a/./b",
        ] {
            assert_eq!(object_url(b, bad), None, "{bad:?}");
        }
        let u = url::Url::parse(&object_url(b, "x/@evil.example:80/y").unwrap()).unwrap();
        assert_eq!(u.host_str(), Some("stpubdata.s3.amazonaws.com"));
    }

    #[test]
    fn paths_become_keys_as_astroquery_makes_them() {
        assert_eq!(
            key_of_path("/hst/public/u9o4/u9o40504m/u9o40504m_c3m.fits").as_deref(),
            Some("hst/public/u9o4/u9o40504m/u9o40504m_c3m.fits")
        );
        assert_eq!(
            key_of_path("/ps1/x/y.fits").as_deref(),
            Some("panstarrs/ps1/public/x/y.fits")
        );
        assert_eq!(
            key_of_path("/hlsp_local/public/h/x.fits").as_deref(),
            Some("mast/h/x.fits")
        );
        assert_eq!(
            key_of_path("/mast/galex/x.fits").as_deref(),
            Some("galex/x.fits")
        );
        assert_eq!(key_of_path("/"), None);
    }
}
