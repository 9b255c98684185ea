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

/// Builds product URLs on one base URL; only that base's scheme, host and path prefix are ever used.
#[derive(Debug, Clone)]
pub struct UrlBuilder {
    /// The base without query, fragment or trailing slash: `https://mast.stsci.edu`.
    prefix: String,
}

/// Characters escaped in a path segment: everything but unreserved characters.
pub(crate) const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl UrlBuilder {
    /// A builder on `base_url`.
    pub fn new(base_url: &Url) -> UrlBuilder {
        let mut base = base_url.clone();
        base.set_query(None);
        base.set_fragment(None);
        UrlBuilder {
            prefix: base.as_str().trim_end_matches('/').to_string(),
        }
    }

    /// MAST's path look-up, which says where products are in the cloud bucket (`[cloud]`).
    pub fn path_lookup(&self) -> String {
        format!("{}/api/v0.1/path_lookup/", self.prefix)
    }

    /// The URL of the product on MAST: `retrieve_product` for the missions served by it, else
    /// `Download/file` with the record's own `mast:` URI or one made from mission and file name.
    pub fn url(&self, event: &Event) -> String {
        let mission = event.mission.to_lowercase();
        let query =
            |value: &str| form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>();
        if RETRIEVE_PRODUCT_MISSIONS.contains(&mission.as_str()) {
            format!(
                "{}/search/{}/api/v0.1/retrieve_product?product_name={}",
                self.prefix,
                percent_encoding::utf8_percent_encode(&mission, SEGMENT),
                query(&event.filename)
            )
        } else {
            let uri = match &event.uri {
                Some(uri) => query(uri),
                // MAST spells missions in upper case in its URIs (mast:TESS/product/...).
                None => query(&format!(
                    "mast:{}/product/{}",
                    event.mission.to_uppercase(),
                    event.filename
                )),
            };
            format!("{}/api/v0.1/Download/file?uri={uri}", self.prefix)
        }
    }
}

/// The product's `mast:` URI, for MAST's path look-up: the one its `Download/file` URL carries (the
/// record's own), else `mast:<MISSION>/product/<filename>` as MAST spells it.
pub fn mast_uri(mission: &str, filename: &str, url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "uri")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_else(|| format!("mast:{}/product/{filename}", mission.to_uppercase()))
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
    fn a_products_mast_uri_is_its_urls_or_made_from_mission_and_name() {
        let base = Url::parse("https://mast.stsci.edu").unwrap();
        let b = UrlBuilder::new(&base);
        let jwst = event("jwst", "jw_a b&c.fits");
        assert_eq!(
            mast_uri(&jwst.mission, &jwst.filename, &b.url(&jwst)),
            "mast:JWST/product/jw_a b&c.fits"
        );
        let mut odd = event("TESS", "t.fits");
        odd.uri = Some("mast:TESS/product/other/t.fits".into());
        assert_eq!(
            mast_uri(&odd.mission, &odd.filename, &b.url(&odd)),
            "mast:TESS/product/other/t.fits"
        );
    }

    #[test]
    fn jwst_uses_retrieve_product() {
        let base = Url::parse("https://mast.stsci.edu").unwrap();
        let u = UrlBuilder::new(&base).url(&event("JWST", "jw_a b&c.fits"));
        assert_eq!(
            u.as_str(),
            "https://mast.stsci.edu/search/jwst/api/v0.1/retrieve_product?product_name=jw_a+b%26c.fits"
        );
    }

    #[test]
    fn other_missions_use_download_file_and_keep_base_prefix() {
        let base = Url::parse("http://127.0.0.1:8080/mast/?x=1#f").unwrap();
        let u = UrlBuilder::new(&base).url(&event("TESS", "t.fits"));
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:8080/mast/api/v0.1/Download/file?uri=mast%3ATESS%2Fproduct%2Ft.fits"
        );
        // The path look-up moves with the base, a mirror's prefix kept.
        assert_eq!(
            UrlBuilder::new(&base).path_lookup(),
            "http://127.0.0.1:8080/mast/api/v0.1/path_lookup/"
        );
    }

    #[test]
    fn a_mission_written_in_lower_case_is_upper_case_in_the_uri() {
        let base = Url::parse("https://mast.stsci.edu").unwrap();
        let u = UrlBuilder::new(&base).url(&event("tess", "t.fits"));
        assert!(u.ends_with("uri=mast%3ATESS%2Fproduct%2Ft.fits"), "{u}");
    }

    #[test]
    fn a_hostile_name_stays_on_the_base_host() {
        let base = Url::parse("https://mast.stsci.edu").unwrap();
        for name in ["@evil.example:80#x?y", "a%2F..%2Fb", "x y+z&w=v"] {
            let u = Url::parse(&UrlBuilder::new(&base).url(&event("JWST", name))).unwrap();
            assert_eq!(u.host_str(), Some("mast.stsci.edu"));
            assert_eq!(u.path(), "/search/jwst/api/v0.1/retrieve_product");
            let pairs: Vec<_> = u.query_pairs().collect();
            assert_eq!(
                pairs,
                [("product_name".into(), std::borrow::Cow::Borrowed(name))]
            );
        }
        let mut odd = event("Odd Mission?", "f.fits");
        odd.uri = Some("mast:ODD/product/f.fits".into());
        let u = Url::parse(&UrlBuilder::new(&base).url(&odd)).unwrap();
        assert_eq!(u.query_pairs().next().unwrap().1, "mast:ODD/product/f.fits");
        assert_eq!(
            local_path(&event("JWST", "f.fits")),
            PathBuf::from("jwst/fs1/f.fits")
        );
    }
}
