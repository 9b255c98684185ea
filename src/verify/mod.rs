//! Content verification: a product is published only when its bytes are proven to be the product, not
//! merely as long as the server said.
//!
//! Each format has a verifier of its own behind one small trait. The bytes are handed over as they pass
//! on their way to the `.part` file (`update`), so a large product is read once; `finish` is called when
//! the body has ended, with the whole file, for the checks that look at it as a whole (a JSON parse, PNG
//! chunks, the end of a JPEG). A verifier knows nothing of HTTP: `download/fetch.rs` calls it.
//!
//! | format | proven |
//! |---|---|
//! | `.fits` | every HDU walked (header cards to `END`, data size from `BITPIX`, `NAXISn`, `PCOUNT`, `GCOUNT`), the file ends after the last HDU's padded data, `NEXTEND` agrees, `CHECKSUM`/`DATASUM` where present |
//! | `.gz` (`.fits.gz`) | every member's CRC32 and size from its trailer (and the FITS walk of what it holds) |
//! | `.json` | it parses |
//! | `.asdf` | the `#ASDF` header, the end of the YAML tree, block headers that fit the file |
//! | `.jpg`, `.jpeg` | SOI at the start, EOI at the end |
//! | `.png` | the signature, every chunk's CRC, `IEND` last |
//! | `.ecsv` | it begins `# %ECSV` and is UTF-8 |
//! | anything | never an HTML page, unless the product is `.html` |
//!
//! Other formats get only the size check, and say so.

mod asdf;
pub mod digest;
mod ecsv;
mod fits;
mod gzip;
pub mod html;
mod image;
mod json;

use std::fs::File;
use std::io::Read;

pub use fits::{Fits, ones_complement_sum};

/// Why the bytes are not the product.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The bytes end before their format says they do: the body was cut.
    #[error("{0}")]
    Short(String),
    /// The bytes are not a valid product of their format: damaged, or something else altogether.
    #[error("{0}")]
    Corrupt(String),
    /// The file could not be read back.
    #[error("{0}")]
    Io(String),
}

impl Problem {
    fn io(e: std::io::Error) -> Problem {
        Problem::Io(format!("cannot read the file back: {e}"))
    }
}

/// What a verified product was proven by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// For people and `list --json`: "FITS: 3 HDUs, structure and CHECKSUM/DATASUM of all 3".
    pub by: String,
    /// The format itself proves where the file ends, so a body sent with no length can be trusted.
    pub proves_end: bool,
    /// False when no verifier knows the format (only the size was checked).
    pub format_known: bool,
}

/// One format's check. `update` takes the product's bytes in order, from the first; `finish` is called
/// once, after the last, with the whole file.
pub trait Verifier: Send {
    /// The next bytes of the product.
    fn update(&mut self, bytes: &[u8]) -> Result<(), Problem>;
    /// The product ended here; `file` holds all of it.
    fn finish(self: Box<Self>, file: &mut File) -> Result<Verified, Problem>;
}

/// How many first bytes are kept to recognise an HTML page.
const SNIFF: usize = 1024;

/// The verifier for a product named `filename`: its format's, behind the HTML check every product gets.
pub fn for_product(filename: &str) -> Box<dyn Verifier> {
    let lower = filename.to_ascii_lowercase();
    let ext = |e: &str| lower.ends_with(e);
    let (inner, html_allowed): (Box<dyn Verifier>, bool) = if ext(".fits") {
        (Box::new(fits::Fits::new()), false)
    } else if ext(".fits.gz") {
        (Box::new(gzip::Gzip::new(Some(fits::Fits::new()))), false)
    } else if ext(".gz") {
        (Box::new(gzip::Gzip::new(None)), false)
    } else if ext(".json") {
        (Box::new(json::Json), false)
    } else if ext(".asdf") {
        (Box::new(asdf::Asdf), false)
    } else if ext(".jpg") || ext(".jpeg") {
        (Box::new(image::Jpeg::default()), false)
    } else if ext(".png") {
        (Box::new(image::Png::default()), false)
    } else if ext(".ecsv") {
        (Box::new(ecsv::Ecsv::default()), false)
    } else if ext(".html") || ext(".htm") {
        (Box::new(SizeOnly::html()), true)
    } else {
        let kind = lower
            .rsplit_once('.')
            .map_or("extension-less".to_string(), |(_, e)| format!(".{e}"));
        (Box::new(SizeOnly::unknown(kind)), false)
    };
    Box::new(Product {
        filename: filename.to_string(),
        inner,
        head: Vec::with_capacity(SNIFF),
        html_allowed,
        sniffed: html_allowed,
    })
}

