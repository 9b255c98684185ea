//! Images: a JPEG begins with SOI (FF D8 FF) and ends with EOI (FF D9); a PNG has its signature, every
//! chunk with a good CRC, and ends right after `IEND`. Both are checked as the bytes pass.

use std::fs::File;

use super::{Problem, Verified, Verifier};

/// The JPEG checker.
#[derive(Default)]
pub struct Jpeg {
    head: Vec<u8>,
    tail: [u8; 2],
    len: u64,
}

impl Verifier for Jpeg {
    fn update(&mut self, bytes: &[u8]) -> Result<(), Problem> {
        if self.head.len() < 3 {
            let take = (3 - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            if ![0xff, 0xd8, 0xff].starts_with(&self.head) {
                return Err(Problem::Corrupt(
                    "the file does not begin with a JPEG start-of-image marker (FF D8 FF), so it is not JPEG"
                        .into(),
                ));
            }
        }
        for &b in bytes.iter().rev().take(2).rev() {
            self.tail = [self.tail[1], b];
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut File) -> Result<Verified, Problem> {
        if self.len < 5 || self.tail != [0xff, 0xd9] {
            return Err(Problem::Short(
                "the JPEG does not end with its end-of-image marker (FF D9): the file was cut"
                    .into(),
            ));
        }
        Ok(Verified {
            by: "JPEG: start and end markers".to_string(),
            proves_end: true,
            format_known: true,
        })
    }
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

enum PngStage {
    Signature,
    /// Collecting a chunk's length and type.
    Head,
    /// Inside a chunk's data (bytes left), then its CRC.
    Data(u64),
    Crc,
    /// After IEND: nothing may follow.
    End,
}

/// The PNG checker.
pub struct Png {
    stage: PngStage,
    buf: Vec<u8>,
    kind: [u8; 4],
    crc: crc32fast::Hasher,
    chunks: u64,
}

impl Default for Png {
    fn default() -> Self {
        Png {
            stage: PngStage::Signature,
            buf: Vec::with_capacity(8),
            kind: [0; 4],
            crc: crc32fast::Hasher::new(),
            chunks: 0,
        }
    }
}

impl Png {
    /// Collects up to `want` bytes into `buf`; true once it holds them.
    fn collect(&mut self, bytes: &mut &[u8], want: usize) -> bool {
        let take = (want - self.buf.len()).min(bytes.len());
        self.buf.extend_from_slice(&bytes[..take]);
        *bytes = &bytes[take..];
        self.buf.len() == want
    }
}

impl Verifier for Png {
    fn update(&mut self, mut bytes: &[u8]) -> Result<(), Problem> {
        while !bytes.is_empty() {
            match self.stage {
                PngStage::Signature => {
                    let done = self.collect(&mut bytes, 8);
                    if !PNG_SIGNATURE.starts_with(&self.buf) {
                        return Err(Problem::Corrupt(
                            "the file does not begin with the PNG signature, so it is not PNG"
                                .into(),
                        ));
                    }
                    if done {
                        self.buf.clear();
                        self.stage = PngStage::Head;
                    }
                }
                PngStage::Head => {
                    if self.collect(&mut bytes, 8) {
                        let len = u32::from_be_bytes([
                            self.buf[0],
                            self.buf[1],
                            self.buf[2],
                            self.buf[3],
                        ]);
                        if len > 0x7fff_ffff {
                            return Err(Problem::Corrupt(format!(
                                "PNG chunk {} claims {len} bytes, more than PNG allows: the file is damaged",
                                self.chunks + 1
                            )));
                        }
                        self.kind = [self.buf[4], self.buf[5], self.buf[6], self.buf[7]];
                        self.crc = crc32fast::Hasher::new();
                        self.crc.update(&self.kind);
                        self.buf.clear();
                        self.stage = PngStage::Data(u64::from(len));
                    }
                }
                PngStage::Data(left) => {
                    let take = left.min(bytes.len() as u64) as usize;
                    self.crc.update(&bytes[..take]);
                    bytes = &bytes[take..];
                    self.stage = if left == take as u64 {
                        PngStage::Crc
                    } else {
                        PngStage::Data(left - take as u64)
                    };
                }
                PngStage::Crc => {
                    if self.collect(&mut bytes, 4) {
                        let want = u32::from_be_bytes([
                            self.buf[0],
                            self.buf[1],
                            self.buf[2],
                            self.buf[3],
                        ]);
                        let got =
                            std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
                        self.chunks += 1;
                        let kind = String::from_utf8_lossy(&self.kind).to_string();
                        if want != got {
                            return Err(Problem::Corrupt(format!(
                                "PNG chunk {} ({kind}) fails its CRC: the transfer damaged it",
                                self.chunks
                            )));
                        }
                        self.buf.clear();
                        self.stage = if &self.kind == b"IEND" {
                            PngStage::End
                        } else {
                            PngStage::Head
                        };
                    }
                }
                PngStage::End => {
                    return Err(Problem::Corrupt(
                        "bytes follow the PNG's IEND chunk: the file is not the image alone".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut File) -> Result<Verified, Problem> {
        match self.stage {
            PngStage::End => Ok(Verified {
                by: format!("PNG: {} chunks with good CRCs, IEND last", self.chunks),
                proves_end: true,
                format_known: true,
            }),
            _ => Err(Problem::Short(
                "the PNG ends before its IEND chunk: the file was cut".into(),
            )),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid PNG (1x1, grey).
    pub fn png() -> Vec<u8> {
        let mut out = PNG_SIGNATURE.to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            out.extend((data.len() as u32).to_be_bytes());
            let mut h = crc32fast::Hasher::new();
            h.update(kind);
            h.update(data);
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            out.extend(h.finalize().to_be_bytes());
        };
        chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 0, 0, 0, 0]);
        chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01],
        );
        chunk(b"IEND", &[]);
        out
    }

    fn run(v: &mut dyn Verifier, bytes: &[u8], piece: usize) -> Result<(), Problem> {
        bytes.chunks(piece).try_for_each(|p| v.update(p))
    }

    #[test]
    fn png_whole_cut_damaged_and_trailing() {
        let p = png();
        for piece in [1, 5, p.len()] {
            let mut v = Box::<Png>::default();
            run(v.as_mut(), &p, piece).unwrap();
            assert!(v.finish(&mut tempfile::tempfile().unwrap()).is_ok());
        }
        let mut v = Box::<Png>::default();
        run(v.as_mut(), &p[..p.len() - 3], 7).unwrap();
        assert!(matches!(
            v.finish(&mut tempfile::tempfile().unwrap()),
            Err(Problem::Short(_))
        ));
        let mut bad = p.clone();
        bad[40] ^= 4;
        assert!(matches!(
            run(&mut Png::default(), &bad, 9),
            Err(Problem::Corrupt(_))
        ));
        let mut more = p.clone();
        more.push(0);
        assert!(matches!(
            run(&mut Png::default(), &more, 9),
            Err(Problem::Corrupt(_))
        ));
    }

    #[test]
    fn jpeg_markers() {
        let j = [0xff, 0xd8, 0xff, 0xe0, 1, 2, 3, 0xff, 0xd9];
        let mut v = Box::<Jpeg>::default();
        run(v.as_mut(), &j, 1).unwrap();
        assert!(v.finish(&mut tempfile::tempfile().unwrap()).is_ok());
        let mut v = Box::<Jpeg>::default();
        run(v.as_mut(), &j[..7], 3).unwrap();
        assert!(matches!(
            v.finish(&mut tempfile::tempfile().unwrap()),
            Err(Problem::Short(_))
        ));
        assert!(matches!(
            run(&mut Jpeg::default(), b"GIF89a", 3),
            Err(Problem::Corrupt(_))
        ));
    }
}
