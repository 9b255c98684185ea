//! JSON: the whole file parses as one JSON value (read back at the end: JSON products are small).

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{Problem, Verified, Verifier};

/// The JSON checker.
pub struct Json;

impl Verifier for Json {
    fn update(&mut self, _: &[u8]) -> Result<(), Problem> {
        Ok(())
    }

    fn finish(self: Box<Self>, file: &mut File) -> Result<Verified, Problem> {
        file.seek(SeekFrom::Start(0)).map_err(Problem::io)?;
        let mut de = serde_json::Deserializer::from_reader(BufReader::new(&mut *file));
        let parsed = IgnoredAny::deserialize(&mut de).and_then(|_| de.end());
        match parsed {
            Ok(()) => Ok(Verified {
                by: "JSON: parses".to_string(),
                proves_end: true,
                format_known: true,
            }),
            Err(e) if e.is_eof() => Err(Problem::Short(format!(
                "the JSON ends early (line {}, column {}): the file was cut",
                e.line(),
                e.column()
            ))),
            Err(e) if e.is_io() => Err(Problem::Io(format!("cannot read the file back: {e}"))),
            Err(e) => Err(Problem::Corrupt(format!("the file is not valid JSON: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn check(bytes: &[u8]) -> Result<Verified, Problem> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        Box::new(Json).finish(&mut f)
    }

    #[test]
    fn whole_cut_and_wrong_json() {
        assert!(check(b"[{\"a\": [1, 2, {\"b\": null}]}]\n").is_ok());
        assert!(matches!(check(b"[{\"a\": [1, 2"), Err(Problem::Short(_))));
        assert!(matches!(check(b""), Err(Problem::Short(_))));
        assert!(matches!(check(b"[1] [2]"), Err(Problem::Corrupt(_))));
        assert!(matches!(check(b"{\"a\": tru}"), Err(Problem::Corrupt(_))));
    }
}
