//! S3's own integrity data, checked as the bytes pass, in front of the format's verifier: a single-part
//! object's ETag is the MD5 of its bytes (unless it is encrypted with KMS or a customer key, where it is
//! not), and the `x-amz-checksum-*` values S3 gives when asked (`x-amz-checksum-mode: ENABLED`) are the
//! CRC32, CRC32C, CRC64NVME, SHA-1 or SHA-256 of the whole object (base64 of the big-endian value). One
//! whole-object digest proves the bytes are the ones S3 stored, so only one is computed: the cheapest
//! given (a whole-object checksum before the MD5, which costs about 1.7 ns a byte; `bench/RESULTS.md`
//! has the figures). A multipart object's ETag (`"<hex>-<parts>"`) and a composite checksum (`<base64>-<parts>`) are digests
//! of the parts' digests: without the part sizes they cannot be checked, and they are passed over, as aws
//! s3 and rclone do.

use std::fs::File;

use base64::Engine;
use md5::Digest as _;

use super::{Problem, Verified, Verifier};

/// One of S3's additional checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `x-amz-checksum-crc32`.
    Crc32,
    /// `x-amz-checksum-crc32c`.
    Crc32c,
    /// `x-amz-checksum-crc64nvme`.
    Crc64Nvme,
    /// `x-amz-checksum-sha1`.
    Sha1,
    /// `x-amz-checksum-sha256`.
    Sha256,
}

impl Algorithm {
    /// Every algorithm, with its header, the cheapest to compute first.
    pub const ALL: [(Algorithm, &'static str); 5] = [
        (Algorithm::Crc32, "x-amz-checksum-crc32"),
        (Algorithm::Crc32c, "x-amz-checksum-crc32c"),
        (Algorithm::Crc64Nvme, "x-amz-checksum-crc64nvme"),
        (Algorithm::Sha256, "x-amz-checksum-sha256"),
        (Algorithm::Sha1, "x-amz-checksum-sha1"),
    ];

    fn header(self) -> &'static str {
        Algorithm::ALL
            .iter()
            .find(|(a, _)| *a == self)
            .map_or("", |(_, h)| h)
    }

    fn name(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "CRC32",
            Algorithm::Crc32c => "CRC32C",
            Algorithm::Crc64Nvme => "CRC64NVME",
            Algorithm::Sha1 => "SHA-1",
            Algorithm::Sha256 => "SHA-256",
        }
    }
}

/// A running checksum.
enum Running {
    Crc32(crc32fast::Hasher),
    /// crc-fast (SIMD carry-less multiplication): the CRCs cost next to nothing.
    Crc32c(crc_fast::Digest),
    Crc64Nvme(crc_fast::Digest),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl Running {
    fn new(a: Algorithm) -> Running {
        match a {
            Algorithm::Crc32 => Running::Crc32(crc32fast::Hasher::new()),
            Algorithm::Crc32c => {
                Running::Crc32c(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
            }
            Algorithm::Crc64Nvme => {
                Running::Crc64Nvme(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme))
            }
            Algorithm::Sha1 => Running::Sha1(sha1::Sha1::new()),
            Algorithm::Sha256 => Running::Sha256(sha2::Sha256::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Running::Crc32(h) => h.update(bytes),
            Running::Crc32c(h) => h.update(bytes),
            Running::Crc64Nvme(h) => h.update(bytes),
            Running::Sha1(h) => sha1::Digest::update(h, bytes),
            Running::Sha256(h) => sha2::Digest::update(h, bytes),
        }
    }

    /// The value as S3 writes it: the digest's bytes (a CRC big-endian).
    fn finish(self) -> Vec<u8> {
        match self {
            Running::Crc32(h) => h.finalize().to_be_bytes().to_vec(),
            Running::Crc32c(h) => (h.finalize() as u32).to_be_bytes().to_vec(),
            Running::Crc64Nvme(h) => h.finalize().to_be_bytes().to_vec(),
            Running::Sha1(h) => sha1::Digest::finalize(h).to_vec(),
            Running::Sha256(h) => sha2::Digest::finalize(h).to_vec(),
        }
    }
}

/// What S3 says the object's bytes digest to: the one digest that will be checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    /// From a single-part object's ETag, when no whole-object checksum is given.
    md5: Option<[u8; 16]>,
    /// The cheapest whole-object checksum given.
    checksums: Vec<(Algorithm, Vec<u8>)>,
    /// What was given but cannot be checked, for the verification note.
    unchecked: Vec<String>,
}

impl Expected {
    /// From an object's `ETag` (its MD5 when it is 32 hex digits in quotes and `encrypted_with` is not
    /// KMS or a customer key) and the `x-amz-checksum-*` headers given as (name, value): the cheapest
    /// whole-object checksum, else the MD5.
    pub fn from_s3(
        etag: Option<&str>,
        encrypted_with: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Expected {
        let mut e = Expected::default();
        if let Some(tag) = etag {
            let hex = tag.trim().trim_matches('"');
            let mut md5 = [0u8; 16];
            let kms = encrypted_with.is_some_and(|s| s.contains("kms") || s.contains("customer"));
            if hex.len() == 32
                && !tag.starts_with("W/")
                && !kms
                && hex::decode_to_slice(hex, &mut md5).is_ok()
            {
                e.md5 = Some(md5);
            } else if hex.contains('-') {
                e.unchecked.push("multipart ETag".into());
            }
        }
        for (a, header) in Algorithm::ALL {
            let Some((_, value)) = headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(header))
            else {
                continue;
            };
            match base64::engine::general_purpose::STANDARD.decode(value.trim()) {
                Ok(bytes) if !value.contains('-') => e.checksums.push((a, bytes)),
                _ => e.unchecked.push(format!("composite {}", a.name())),
            }
        }
        if !e.checksums.is_empty() {
            e.checksums.truncate(1);
            e.md5 = None;
        }
        e
    }

