//! The content verifiers on arbitrary bytes, as a hostile server would send them: each must return and
//! never panic, and its verdict must not depend on how the bytes were split on their way in (the download
//! path feeds them in whatever pieces the network gives). The first byte picks the piece size.
#![no_main]

use std::io::{Seek, Write};

use libfuzzer_sys::fuzz_target;
use mastsub::verify::for_product;

const NAMES: [&str; 9] = [
    "a.fits", "a.fits.gz", "a.gz", "a.json", "a.asdf", "a.jpg", "a.png", "a.ecsv", "a.dat",
];

fn scratch() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("mastsub-fuzz-verify-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("a scratch file");
    let _ = std::fs::remove_file(&path);
    f
}

thread_local! {
    static FILE: std::cell::RefCell<std::fs::File> = std::cell::RefCell::new(scratch());
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, body)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece) * 37 + 1;
    FILE.with(|f| {
        let mut file = f.borrow_mut();
        file.set_len(0).unwrap();
        file.rewind().unwrap();
        file.write_all(body).unwrap();
        for name in NAMES {
            let verdict = |piece: usize, file: &mut std::fs::File| {
                let mut v = for_product(name);
                for p in body.chunks(piece) {
                    if let Err(e) = v.update(p) {
                        return Err(e);
                    }
                }
                v.finish(file)
            };
            let whole = verdict(body.len().max(1), &mut file);
            let split = verdict(piece, &mut file);
            assert_eq!(
                whole.is_ok(),
                split.is_ok(),
                "{name}: whole {whole:?}, in pieces of {piece} {split:?}"
            );
        }
    });
});