/// Reads `file` from its start through the verifier for `filename`: the check of a file already on disk.
pub fn check_file(filename: &str, file: &mut File) -> Result<Verified, Problem> {
    use std::io::{Seek, SeekFrom};
    let mut verifier = for_product(filename);
    file.seek(SeekFrom::Start(0)).map_err(Problem::io)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(Problem::io)?;
        if n == 0 {
            break;
        }
        verifier.update(&buf[..n])?;
    }
    verifier.finish(file)
}

/// Every product: the HTML check on its first bytes, then its format's verifier.
struct Product {
    filename: String,
    inner: Box<dyn Verifier>,
    head: Vec<u8>,
    html_allowed: bool,
    sniffed: bool,
}

impl Product {
    /// An HTML page where a product should be, as a problem that says so.
    fn html(&self, size: Option<u64>) -> Option<Problem> {
        if self.html_allowed {
            return None;
        }
        html::sniff(&self.head)
            .map(|page| Problem::Corrupt(page.instead_of(&self.filename, None, size)))
    }
}

impl Verifier for Product {
    fn update(&mut self, bytes: &[u8]) -> Result<(), Problem> {
        if !self.sniffed {
            let take = (SNIFF - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            if self.head.len() == SNIFF {
                self.sniffed = true;
                if let Some(p) = self.html(None) {
                    return Err(p);
                }
            }
        }
        self.inner
            .update(bytes)
            .map_err(|e| self.html(None).unwrap_or(e))
    }

    fn finish(self: Box<Self>, file: &mut File) -> Result<Verified, Problem> {
        let size = file.metadata().ok().map(|m| m.len());
        if let Some(p) = self.html(size) {
            return Err(p);
        }
        self.inner.finish(file)
    }
}

/// A format no verifier knows (or `.html`): only the size is checked, by the caller.
struct SizeOnly {
    by: String,
    format_known: bool,
}

impl SizeOnly {
    fn unknown(kind: String) -> SizeOnly {
        SizeOnly {
            by: format!("size only (no verifier for {kind} files)"),
            format_known: false,
        }
    }

    fn html() -> SizeOnly {
        SizeOnly {
            by: "size only (an HTML product)".to_string(),
            format_known: true,
        }
    }
}

impl Verifier for SizeOnly {
    fn update(&mut self, _: &[u8]) -> Result<(), Problem> {
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut File) -> Result<Verified, Problem> {
        Ok(Verified {
            by: self.by,
            proves_end: false,
            format_known: self.format_known,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn check(name: &str, bytes: &[u8]) -> Result<Verified, Problem> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        check_file(name, &mut f)
    }

    #[test]
    fn an_html_page_is_refused_for_any_product_but_html() {
        let page = b"<!DOCTYPE html>\n<html><head><title>MAST: Service Unavailable</title></head>\
                     <body>try later</body></html>";
        for name in [
            "a.json", "a.asdf", "a.jpg", "a.png", "a.ecsv", "a.fits", "a.dat",
        ] {
            let e = check(name, page).unwrap_err();
            assert!(
                e.to_string().contains("HTML page")
                    && e.to_string().contains("MAST: Service Unavailable")
                    && e.to_string().contains(name),
                "{name}: {e}"
            );
        }
        assert!(check("a.html", page).is_ok());
    }

    #[test]
    fn an_unknown_format_is_checked_for_size_only_and_says_so() {
        let v = check("notes.dat", b"anything").unwrap();
        assert!(!v.format_known && !v.proves_end);
        assert!(v.by.contains(".dat"), "{}", v.by);
    }
}
