//! The FITS and gzip verifiers against files written by astropy (tests/fixtures/fits, made by
//! make_fixtures.py), whole, cut at every HDU boundary and inside headers and data, and with one bit
//! flipped; where cfitsio's `fitsverify` is installed (CI installs it; `REQUIRE_FITSVERIFY=1` makes its
//! absence a failure), every verdict is compared with the reference tool's.
//!
//! Where the two differ by design, the test says so: fitsverify accepts a file cut exactly after an HDU
//! whatever NEXTEND says (mastsub refuses it: that is how it catches such a cut), and it reads ASCII-table
//! values (mastsub checks a table's structure and sums, not its numbers).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use mastsub::verify::{Problem, check_file};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fits")
}

#[derive(serde::Deserialize)]
struct Hdu {
    header_start: u64,
    data_start: u64,
    data_end_padded: u64,
}

fn layout() -> BTreeMap<String, Vec<Hdu>> {
    serde_json::from_slice(&std::fs::read(fixtures().join("layout.json")).unwrap()).unwrap()
}

fn verdict(name: &str, bytes: &[u8]) -> Result<String, Problem> {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(bytes).unwrap();
    check_file(name, &mut f).map(|v| v.by)
}

/// fitsverify's verdict: true when it finds neither an error nor a warning (its exit code counts them).
fn fitsverify(bytes: &[u8]) -> Option<bool> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.fits");
    std::fs::write(&path, bytes).unwrap();
    match Command::new("fitsverify").arg("-q").arg(&path).output() {
        Ok(out) => Some(out.status.success()),
        Err(_) if std::env::var_os("REQUIRE_FITSVERIFY").is_some() => {
            panic!("fitsverify is required here (REQUIRE_FITSVERIFY) but cannot be run")
        }
        Err(_) => None,
    }
}

/// Our verdict and fitsverify's agree, unless `differs` says why they may not.
fn agree(name: &str, case: &str, bytes: &[u8], differs: bool) {
    let ours = verdict(name, bytes);
    if let Some(theirs) = fitsverify(bytes)
        && !differs
    {
        assert_eq!(
            ours.is_ok(),
            theirs,
            "{name}, {case}: mastsub says {ours:?}, fitsverify says {}",
            if theirs { "OK" } else { "not OK" }
        );
    }
}

