//! Mail reading (sender check, JSON attachments, forwarded messages) on arbitrary bytes: it must return and
//! never panic, and attachment names must be plain file names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mastsub::sources::mail::{Mail, message_id, read};

fuzz_target!(|data: &[u8]| {
    let _ = message_id(data);
    for allowed in [vec![], vec!["@stsci.edu".to_string()]] {
        if let Mail::Notices { attachments, .. } = read(data, &allowed) {
            for a in attachments {
                assert!(!a.name.is_empty());
                assert!(!a.name.contains('/') && !a.name.contains('\\'));
                assert!(!a.name.chars().any(char::is_control));
            }
        }
    }
});
