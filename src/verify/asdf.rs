//! ASDF: the `#ASDF` header line, the YAML tree up to its document end marker (`...`), then binary blocks
//! whose headers agree with the file's length (each block's magic, header size and allocated size, a
//! streamed block last), and an optional block index. Read back at the end, seeking over block data, so
//! the data are not read twice. Block MD5 checksums are not checked.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};

use super::{Problem, Verified, Verifier};

const BLOCK_MAGIC: &[u8; 4] = b"\xd3BLK";
const BLOCK_INDEX: &[u8] = b"#ASDF BLOCK INDEX";
/// The smallest block header, after the magic and the header-size field.
const MIN_BLOCK_HEADER: u16 = 48;
const STREAMED: u32 = 1;

/// The ASDF checker.
pub struct Asdf;

impl Verifier for Asdf {
    fn update(&mut self, _: &[u8]) -> Result<(), Problem> {
        Ok(())
    }

    fn finish(self: Box<Self>, file: &mut File) -> Result<Verified, Problem> {
        let len = file.metadata().map_err(Problem::io)?.len();
        file.seek(SeekFrom::Start(0)).map_err(Problem::io)?;
        let mut r = BufReader::new(&mut *file);
        let mut line = Vec::new();
        let mut pos = 0u64;
        let next_line = |r: &mut BufReader<&mut File>, line: &mut Vec<u8>| {
            line.clear();
            r.read_until(b'\n', line).map_err(Problem::io)
        };
        pos += next_line(&mut r, &mut line)? as u64;
        if !line.starts_with(b"#ASDF ") {
            return Err(Problem::Corrupt(
                "the file does not begin with \"#ASDF \", so it is not ASDF".into(),
            ));
        }
        let mut tree = false;
        loop {
            let peek = r.fill_buf().map_err(Problem::io)?;
            if peek.is_empty() || peek.starts_with(BLOCK_MAGIC) {
                break;
            }
            let n = next_line(&mut r, &mut line)? as u64;
            pos += n;
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if !tree && text.starts_with(b"#") {
                continue;
            }
            tree = true;
            if text == b"..." {
                break;
            }
            if !line.ends_with(b"\n") {
                return Err(Problem::Short(
                    "the ASDF tree has no end marker (\"...\"): the file was cut".into(),
                ));
            }
        }
        drop(r);
        // Blank or zero padding may sit between the tree and the first block.
        let mut blocks = 0u64;
        let mut skip_padding = true;
        loop {
            if pos == len {
                break;
            }
            file.seek(SeekFrom::Start(pos)).map_err(Problem::io)?;
            let mut head = [0u8; 6];
            let got = read_up_to(file, &mut head)?;
            if head[..got.min(4)] == BLOCK_MAGIC[..got.min(4)] && got < 6 {
                return Err(Problem::Short(format!(
                    "the file ends inside the header of ASDF block {}",
                    blocks + 1
                )));
            }
            if got == 6 && &head[..4] == BLOCK_MAGIC {
                skip_padding = false;
                let size = u16::from_be_bytes([head[4], head[5]]);
                if size < MIN_BLOCK_HEADER {
                    return Err(Problem::Corrupt(format!(
                        "ASDF block {} has a header of {size} bytes, less than the 48 the standard requires",
                        blocks + 1
                    )));
                }
                let mut h = vec![0u8; usize::from(size)];
                if read_up_to(file, &mut h)? < h.len() {
                    return Err(Problem::Short(format!(
                        "the file ends inside the header of ASDF block {}",
                        blocks + 1
                    )));
                }
                blocks += 1;
                let flags = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let allocated = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
                let used = u64::from_be_bytes(h[16..24].try_into().unwrap_or_default());
                if flags & STREAMED != 0 {
                    // A streamed block runs to the end of the file.
                    break;
                }
                if used > allocated {
                    return Err(Problem::Corrupt(format!(
                        "ASDF block {blocks} uses {used} bytes of the {allocated} it allocates: the header is damaged"
                    )));
                }
                let end = (pos + 6 + u64::from(size)).checked_add(allocated);
                match end {
                    Some(end) if end <= len => pos = end,
                    _ => {
                        return Err(Problem::Short(format!(
                            "ASDF block {blocks} allocates {allocated} bytes, but the file ends {} bytes \
                             after its header: the file was cut",
                            len - (pos + 6 + u64::from(size))
                        )));
                    }
                }
                continue;
            }
            file.seek(SeekFrom::Start(pos)).map_err(Problem::io)?;
            let mut index = vec![0u8; BLOCK_INDEX.len()];
            let n = read_up_to(file, &mut index)?;
            if n == index.len() && index == BLOCK_INDEX {
                break;
            }
            if skip_padding && matches!(head[0], b' ' | b'\n' | b'\r' | b'\t' | 0) {
                pos += 1;
                continue;
            }
            return Err(Problem::Corrupt(format!(
                "at byte {pos} the file holds neither an ASDF block nor the block index: the file is damaged"
            )));
        }
        Ok(Verified {
            by: format!("ASDF: header, tree end and {blocks} block header(s) agree with the size"),
            proves_end: false,
            format_known: true,
        })
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> Result<usize, Problem> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]).map_err(Problem::io)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn check(bytes: &[u8]) -> Result<Verified, Problem> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        Box::new(Asdf).finish(&mut f)
    }

    fn block(data: &[u8]) -> Vec<u8> {
        let mut b = BLOCK_MAGIC.to_vec();
        b.extend(48u16.to_be_bytes());
        b.extend(0u32.to_be_bytes());
        b.extend([0u8; 4]);
        b.extend((data.len() as u64).to_be_bytes());
        b.extend((data.len() as u64).to_be_bytes());
        b.extend((data.len() as u64).to_be_bytes());
        b.extend([0u8; 16]);
        b.extend_from_slice(data);
        b
    }

    const TREE: &[u8] =
        b"#ASDF 1.0.0\n#ASDF_STANDARD 1.5.0\n%YAML 1.1\n%TAG ! tag:stsci.edu:asdf/\n\
                          --- !core/asdf-1.1.0\nfoo: 1\n...\n";

    #[test]
    fn tree_blocks_and_index_agree_with_the_size() {
        assert!(check(TREE).is_ok());
        let mut f = TREE.to_vec();
        f.extend(block(&[1; 100]));
        f.extend(block(&[2; 10]));
        let whole = f.len();
        f.extend_from_slice(b"#ASDF BLOCK INDEX\n%YAML 1.1\n---\n- 100\n...\n");
        assert!(check(&f).unwrap().by.contains("2 block"));
        assert!(matches!(check(&f[..whole - 3]), Err(Problem::Short(_))));
        assert!(matches!(
            check(&TREE[..TREE.len() - 6]),
            Err(Problem::Short(_))
        ));
        assert!(matches!(check(b"SIMPLE  ="), Err(Problem::Corrupt(_))));
        let mut junk = TREE.to_vec();
        junk.extend(block(&[1; 5]));
        junk.extend_from_slice(b"garbage");
        assert!(matches!(check(&junk), Err(Problem::Corrupt(_))));
    }
}
