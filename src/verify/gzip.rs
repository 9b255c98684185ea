//! gzip: every member inflated as the bytes pass, and its trailer's CRC32 and size (ISIZE) checked; the
//! inflated bytes of a `.fits.gz` are walked as FITS.
//!
//! Written on flate2's raw `Decompress` rather than its `GzDecoder`, because a verdict needs to tell a
//! stream that was cut (more bytes were due) from one that is damaged, and the decoder reports both as
//! one error.

use std::fs::File;

use flate2::{Decompress, FlushDecompress, Status};

use super::fits::Fits;
use super::{Problem, Verified, Verifier};

/// The fixed part of a member header: ID1 ID2 CM FLG MTIME(4) XFL OS.
const FIXED: usize = 10;
const FEXTRA: u8 = 4;
const FNAME: u8 = 8;
const FCOMMENT: u8 = 16;
const FHCRC: u8 = 2;

enum Stage {
    /// Collecting a member header.
    Header(Vec<u8>),
    /// Inflating.
    Deflate,
    /// Collecting the 8-byte trailer.
    Trailer(Vec<u8>),
    /// After a whole member: the stream may end, or another member begin.
    Between,
}

/// The streaming gzip checker.
pub struct Gzip {
    stage: Stage,
    inflate: Decompress,
    crc: crc32fast::Hasher,
    size: u64,
    out: Vec<u8>,
    members: u64,
    inner: Option<Fits>,
}

impl Gzip {
    /// A checker whose inflated bytes go to `inner` (a `.fits.gz`), if any.
    pub fn new(inner: Option<Fits>) -> Gzip {
        Gzip {
            stage: Stage::Header(Vec::with_capacity(64)),
            inflate: Decompress::new(false),
            crc: crc32fast::Hasher::new(),
            size: 0,
            out: vec![0; 256 * 1024],
            members: 0,
            inner,
        }
    }

    /// The length of a complete member header at the start of `h`, if `h` holds all of it.
    fn header_len(h: &[u8]) -> Result<Option<usize>, Problem> {
        if h.len() >= 2 && h[..2] != [0x1f, 0x8b] {
            return Err(Problem::Corrupt(
                "the file does not begin with the gzip signature (1f 8b), so it is not gzip".into(),
            ));
        }
        if h.len() < FIXED {
            return Ok(None);
        }
        if h[2] != 8 {
            return Err(Problem::Corrupt(format!(
                "the gzip header names compression method {}, not deflate (8)",
                h[2]
            )));
        }
        let flags = h[3];
        let mut at = FIXED;
        if flags & FEXTRA != 0 {
            if h.len() < at + 2 {
                return Ok(None);
            }
            at += 2 + usize::from(u16::from_le_bytes([h[at], h[at + 1]]));
        }
        for flag in [FNAME, FCOMMENT] {
            if flags & flag != 0 {
                match h
                    .get(at..)
                    .and_then(|rest| rest.iter().position(|b| *b == 0))
                {
                    Some(end) => at += end + 1,
                    None => return Ok(None),
                }
            }
        }
        if flags & FHCRC != 0 {
            at += 2;
        }
        Ok((h.len() >= at).then_some(at))
    }

    fn inflated(&mut self, n: usize) -> Result<(), Problem> {
        let bytes = &self.out[..n];
        self.crc.update(bytes);
        self.size += n as u64;
        if let Some(fits) = &mut self.inner {
            fits.update(bytes).map_err(|e| match e {
                Problem::Corrupt(m) => Problem::Corrupt(format!("inside the gzip stream, {m}")),
                other => other,
            })?;
        }
        Ok(())
    }
}

