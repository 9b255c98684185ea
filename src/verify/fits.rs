//! FITS: every HDU walked as the bytes stream past.
//!
//! A header is 2880-byte blocks of 80-character cards up to `END` (the rest of its last block blank);
//! the data that follow are `|BITPIX| / 8 × GCOUNT × (PCOUNT + NAXIS1 × … × NAXISn)` bytes (a primary HDU
//! has no `PCOUNT`/`GCOUNT` unless it holds random groups, whose `NAXIS1` is 0 and left out of the
//! product), padded to whole blocks. The file must end exactly after the last HDU's padded data. Where the
//! primary header has `NEXTEND`, that many extensions must follow: a cut exactly at an HDU boundary is
//! otherwise a valid, shorter FITS file. Where an HDU has `DATASUM` (the 32-bit ones'-complement sum of
//! its data blocks, heap included) or `CHECKSUM` (chosen so that the sum over the whole HDU is −0), they
//! are checked: a mismatch is a damaged transfer.

use std::fs::File;

use super::{Problem, Verified, Verifier};

/// FITS files are made of blocks of this many bytes.
const BLOCK: usize = 2880;
/// Header cards are this long.
const CARD: usize = 80;
/// No HDU's data are believed larger than this (1 PiB): a larger figure is a damaged header.
const MAX_DATA: u64 = 1 << 50;

/// The ones'-complement sum of `words` (big-endian 32-bit words) added to `sum`, with end-around carry,
/// as the FITS checksum convention defines it. `words.len()` must be a multiple of 4.
pub fn ones_complement_sum(sum: u32, words: &[u8]) -> u32 {
    debug_assert!(words.len().is_multiple_of(4));
    let mut acc = u64::from(sum);
    // Eight bytes at a time are two words: summing them as 16-bit-wide halves is the same modulo
    // 2^32 - 1, and lets the compiler keep it in vector registers. Chunks stay small enough that the
    // 64-bit accumulators cannot overflow before they are folded.
    for chunk in words.chunks(1 << 20) {
        let (pairs, rest) = chunk.split_at(chunk.len() / 8 * 8);
        let mut hi = 0u64;
        let mut lo = 0u64;
        for p in pairs.chunks_exact(8) {
            let v = u64::from_be_bytes(p.try_into().unwrap_or_default());
            hi += v >> 32;
            lo += v & 0xffff_ffff;
        }
        acc += hi + lo;
        for w in rest.chunks_exact(4) {
            acc += u64::from(u32::from_be_bytes(w.try_into().unwrap_or_default()));
        }
        acc = fold(acc);
    }
    fold(acc) as u32
}

fn fold(mut acc: u64) -> u64 {
    while acc >> 32 != 0 {
        acc = (acc & 0xffff_ffff) + (acc >> 32);
    }
    acc
}

/// Ones'-complement addition of two sums.
fn add(a: u32, b: u32) -> u32 {
    fold(u64::from(a) + u64::from(b)) as u32
}

/// What a header says that the walk needs.
#[derive(Debug, Default)]
struct Header {
    /// `XTENSION`'s value, or `None` for the primary.
    xtension: Option<String>,
    simple: Option<bool>,
    bitpix: Option<i64>,
    naxis: Option<i64>,
    axes: Vec<Option<i64>>,
    pcount: Option<i64>,
    gcount: Option<i64>,
    groups: bool,
    extend: Option<bool>,
    nextend: Option<i64>,
    checksum: Option<String>,
    datasum: Option<String>,
    ended: bool,
    cards: usize,
}

/// The streaming FITS walker.
pub struct Fits {
    /// Bytes of the header being read, up to one block.
    block: Vec<u8>,
    header: Header,
    /// The sum of the current HDU's header blocks.
    header_sum: u32,
    /// Data bytes (padded) still to come for the current HDU; `None` while in a header.
    data_left: Option<u64>,
    data_size: u64,
    data_sum: u32,
    /// A word split across two `update` calls.
    carry: [u8; 4],
    carry_len: usize,
    /// HDUs complete so far.
    hdus: u64,
    /// HDUs whose CHECKSUM and/or DATASUM were verified.
    summed: u64,
    primary_nextend: Option<i64>,
    primary_extend: Option<bool>,
    /// Bytes seen.
    offset: u64,
}

