//! Where a product comes from and where it goes: the MAST URL and the astroquery-compatible local layout.
//!
//! Only the configured `mast.base_url` is ever used as a host: a notice contributes path segments and
//! query values, always percent-encoded, never a scheme or a host.

use std::path::PathBuf;

use url::Url;

use crate::notice::Event;

/// Missions served by the `search/<mission>/api/v0.1/retrieve_product` interface.
pub const RETRIEVE_PRODUCT_MISSIONS: [&str; 5] =
    ["hst", "jwst", "roman", "roman_spectra", "roman_cgi"];

/// The key that names one product whatever its version: `<mission lowercase>/<fileset>/<filename>`.
pub fn product_key(event: &Event) -> String {
    format!(
        "{}/{}/{}",
        event.mission.to_lowercase(),
        event.fileset,
        event.filename
    )
}

/// The product's path relative to `storage.downloads`, as astroquery lays it out.
pub fn local_path(event: &Event) -> PathBuf {
    [
        event.mission.to_lowercase().as_str(),
        &event.fileset,
        &event.filename,
    ]
    .iter()
    .collect()
}

/// The URL of the product on MAST, built on `base_url` only.
pub fn url(base_url: &Url, event: &Event) -> Url {
    let mission = event.mission.to_lowercase();
    let mut url = base_url.clone();
    url.set_query(None);
    url.set_fragment(None);
    {
        // A base URL always has path segments (validated as http/https); keep any prefix it carries.
        let Ok(mut segments) = url.path_segments_mut() else {
            return url;
        };
        segments.pop_if_empty();
        if RETRIEVE_PRODUCT_MISSIONS.contains(&mission.as_str()) {
            segments.extend(["search", &mission, "api", "v0.1", "retrieve_product"]);
        } else {
            segments.extend(["api", "v0.1", "Download", "file"]);
        }
    }
    if RETRIEVE_PRODUCT_MISSIONS.contains(&mission.as_str()) {
        url.query_pairs_mut()
            .append_pair("product_name", &event.filename);
    } else {
        let uri = event
            .uri
            .clone()
            .unwrap_or_else(|| format!("mast:{}/product/{}", event.mission, event.filename));
        url.query_pairs_mut().append_pair("uri", &uri);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notice::{EventType, MastTime};

    fn event(mission: &str, filename: &str) -> Event {
        let t = MastTime::parse("2026-03-30T17:53:13").unwrap();
        Event {
            index: 0,
            event_id: "17a653f9-c2fe-4d71-a3ca-2590123615da".into(),
            mission: mission.into(),
            fileset: "fs1".into(),
            filename: filename.into(),
            program: 1,
            event_type: EventType::New,
            archived_date: t,
            public_release_date: t,
            uri: None,
            raw: "{}".into(),
        }
    }

    #[test]
    fn jwst_uses_retrieve_product() {
        let base = Url::parse("https://mast.stsci.edu").unwrap();
        let u = url(&base, &event("JWST", "jw_a b&c.fits"));
        assert_eq!(
            u.as_str(),
            "https://mast.stsci.edu/search/jwst/api/v0.1/retrieve_product?product_name=jw_a+b%26c.fits"
        );
    }

    #[test]
    fn other_missions_use_download_file_and_keep_base_prefix() {
        let base = Url::parse("http://127.0.0.1:8080/mast/").unwrap();
        let u = url(&base, &event("TESS", "t.fits"));
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:8080/mast/api/v0.1/Download/file?uri=mast%3ATESS%2Fproduct%2Ft.fits"
        );
    }

    #[test]
    fn a_hostile_name_stays_on_the_base_host() {
        let base = Url::parse("https://mast.stsci.edu").unwrap();
        let u = url(&base, &event("JWST", "@evil.example:80#x?y"));
        assert_eq!(u.host_str(), Some("mast.stsci.edu"));
        assert_eq!(
            local_path(&event("JWST", "f.fits")),
            PathBuf::from("jwst/fs1/f.fits")
        );
    }
}
