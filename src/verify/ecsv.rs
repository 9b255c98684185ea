//! ECSV: the file begins `# %ECSV` and is valid UTF-8 throughout (checked as the bytes pass).

use std::fs::File;

use super::{Problem, Verified, Verifier};

const MAGIC: &[u8] = b"# %ECSV";

/// The ECSV checker.
#[derive(Default)]
pub struct Ecsv {
    head: Vec<u8>,
    /// The start of a UTF-8 sequence split across two `update` calls.
    pending: Vec<u8>,
    offset: u64,
}

impl Verifier for Ecsv {
    fn update(&mut self, bytes: &[u8]) -> Result<(), Problem> {
        if self.head.len() < MAGIC.len() {
            let take = (MAGIC.len() - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..take]);
            if !MAGIC.starts_with(&self.head) {
                return Err(Problem::Corrupt(
                    "the file does not begin with \"# %ECSV\", so it is not ECSV".into(),
                ));
            }
        }
        let mut text = std::mem::take(&mut self.pending);
        text.extend_from_slice(bytes);
        let start = self.offset;
        match std::str::from_utf8(&text) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() => self.pending = text[e.valid_up_to()..].to_vec(),
            Err(e) => {
                return Err(Problem::Corrupt(format!(
                    "byte {} is not UTF-8 text: the file is damaged or not ECSV",
                    start + e.valid_up_to() as u64
                )));
            }
        }
        self.offset = start + (text.len() - self.pending.len()) as u64;
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut File) -> Result<Verified, Problem> {
        if self.head.len() < MAGIC.len() {
            return Err(Problem::Short(
                "the file is shorter than its \"# %ECSV\" header".into(),
            ));
        }
        if !self.pending.is_empty() {
            return Err(Problem::Short(
                "the file ends inside a UTF-8 character".into(),
            ));
        }
        Ok(Verified {
            by: "ECSV: header and UTF-8".to_string(),
            proves_end: false,
            format_known: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bytes: &[u8], piece: usize) -> Result<Verified, Problem> {
        let mut v = Box::<Ecsv>::default();
        for p in bytes.chunks(piece) {
            v.update(p)?;
        }
        v.finish(&mut tempfile::tempfile().unwrap())
    }

    #[test]
    fn header_and_utf8_split_anywhere() {
        let text = "# %ECSV 1.0\n# ---\n# datatype: [{name: a}]\na\n\u{00e9}\u{4e2d}\u{1f600}\n";
        for piece in 1..8 {
            assert!(check(text.as_bytes(), piece).is_ok(), "pieces of {piece}");
        }
        assert!(matches!(check(b"a,b\n1,2\n", 4), Err(Problem::Corrupt(_))));
        assert!(matches!(
            check(b"# %ECSV 1.0\n\xff\n", 4),
            Err(Problem::Corrupt(_))
        ));
        assert!(matches!(
            check(b"# %ECSV 1.0\n\xe4\xb8", 4),
            Err(Problem::Short(_))
        ));
    }
}