impl Verifier for Gzip {
    fn update(&mut self, mut bytes: &[u8]) -> Result<(), Problem> {
        while !bytes.is_empty() {
            match &mut self.stage {
                Stage::Between => {
                    self.stage = Stage::Header(Vec::with_capacity(64));
                    self.inflate.reset(false);
                    self.crc = crc32fast::Hasher::new();
                    self.size = 0;
                }
                Stage::Header(h) => {
                    let before = h.len();
                    // A header is short; take a little at a time so that no deflate byte is taken.
                    let take = bytes.len().min(64);
                    h.extend_from_slice(&bytes[..take]);
                    match Gzip::header_len(h) {
                        Err(e) if self.members > 0 => {
                            return Err(Problem::Corrupt(format!(
                                "bytes after the end of the gzip stream do not begin another member ({e})"
                            )));
                        }
                        Err(e) => return Err(e),
                        Ok(None) => bytes = &bytes[take..],
                        Ok(Some(len)) => {
                            bytes = &bytes[len - before..];
                            self.stage = Stage::Deflate;
                        }
                    }
                }
                Stage::Deflate => {
                    let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
                    let status = self
                        .inflate
                        .decompress(bytes, &mut self.out, FlushDecompress::None)
                        .map_err(|e| {
                            Problem::Corrupt(format!("the gzip data are damaged ({e})"))
                        })?;
                    let used = (self.inflate.total_in() - in0) as usize;
                    let made = (self.inflate.total_out() - out0) as usize;
                    bytes = &bytes[used..];
                    self.inflated(made)?;
                    if status == Status::StreamEnd {
                        self.stage = Stage::Trailer(Vec::with_capacity(8));
                    } else if used == 0 && made == 0 {
                        return Err(Problem::Corrupt(
                            "the gzip data are damaged (inflating made no progress)".into(),
                        ));
                    }
                }
                Stage::Trailer(t) => {
                    let take = (8 - t.len()).min(bytes.len());
                    t.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if t.len() == 8 {
                        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
                        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
                        let (got_crc, got_size) = (self.crc.clone().finalize(), self.size as u32);
                        if crc != got_crc {
                            return Err(Problem::Corrupt(format!(
                                "the gzip trailer's CRC32 is {crc:08x} but the data inflate to \
                                 {got_crc:08x}: the transfer damaged them"
                            )));
                        }
                        if isize != got_size {
                            return Err(Problem::Corrupt(format!(
                                "the gzip trailer says {isize} bytes (mod 2^32) but the data inflate \
                                 to {got_size}"
                            )));
                        }
                        self.members += 1;
                        self.stage = Stage::Between;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut File) -> Result<Verified, Problem> {
        match self.stage {
            Stage::Between => {}
            Stage::Header(h) if h.is_empty() && self.members > 0 => {}
            Stage::Header(_) if self.members == 0 => {
                return Err(Problem::Short(
                    "the gzip file ends inside its header".into(),
                ));
            }
            _ => {
                return Err(Problem::Short(
                    "the gzip stream ends before its trailer (CRC32 and size): the file was cut"
                        .into(),
                ));
            }
        }
        let members = if self.members == 1 {
            "1 member".to_string()
        } else {
            format!("{} members", self.members)
        };
        let mut by = format!("gzip: CRC32 and size of {members}");
        if let Some(fits) = self.inner {
            let inner = fits.end().map_err(|e| match e {
                Problem::Short(m) => Problem::Corrupt(format!(
                    "the gzip stream is whole but holds a cut FITS file: {m}"
                )),
                other => other,
            })?;
            by = format!("{by}; {}", inner.by);
        }
        Ok(Verified {
            by,
            proves_end: true,
            format_known: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn check(bytes: &[u8], piece: usize) -> Result<Verified, Problem> {
        let mut g = Box::new(Gzip::new(None));
        for p in bytes.chunks(piece) {
            g.update(p)?;
        }
        g.finish(&mut tempfile::tempfile().unwrap())
    }

    #[test]
    fn whole_members_pass_and_cuts_are_short() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut two = gz(&data);
        two.extend(gz(b"second"));
        for piece in [1, 7, 4096, two.len()] {
            assert_eq!(
                check(&two, piece).unwrap().by,
                "gzip: CRC32 and size of 2 members"
            );
        }
        let one = gz(&data);
        for cut in [5, 20, one.len() / 2, one.len() - 4, one.len() - 1] {
            assert!(
                matches!(check(&one[..cut], 999), Err(Problem::Short(_))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_damaged_crc_or_garbage_after_the_end_is_corrupt() {
        let mut one = gz(b"hello hello hello");
        let n = one.len();
        one[n - 8] ^= 1;
        assert!(matches!(check(&one, 100), Err(Problem::Corrupt(m)) if m.contains("CRC32")));
        let mut tail = gz(b"x");
        tail.extend_from_slice(b"junk");
        assert!(matches!(check(&tail, 100), Err(Problem::Corrupt(_))));
        assert!(matches!(
            check(b"not gzip at all", 100),
            Err(Problem::Corrupt(_))
        ));
    }
}