impl Default for Fits {
    fn default() -> Self {
        Fits::new()
    }
}

impl Fits {
    /// A walker at the start of a file.
    pub fn new() -> Fits {
        Fits {
            block: Vec::with_capacity(BLOCK),
            header: Header::default(),
            header_sum: 0,
            data_left: None,
            data_size: 0,
            data_sum: 0,
            carry: [0; 4],
            carry_len: 0,
            hdus: 0,
            summed: 0,
            primary_nextend: None,
            primary_extend: None,
            offset: 0,
        }
    }

    fn hdu_name(&self) -> String {
        match (self.hdus, &self.header.xtension) {
            (0, _) => "the primary HDU".to_string(),
            (n, Some(x)) => format!("HDU {} ({x})", n + 1),
            (n, None) => format!("HDU {}", n + 1),
        }
    }

    /// Adds data bytes to the data sum, keeping a word split across calls.
    fn sum_data(&mut self, mut bytes: &[u8]) {
        if self.carry_len > 0 {
            let take = (4 - self.carry_len).min(bytes.len());
            self.carry[self.carry_len..self.carry_len + take].copy_from_slice(&bytes[..take]);
            self.carry_len += take;
            bytes = &bytes[take..];
            if self.carry_len < 4 {
                return;
            }
            self.data_sum = ones_complement_sum(self.data_sum, &self.carry);
            self.carry_len = 0;
        }
        let whole = bytes.len() / 4 * 4;
        self.data_sum = ones_complement_sum(self.data_sum, &bytes[..whole]);
        let rest = &bytes[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carry_len = rest.len();
    }

    /// A whole header block has arrived.
    fn header_block(&mut self) -> Result<(), Problem> {
        let at = self.offset - BLOCK as u64;
        if let Some(i) = self.block.iter().position(|b| !(0x20..=0x7e).contains(b)) {
            return Err(Problem::Corrupt(format!(
                "the header of {} holds byte 0x{:02x} at offset {}, which is not printable ASCII: the \
                 file is damaged or not FITS",
                self.hdu_name(),
                self.block[i],
                at + i as u64
            )));
        }
        self.header_sum = ones_complement_sum(self.header_sum, &self.block);
        let block = std::mem::take(&mut self.block);
        let result = self.cards(&block, at);
        self.block = block;
        self.block.clear();
        result?;
        if self.header.ended {
            self.data_size = self.data_size()?;
            let padded = self.data_size.div_ceil(BLOCK as u64) * BLOCK as u64;
            self.data_left = Some(padded);
            if padded == 0 {
                self.end_hdu()?;
            }
        }
        Ok(())
    }

    fn cards(&mut self, block: &[u8], at: u64) -> Result<(), Problem> {
        for (i, card) in block.chunks_exact(CARD).enumerate() {
            let card = std::str::from_utf8(card).unwrap_or_default();
            if self.header.ended {
                if card.bytes().any(|b| b != b' ') {
                    return Err(Problem::Corrupt(format!(
                        "the header of {} has text after its END card (offset {}): the file is damaged",
                        self.hdu_name(),
                        at + (i * CARD) as u64
                    )));
                }
                continue;
            }
            let keyword = card[..8].trim_end();
            let first = self.header.cards == 0;
            self.header.cards += 1;
            if first {
                match (self.hdus, keyword) {
                    (0, "SIMPLE") => {}
                    (0, _) => {
                        return Err(Problem::Corrupt(
                            "the file does not begin with SIMPLE = T, so it is not FITS"
                                .to_string(),
                        ));
                    }
                    (_, "XTENSION") => {}
                    (n, _) => {
                        return Err(Problem::Corrupt(format!(
                            "the {} bytes after HDU {n} are not a FITS extension (no XTENSION card at \
                             offset {at}): the file is damaged or has bytes that do not belong to it",
                            self.block.len().max(BLOCK),
                        )));
                    }
                }
            }
            if keyword == "END" {
                self.header.ended = true;
                continue;
            }
            if &card[8..10] != "= " {
                // COMMENT, HISTORY, blank, CONTINUE (a long string's rest) and HIERARCH cards carry
                // nothing the walk needs.
                continue;
            }
            let value = value_field(&card[10..]);
            let h = &mut self.header;
            let int = || parse_int(value);
            match keyword {
                "SIMPLE" => h.simple = parse_logical(value),
                "XTENSION" => h.xtension = Some(parse_string(value).unwrap_or_default()),
                "BITPIX" => h.bitpix = int(),
                "NAXIS" => {
                    h.naxis = int();
                    let n = h.naxis.unwrap_or(0).clamp(0, 999) as usize;
                    h.axes.resize(n, None);
                }
                "PCOUNT" => h.pcount = int(),
                "GCOUNT" => h.gcount = int(),
                "GROUPS" => h.groups = parse_logical(value) == Some(true),
                "EXTEND" => h.extend = parse_logical(value),
                "NEXTEND" => h.nextend = int(),
                "CHECKSUM" => h.checksum = parse_string(value),
                "DATASUM" => h.datasum = parse_string(value),
                k if k.starts_with("NAXIS") => {
                    if let Ok(n) = k[5..].parse::<usize>()
                        && (1..=h.axes.len()).contains(&n)
                    {
                        h.axes[n - 1] = int();
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The current HDU's data size from its header.
    fn data_size(&self) -> Result<u64, Problem> {
        let h = &self.header;
        let name = self.hdu_name();
        let bad = |what: &str| {
            Problem::Corrupt(format!(
                "the header of {name} {what}: the file is damaged or not FITS"
            ))
        };
        if self.hdus == 0 && h.simple != Some(true) {
            return Err(bad("does not say SIMPLE = T"));
        }
        let bitpix = h.bitpix.ok_or_else(|| bad("has no BITPIX"))?;
        let bytes = match bitpix {
            8 => 1,
            16 => 2,
            32 | -32 => 4,
            64 | -64 => 8,
            other => {
                return Err(bad(&format!(
                    "has BITPIX = {other}, not 8, 16, 32, 64, -32 or -64"
                )));
            }
        };
        let naxis = h.naxis.ok_or_else(|| bad("has no NAXIS"))?;
        if !(0..=999).contains(&naxis) {
            return Err(bad(&format!("has NAXIS = {naxis}")));
        }
        if naxis == 0 {
            return Ok(0);
        }
        let mut axes = Vec::with_capacity(h.axes.len());
        for (i, a) in h.axes.iter().enumerate() {
            match a {
                Some(n) if *n >= 0 => axes.push(*n as u64),
                Some(n) => return Err(bad(&format!("has NAXIS{} = {n}", i + 1))),
                None => return Err(bad(&format!("has no NAXIS{}", i + 1))),
            }
        }
        let count = |v: Option<i64>, default: i64, name: &str| match v.unwrap_or(default) {
            n if n >= 0 => Ok(n as u64),
            n => Err(bad(&format!("has {name} = {n}"))),
        };
        let random_groups = self.hdus == 0 && h.groups && axes.first() == Some(&0);
        let (pcount, gcount, axes) = if self.hdus == 0 && !random_groups {
            (0, 1, &axes[..])
        } else if random_groups {
            (
                count(h.pcount, 0, "PCOUNT")?,
                count(h.gcount, 1, "GCOUNT")?,
                &axes[1..],
            )
        } else {
            (
                count(h.pcount, 0, "PCOUNT")?,
                count(h.gcount, 1, "GCOUNT")?,
                &axes[..],
            )
        };
        let too_big = || bad("announces more data than any file holds");
        let elements = axes
            .iter()
            .try_fold(1u64, |acc, &n| acc.checked_mul(n))
            .ok_or_else(too_big)?;
        let size = elements
            .checked_add(pcount)
            .and_then(|n| n.checked_mul(gcount))
            .and_then(|n| n.checked_mul(bytes))
            .filter(|n| *n <= MAX_DATA)
            .ok_or_else(too_big)?;
        Ok(size)
    }

    /// The current HDU's data have all arrived: check its sums, and begin the next header.
    fn end_hdu(&mut self) -> Result<(), Problem> {
        let name = self.hdu_name();
        let h = std::mem::take(&mut self.header);
        let data_sum = self.data_sum;
        let mut summed = false;
        if let Some(datasum) = h.datasum.as_deref().map(str::trim) {
            // An empty or unparsable DATASUM is "not computed".
            if let Ok(expected) = datasum.parse::<u64>() {
                if expected != u64::from(data_sum) {
                    return Err(Problem::Corrupt(format!(
                        "the data of {name} fail their DATASUM: the header says {expected}, the data \
                         sum to {data_sum}: the transfer damaged them"
                    )));
                }
                summed = true;
            }
        }
        if let Some(checksum) = h.checksum.as_deref() {
            // The convention's placeholder for "not computed yet" is all zeros.
            if !checksum.trim().is_empty() && checksum.trim().bytes().any(|b| b != b'0') {
                let total = add(self.header_sum, data_sum);
                if total != u32::MAX {
                    return Err(Problem::Corrupt(format!(
                        "{name} fails its CHECKSUM (the HDU sums to 0x{total:08x}, not -0): the \
                         transfer damaged it"
                    )));
                }
                summed = true;
            }
        }
        if self.hdus == 0 {
            self.primary_nextend = h.nextend;
            self.primary_extend = h.extend;
        }
        self.hdus += 1;
        self.summed += u64::from(summed);
        self.header_sum = 0;
        self.data_sum = 0;
        self.data_size = 0;
        self.data_left = None;
        self.carry_len = 0;
        Ok(())
    }

    /// Ends the walk: the file must have ended after a whole HDU, and as many as `NEXTEND` says.
    pub fn end(self) -> Result<Verified, Problem> {
        if let Some(left) = self.data_left {
            let padded = self.data_size.div_ceil(BLOCK as u64) * BLOCK as u64;
            return Err(Problem::Short(format!(
                "the file ends inside the data of {}: {} of its {} bytes (padded to {padded}) arrived",
                self.hdu_name(),
                padded - left,
                self.data_size,
            )));
        }
        if self.header.cards > 0 || !self.block.is_empty() {
            return Err(Problem::Short(format!(
                "the file ends inside the header of {}, before its END card",
                self.hdu_name()
            )));
        }
        if self.hdus == 0 {
            return Err(Problem::Short("the file is empty".to_string()));
        }
        let extensions = self.hdus - 1;
        if let Some(n) = self.primary_nextend
            && n >= 0
            && (n as u64) > extensions
        {
            return Err(Problem::Short(format!(
                "the primary header announces NEXTEND = {n} extensions; the file ends after {extensions}"
            )));
        }
        let proves_end = self
            .primary_nextend
            .is_some_and(|n| n >= 0 && n as u64 == extensions)
            || (extensions == 0 && self.primary_extend != Some(true));
        let sums = match self.summed {
            0 => "structure only (no CHECKSUM or DATASUM in the file)".to_string(),
            n if n == self.hdus => format!("structure and CHECKSUM/DATASUM of all {n}"),
            n => format!(
                "structure, and CHECKSUM/DATASUM of {n} (the other {} have none)",
                self.hdus - n
            ),
        };
        Ok(Verified {
            by: format!(
                "FITS: {} HDU{}, {sums}",
                self.hdus,
                if self.hdus == 1 { "" } else { "s" }
            ),
            proves_end,
            format_known: true,
        })
    }
}

impl Verifier for Fits {
    fn update(&mut self, mut bytes: &[u8]) -> Result<(), Problem> {
        while !bytes.is_empty() {
            match self.data_left {
                None => {
                    let take = (BLOCK - self.block.len()).min(bytes.len());
                    self.block.extend_from_slice(&bytes[..take]);
                    self.offset += take as u64;
                    bytes = &bytes[take..];
                    if self.block.len() == BLOCK {
                        self.header_block()?;
                    }
                }
                Some(left) => {
                    let take = (left.min(bytes.len() as u64)) as usize;
                    self.sum_data(&bytes[..take]);
                    self.offset += take as u64;
                    bytes = &bytes[take..];
                    self.data_left = Some(left - take as u64);
                    if left == take as u64 {
                        self.end_hdu()?;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut File) -> Result<Verified, Problem> {
        self.end()
    }
}

/// A card's value field without its comment (`/` outside a string).
fn value_field(field: &str) -> &str {
    let t = field.trim_start();
    if t.starts_with('\'') {
        return t;
    }
    t.split('/').next().unwrap_or("").trim()
}

fn parse_int(v: &str) -> Option<i64> {
    let v = v.trim();
    v.strip_prefix('+').unwrap_or(v).parse().ok()
}

fn parse_logical(v: &str) -> Option<bool> {
    match v.trim() {
        "T" => Some(true),
        "F" => Some(false),
        _ => None,
    }
}

/// A quoted string value (`''` is a quote), trailing blanks dropped.
fn parse_string(v: &str) -> Option<String> {
    let mut chars = v.trim_start().strip_prefix('\'')?.chars().peekable();
    let mut out = String::new();
    while let Some(c) = chars.next() {
        if c == '\'' {
            if chars.peek() == Some(&'\'') {
                chars.next();
                out.push('\'');
            } else {
                return Some(out.trim_end().to_string());
            }
        } else {
            out.push(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cards: &[String]) -> Vec<u8> {
        let mut h: String = cards.iter().map(|c| format!("{c:<80}")).collect();
        h.push_str(&format!("{:<80}", "END"));
        let mut b = h.into_bytes();
        b.resize(b.len().div_ceil(BLOCK) * BLOCK, b' ');
        b
    }

    fn walk(bytes: &[u8], piece: usize) -> Result<Verified, Problem> {
        let mut f = Fits::new();
        for p in bytes.chunks(piece.max(1)) {
            f.update(p)?;
        }
        f.end()
    }

    fn image(bitpix: i64, axes: &[u64], extension: bool) -> Vec<u8> {
        let mut cards = vec![if extension {
            "XTENSION= 'IMAGE   '".to_string()
        } else {
            format!("SIMPLE  = {:>20}", "T")
        }];
        cards.push(format!("BITPIX  = {bitpix:>20}"));
        cards.push(format!("NAXIS   = {:>20}", axes.len()));
        for (i, a) in axes.iter().enumerate() {
            cards.push(format!("NAXIS{:<3}= {a:>20}", i + 1));
        }
        if extension {
            cards.push(format!("PCOUNT  = {:>20}", 0));
            cards.push(format!("GCOUNT  = {:>20}", 1));
        }
        let mut b = header(&cards);
        let n: u64 = axes.iter().product::<u64>() * (bitpix.unsigned_abs() / 8);
        b.extend((0..n).map(|i| (i * 7 + 3) as u8));
        b.resize(b.len().div_ceil(BLOCK) * BLOCK, 0);
        b
    }

    #[test]
    fn ones_complement_sums_fold_their_carries() {
        assert_eq!(ones_complement_sum(0, &[0xff, 0xff, 0xff, 0xff]), u32::MAX);
        assert_eq!(
            ones_complement_sum(0, &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2]),
            2,
            "0xffffffff + 2 wraps around to 2 (the end-around carry)"
        );
        let words: Vec<u8> = (0..4000u32)
            .flat_map(|i| i.wrapping_mul(2_654_435_761).to_be_bytes())
            .collect();
        let slow = words.chunks(4).fold(0u64, |acc, w| {
            fold(acc + u64::from(u32::from_be_bytes(w.try_into().unwrap())))
        });
        assert_eq!(u64::from(ones_complement_sum(0, &words)), slow);
    }

    #[test]
    fn a_primary_and_extensions_walk_whole_in_any_pieces() {
        let mut file = image(16, &[7, 13], false);
        file.extend(image(-64, &[5, 3], true));
        file.extend(image(8, &[0], true));
        for piece in [1, 3, 80, 2880, 4096, file.len()] {
            let v = walk(&file, piece).unwrap();
            assert_eq!(
                v.by,
                "FITS: 3 HDUs, structure only (no CHECKSUM or DATASUM in the file)"
            );
            assert!(
                !v.proves_end,
                "without NEXTEND a cut at an HDU boundary is a valid file"
            );
        }
    }

    #[test]
    fn cuts_inside_headers_and_data_are_short() {
        let mut file = image(16, &[7, 13], false);
        file.extend(image(32, &[100, 10], true));
        for cut in [
            0,
            100,
            2880,
            5760 - 1,
            5760 + 80,
            5760 + 2880 + 4,
            file.len() - 1,
        ] {
            let e = walk(&file[..cut], 997).unwrap_err();
            assert!(matches!(e, Problem::Short(_)), "cut at {cut}: {e:?}");
        }
        // At the boundary: a valid, shorter file.
        assert!(walk(&file[..5760], 997).is_ok());
    }

    #[test]
    fn nextend_proves_the_end_and_catches_a_cut_at_an_hdu_boundary() {
        let mut file = header(&[
            format!("SIMPLE  = {:>20}", "T"),
            format!("BITPIX  = {:>20}", 8),
            format!("NAXIS   = {:>20}", 0),
            format!("EXTEND  = {:>20}", "T"),
            format!("NEXTEND = {:>20} / number of extensions", 2),
        ]);
        file.extend(image(16, &[3, 3], true));
        let one = file.len();
        file.extend(image(16, &[3, 3], true));
        assert!(walk(&file, 1000).unwrap().proves_end);
        let e = walk(&file[..one], 1000).unwrap_err();
        assert_eq!(
            e,
            Problem::Short(
                "the primary header announces NEXTEND = 2 extensions; the file ends after 1".into()
            )
        );
    }

    #[test]
    fn garbage_is_corrupt_not_short() {
        assert!(matches!(
            walk(&[b'x'; 2880], 2880),
            Err(Problem::Corrupt(_))
        ));
        let mut file = image(16, &[4], false);
        file.extend_from_slice(&[b' '; 2880]);
        assert!(
            matches!(walk(&file, 2880), Err(Problem::Corrupt(_))),
            "trailing blank block"
        );
        let mut bad = image(16, &[4], false);
        bad[85] = 0x80;
        assert!(matches!(walk(&bad, 2880), Err(Problem::Corrupt(_))));
        let huge = header(&[
            format!("SIMPLE  = {:>20}", "T"),
            format!("BITPIX  = {:>20}", 8),
            format!("NAXIS   = {:>20}", 3),
            format!("NAXIS1  = {:>20}", 1u64 << 30),
            format!("NAXIS2  = {:>20}", 1u64 << 30),
            format!("NAXIS3  = {:>20}", 1u64 << 30),
        ]);
        assert!(matches!(walk(&huge, 2880), Err(Problem::Corrupt(_))));
    }

    #[test]
    fn strings_and_values_parse_as_fits_writes_them() {
        assert_eq!(parse_string("'IMAGE   '  / ext").as_deref(), Some("IMAGE"));
        assert_eq!(parse_string("'it''s'").as_deref(), Some("it's"));
        assert_eq!(parse_int(value_field("                 +42 / n")), Some(42));
        assert_eq!(value_field("   'a/b'  / c"), "'a/b'  / c");
    }
}
