//! The digests S3 gives an object, for the download benchmark's bucket (nginx serving the files with S3's
//! headers): prints `<ETag of a single-part upload> <ETag of an upload in 8 MiB parts> <CRC64NVME>` for the
//! file named, the CRC as S3 writes it (base64 of the big-endian value). Also the one-core speed of the
//! digests the cloud path checks, with `--speed`.
//! Usage: cargo run --release --example s3_digests FILE | --speed

use std::io::Read;
use std::time::Instant;

use base64::Engine;
use md5::Digest;

const PART: usize = 8 << 20;

fn main() {
    let arg = std::env::args().nth(1).expect("a file, or --speed");
    if arg == "--speed" {
        speed();
        return;
    }
    let mut file = std::fs::File::open(&arg).expect("the file opens");
    let mut crc64 = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    let (mut whole, mut parts) = (md5::Md5::new(), Vec::new());
    let mut buf = vec![0u8; PART];
    loop {
        let mut n = 0;
        while n < PART {
            match file.read(&mut buf[n..]).expect("the file reads") {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        crc64.update(&buf[..n]);
        parts.extend_from_slice(&md5::Md5::digest(&buf[..n]));
        if n < PART {
            break;
        }
    }
    println!(
        "\"{}\" \"{}-{}\" {}",
        hex::encode(whole.finalize()),
        hex::encode(md5::Md5::digest(&parts)),
        parts.len() / 16,
        base64::engine::general_purpose::STANDARD.encode(crc64.finalize().to_be_bytes())
    );
}

/// MB/s of each digest over 1 GiB in 64 KiB pieces, as the download path feeds them.
fn speed() {
    let mut data = vec![0u8; 256 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let total = 4 * data.len();
    let run = |name: &str, f: &mut dyn FnMut(&[u8])| {
        let t = Instant::now();
        for _ in 0..4 {
            for piece in data.chunks(64 * 1024) {
                f(piece);
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!("| {name} | {:.0} |", total as f64 / s / 1e6);
    };
    println!("| digest (one core, 64 KiB pieces) | MB/s |");
    println!("|---|---:|");
    let mut m = md5::Md5::new();
    run("MD5 (a single-part object's ETag)", &mut |b| m.update(b));
    let mut c = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    run("CRC64NVME (crc-fast)", &mut |b| c.update(b));
    let mut c32 = crc32fast::Hasher::new();
    run("CRC32 (crc32fast)", &mut |b| c32.update(b));
    let mut c32c = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    run("CRC32C (crc-fast)", &mut |b| c32c.update(b));
    let mut sha = sha2::Sha256::new();
    run("SHA-256", &mut |b| sha2::Digest::update(&mut sha, b));
    std::hint::black_box((
        m.finalize(),
        c.finalize(),
        c32.finalize(),
        c32c.finalize(),
        sha.finalize(),
    ));
}