#[test]
fn every_astropy_fixture_verifies_with_what_it_holds() {
    let layout = layout();
    assert!(layout.len() >= 10, "fixtures missing: {:?}", layout.keys());
    for (name, hdus) in &layout {
        let bytes = std::fs::read(fixtures().join(name)).unwrap();
        let by = verdict(name, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let n = hdus.len();
        assert!(
            by.starts_with(&format!("FITS: {n} HDU")),
            "{name}: {by} (astropy wrote {n} HDUs)"
        );
        if name.contains("checksum") || name.contains("continue") {
            assert!(
                by.contains(&format!("CHECKSUM/DATASUM of all {n}")),
                "{name}: {by}"
            );
        } else {
            assert!(by.contains("structure only"), "{name}: {by}");
        }
        agree(name, "whole", &bytes, false);
    }
    let gz = std::fs::read(fixtures().join("images_checksum.fits.gz")).unwrap();
    let by = verdict("images_checksum.fits.gz", &gz).unwrap();
    assert!(
        by.starts_with("gzip: CRC32 and size of 1 member; FITS: 7 HDUs") && by.contains("of all 7"),
        "{by}"
    );
}

#[test]
fn cuts_at_every_hdu_boundary_and_inside_headers_and_data() {
    for (name, hdus) in layout() {
        let bytes = std::fs::read(fixtures().join(&name)).unwrap();
        let len = bytes.len() as u64;
        let nextend = name == "nextend.fits";
        for hdu in &hdus {
            // At a boundary: a valid shorter file, unless NEXTEND says more were due.
            let end = hdu.data_end_padded;
            if end < len {
                let r = verdict(&name, &bytes[..end as usize]);
                if nextend {
                    assert!(
                        matches!(&r, Err(Problem::Short(m)) if m.contains("NEXTEND")),
                        "{name} cut at {end}: {r:?}"
                    );
                } else {
                    assert!(r.is_ok(), "{name} cut at HDU boundary {end}: {r:?}");
                }
                agree(
                    &name,
                    &format!("cut at HDU boundary {end}"),
                    &bytes[..end as usize],
                    nextend,
                );
            }
            let mut cuts = vec![hdu.header_start + 80, hdu.data_start - 1];
            if hdu.data_end_padded > hdu.data_start {
                cuts.push(hdu.data_start + 4);
                cuts.push(hdu.data_end_padded - 1);
                if hdu.data_end_padded - hdu.data_start > 2880 {
                    cuts.push(hdu.data_start + 2880);
                }
            }
            for cut in cuts.into_iter().filter(|c| *c > 0 && *c < len) {
                let r = verdict(&name, &bytes[..cut as usize]);
                assert!(
                    matches!(r, Err(Problem::Short(_))),
                    "{name} cut at {cut}: {r:?}"
                );
                agree(
                    &name,
                    &format!("cut at {cut}"),
                    &bytes[..cut as usize],
                    false,
                );
            }
        }
        // Bytes after the last HDU are not part of the product.
        let mut more = bytes.clone();
        more.extend_from_slice(&[0u8; 2880]);
        assert!(verdict(&name, &more).is_err(), "{name} + a block of zeros");
        agree(&name, "a block of zeros appended", &more, false);
    }
}

#[test]
fn a_flipped_bit_is_caught_exactly_where_checksums_exist() {
    for (name, hdus) in layout() {
        let bytes = std::fs::read(fixtures().join(&name)).unwrap();
        let last = hdus.last().unwrap();
        if last.data_end_padded == last.data_start {
            continue;
        }
        let mut flipped = bytes.clone();
        flipped[last.data_start as usize + 3] ^= 0x10;
        let r = verdict(&name, &flipped);
        let summed = name.contains("checksum") || name.contains("continue");
        if summed {
            assert!(
                matches!(&r, Err(Problem::Corrupt(m)) if m.contains("DATASUM") || m.contains("CHECKSUM")),
                "{name} with a flipped data bit: {r:?}"
            );
        } else {
            assert!(
                r.is_ok(),
                "{name} with a flipped data bit (no sums to catch it): {r:?}"
            );
        }
        // fitsverify parses ASCII-table numbers; mastsub does not.
        agree(
            &name,
            "a flipped data bit",
            &flipped,
            name == "ascii_table.fits",
        );

        // A flipped bit in the last header's EXTNAME or comment: only CHECKSUM can tell.
        let header = &bytes[last.header_start as usize..last.data_start as usize];
        if let Some(card) = header
            .chunks(80)
            .position(|c| c.starts_with(b"EXTNAME ") || c.starts_with(b"BITPIX "))
        {
            let mut flipped = bytes.clone();
            let at = last.header_start as usize + card * 80 + 79;
            flipped[at] = if flipped[at] == b' ' { b'x' } else { b' ' };
            let r = verdict(&name, &flipped);
            assert_eq!(
                r.is_err(),
                summed,
                "{name} with a changed header byte: {r:?}"
            );
            agree(&name, "a changed header byte", &flipped, false);
        }
    }
}

#[test]
fn a_damaged_or_cut_fits_gz_is_refused() {
    let gz = std::fs::read(fixtures().join("images_checksum.fits.gz")).unwrap();
    let name = "images_checksum.fits.gz";
    for cut in [10, gz.len() / 2, gz.len() - 8, gz.len() - 1] {
        let r = verdict(name, &gz[..cut]);
        assert!(matches!(r, Err(Problem::Short(_))), "cut at {cut}: {r:?}");
    }
    let mut crc = gz.clone();
    let n = crc.len();
    crc[n - 6] ^= 1;
    assert!(matches!(verdict(name, &crc), Err(Problem::Corrupt(m)) if m.contains("CRC32")));
}