    /// The whole-object checksum kept, as `header:base64` (what [`Expected::from_s3`] takes back as a
    /// header), to check a later partial answer of the same object, which carries none.
    pub fn checksum_header(&self) -> Option<String> {
        self.checksums.first().map(|(a, value)| {
            format!(
                "{}:{}",
                a.header(),
                base64::engine::general_purpose::STANDARD.encode(value)
            )
        })
    }

    /// Whether anything can be checked.
    pub fn is_empty(&self) -> bool {
        self.md5.is_none() && self.checksums.is_empty()
    }
}

/// `inner` behind the check of `expected`.
pub fn checking(inner: Box<dyn Verifier>, expected: Expected) -> Box<dyn Verifier> {
    if expected.is_empty() && expected.unchecked.is_empty() {
        return inner;
    }
    Box::new(Digests {
        md5: expected.md5.map(|m| (md5::Md5::new(), m)),
        running: expected
            .checksums
            .iter()
            .map(|(a, want)| (*a, Running::new(*a), want.clone()))
            .collect(),
        unchecked: expected.unchecked,
        inner,
    })
}

struct Digests {
    inner: Box<dyn Verifier>,
    md5: Option<(md5::Md5, [u8; 16])>,
    running: Vec<(Algorithm, Running, Vec<u8>)>,
    unchecked: Vec<String>,
}

impl Verifier for Digests {
    fn update(&mut self, bytes: &[u8]) -> Result<(), Problem> {
        if let Some((h, _)) = self.md5.as_mut() {
            h.update(bytes);
        }
        for (_, r, _) in &mut self.running {
            r.update(bytes);
        }
        self.inner.update(bytes)
    }

