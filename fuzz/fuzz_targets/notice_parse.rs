//! The notice parser on arbitrary bytes: it must return (a notice, record errors, or a whole-notice error)
//! and never panic, and what it accepts must be what it claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mastsub::notice::{Limits, parse};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_size: 1 << 20,
        max_nesting: 32,
    };
    if let Ok(parsed) = parse(data, &limits) {
        assert!(parsed.events.len() <= parsed.records);
        for e in &parsed.events {
            // Accepted names can never step out of the download folder.
            for part in [&e.mission, &e.fileset, &e.filename] {
                assert!(!part.is_empty());
                assert!(part != "." && part != "..");
                assert!(!part.contains('/') && !part.contains('\\') && !part.contains('\0'));
            }
            // Canonical dates have one form.
            assert_eq!(e.archived_date.canonical().len(), 27);
        }
    }
});
