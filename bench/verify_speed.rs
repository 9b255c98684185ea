//! Verification speed: a 2 GiB FITS product (one header, 8-bit data with a DATASUM) streamed through
//! mastsub's verifier in 64 KiB pieces, as the download path feeds it, on one core; then the same bytes
//! through a `.fits.gz` verifier (inflate + CRC32 + FITS walk), which is the costlier path.
//! Usage: cargo run --release --example verify_speed [GiB]. Prints one Markdown table row per case.

use std::io::Write;
use std::time::Instant;

use mastsub::verify::{for_product, ones_complement_sum};

const PIECE: usize = 64 * 1024;
const BLOCK: usize = 2880;

fn card(s: &str) -> String {
    format!("{s:<80}")
}

fn main() {
    let gib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    // Data: a 256 MiB random-looking pattern (larger than any cache, so the bytes come from memory),
    // repeated to the size; its DATASUM is the pattern's sum added once per repetition (ones'-complement
    // sums add).
    let mut pattern = vec![0u8; 256 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in pattern.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let reps = gib * 4;
    let data_len = reps * pattern.len() as u64;
    let padded = data_len.div_ceil(BLOCK as u64) * BLOCK as u64;
    let one = ones_complement_sum(0, &pattern);
    let mut datasum = 0u32;
    for _ in 0..reps {
        let s = u64::from(datasum) + u64::from(one);
        datasum = ((s & 0xffff_ffff) + (s >> 32)) as u32;
    }
    let mut header: String = [
        card("SIMPLE  =                    T"),
        card("BITPIX  =                    8"),
        card("NAXIS   =                    1"),
        card(&format!("NAXIS1  = {data_len:>20}")),
        card(&format!("DATASUM = '{datasum}'")),
        card("END"),
    ]
    .concat();
    while !header.len().is_multiple_of(BLOCK) {
        header.push(' ');
    }
    let total = header.len() as u64 + padded;
    let pad = vec![0u8; (padded - data_len) as usize];

    let feed = |v: &mut dyn FnMut(&[u8])| {
        v(header.as_bytes());
        for _ in 0..reps {
            for piece in pattern.chunks(PIECE) {
                v(piece);
            }
        }
        v(&pad);
    };

    println!("| case | bytes | seconds | GB/s (one core) | verdict |");
    println!("|---|---:|---:|---:|---|");
    let mut tmp = tempfile_file();
    let mut verifier = for_product("bench.fits");
    let t = Instant::now();
    feed(&mut |b| {
        verifier
            .update(b)
            .expect("the FITS verifier refused the bytes")
    });
    let verdict = verifier
        .finish(&mut tmp)
        .expect("the FITS verifier refused the file");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "| FITS walk + DATASUM, 64 KiB pieces | {total} | {secs:.3} | {:.2} | {} |",
        total as f64 / secs / 1e9,
        verdict.by
    );

    // The plain ones'-complement sum alone, for reference.
    let t = Instant::now();
    let mut s = 0u32;
    feed(&mut |b| {
        let whole = b.len() / 4 * 4;
        s = ones_complement_sum(s, &b[..whole]);
    });
    let secs = t.elapsed().as_secs_f64();
    println!(
        "| ones'-complement sum alone | {total} | {secs:.3} | {:.2} | sum {s:08x} |",
        total as f64 / secs / 1e9
    );

    // gzip: compress a quarter of the size once (not timed), then verify it.
    let small_reps = (reps / 4).max(1);
    let small_len = small_reps * pattern.len() as u64;
    let small_padded = small_len.div_ceil(BLOCK as u64) * BLOCK as u64;
    let mut small_sum = 0u32;
    for _ in 0..small_reps {
        let s = u64::from(small_sum) + u64::from(one);
        small_sum = ((s & 0xffff_ffff) + (s >> 32)) as u32;
    }
    let mut h2: String = [
        card("SIMPLE  =                    T"),
        card("BITPIX  =                    8"),
        card("NAXIS   =                    1"),
        card(&format!("NAXIS1  = {small_len:>20}")),
        card(&format!("DATASUM = '{small_sum}'")),
        card("END"),
    ]
    .concat();
    while !h2.len().is_multiple_of(BLOCK) {
        h2.push(' ');
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(h2.as_bytes()).unwrap();
    for _ in 0..small_reps {
        gz.write_all(&pattern).unwrap();
    }
    gz.write_all(&vec![0u8; (small_padded - small_len) as usize])
        .unwrap();
    let gz = gz.finish().unwrap();
    let inflated = h2.len() as u64 + small_padded;
    let mut verifier = for_product("bench.fits.gz");
    let t = Instant::now();
    for piece in gz.chunks(PIECE) {
        verifier
            .update(piece)
            .expect("the gzip verifier refused the bytes");
    }
    let verdict = verifier
        .finish(&mut tmp)
        .expect("the gzip verifier refused the file");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "| .fits.gz: inflate + CRC32 + FITS walk + DATASUM | {inflated} inflated ({} compressed) | {secs:.3} | {:.2} (of inflated bytes) | {} |",
        gz.len(),
        inflated as f64 / secs / 1e9,
        verdict.by
    );
}

fn tempfile_file() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("mastsub-verify-bench-{}", std::process::id()));
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