    fn finish(self: Box<Self>, file: &mut File) -> Result<Verified, Problem> {
        let mut matched = Vec::new();
        if let Some((h, want)) = self.md5 {
            let got: [u8; 16] = h.finalize().into();
            if got != want {
                return Err(Problem::Corrupt(format!(
                    "the bytes' MD5 is {}, but the bucket's ETag says {}: not the object S3 stored",
                    hex::encode(got),
                    hex::encode(want)
                )));
            }
            matched.push("ETag (MD5)".to_string());
        }
        for (a, r, want) in self.running {
            let got = r.finish();
            if got != want {
                let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
                return Err(Problem::Corrupt(format!(
                    "the bytes' {} is {}, but the bucket says {}: not the object S3 stored",
                    a.name(),
                    b64(&got),
                    b64(&want)
                )));
            }
            matched.push(a.name().to_string());
        }
        let mut v = self.inner.finish(file)?;
        if !matched.is_empty() {
            v.by.push_str(&format!("; S3 {} matched", matched.join(" and ")));
        }
        if !self.unchecked.is_empty() {
            v.by.push_str(&format!(
                "; S3 {} not checkable",
                self.unchecked.join(" and ")
            ));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn run(expected: Expected, bytes: &[u8]) -> Result<Verified, Problem> {
        let mut v = checking(super::super::for_product("x.bin"), expected);
        for c in bytes.chunks(7) {
            v.update(c)?;
        }
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        v.finish(&mut f)
    }

    #[test]
    fn an_etag_that_is_the_md5_is_checked() {
        let bytes = b"The quick brown fox jumps over the lazy dog";
        let good = Expected::from_s3(Some("\"9e107d9d372bb6826bd81d3542a419d6\""), None, &[]);
        assert!(
            run(good.clone(), bytes)
                .unwrap()
                .by
                .contains("S3 ETag (MD5) matched")
        );
        let err = run(good, b"The quick brown fox jumps over the lazy cog").unwrap_err();
        assert!(
            err.to_string().contains("9e107d9d372bb6826bd81d3542a419d6"),
            "{err}"
        );
        // KMS: the ETag is not an MD5; multipart: not checkable; weak: not the bytes' at all.
        let kms = Expected::from_s3(
            Some("\"00000000000000000000000000000000\""),
            Some("aws:kms"),
            &[],
        );
        assert!(kms.is_empty());
        let multi = Expected::from_s3(Some("\"0123456789abcdef0123456789abcdef-3\""), None, &[]);
        assert!(multi.is_empty());
        assert!(
            run(multi, bytes)
                .unwrap()
                .by
                .contains("multipart ETag not checkable")
        );
    }

    #[test]
    fn checksums_as_s3_writes_them_are_checked() {
        let bytes = b"123456789";
        // The catalogue's check values, big-endian, base64.
        let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        let crc32 = b64(&0xcbf4_3926u32.to_be_bytes());
        let crc32c = b64(&0xe306_9283u32.to_be_bytes());
        let crc64 = b64(&0xae8b_1486_0a79_9888u64.to_be_bytes());
        let headers = [
            ("x-amz-checksum-crc32", crc32.as_str()),
            ("X-Amz-Checksum-CRC32C", crc32c.as_str()),
            ("x-amz-checksum-crc64nvme", crc64.as_str()),
        ];
        for (given, name) in [(0, "CRC32"), (1, "CRC32C"), (2, "CRC64NVME")] {
            let v = run(Expected::from_s3(None, None, &headers[given..]), bytes).unwrap();
            assert!(v.by.ends_with(&format!("; S3 {name} matched")), "{}", v.by);
            let err = run(
                Expected::from_s3(None, None, &headers[given..]),
                b"123456780",
            )
            .unwrap_err();
            assert!(
                err.to_string().contains(&format!("bytes' {name} is")),
                "{err}"
            );
        }
        // The checksum kept for a later partial answer reads back as the same expectation.
        let kept = Expected::from_s3(None, None, &headers[1..]);
        let header = kept.checksum_header().unwrap();
        assert_eq!(header, format!("x-amz-checksum-crc32c:{crc32c}"));
        let (name, value) = header.split_once(':').unwrap();
        assert_eq!(Expected::from_s3(None, None, &[(name, value)]), kept);
        // With a checksum, the ETag's MD5 (the dearest) is not computed.
        let both = Expected::from_s3(
            Some("\"00000000000000000000000000000000\""),
            None,
            &headers[2..],
        );
        assert!(run(both, bytes).is_ok());
        // SHA-256 of "123456789".
        let sha = b64(&hex::decode(
            "15e2b0d3c33891ebb0f1ef609ec419420c20e320ce94c65fbc8c3312448eb225",
        )
        .unwrap());
        assert!(
            run(
                Expected::from_s3(None, None, &[("x-amz-checksum-sha256", &sha)]),
                bytes
            )
            .is_ok()
        );
        // Composite: passed over, and said.
        let composite = Expected::from_s3(
            None,
            None,
            &[("x-amz-checksum-crc64nvme", "AAAAAAAAAAA=-4")],
        );
        assert!(composite.is_empty());
        assert!(
            run(composite, bytes)
                .unwrap()
                .by
                .contains("composite CRC64NVME not checkable")
        );
    }
}
