//! Mail reading (sender check, JSON attachments, forwarded messages, `.json.gz` and `.zip` attachments) on
//! arbitrary bytes: it must return and never panic, and attachment names must be plain file names. The
//! decompression limit is small, so that a decompression bomb costs little time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mastsub::sources::mail::{Limits, Mail, Sender, header_sender, message_id, read};

const LIMITS: Limits = Limits {
    max_uncompressed: 1024 * 1024,
};

fuzz_target!(|data: &[u8]| {
    let _ = message_id(data);
    for allowed in [vec![], vec!["@stsci.edu".to_string()]] {
        let by_headers = header_sender(data, &allowed);
        if allowed.is_empty() {
            assert!(matches!(by_headers, Sender::Allowed { .. }));
        }
        match read(data, &allowed, &LIMITS) {
            Mail::Notices {
                attachments,
                skipped,
                ..
            } => {
                for a in attachments {
                    assert!(!a.name.is_empty());
                    assert!(!a.name.contains('/') && !a.name.contains('\\'));
                    assert!(!a.name.chars().any(char::is_control));
                }
                assert!(skipped.iter().all(|s| !s.is_empty()));
            }
            Mail::NoNotice { found, .. } => assert!(found.iter().all(|s| !s.is_empty())),
            Mail::Unreadable | Mail::NotAllowed { .. } => {}
        }
    }
});
