//! A real S3 implementation for the cloud tests: moto's S3 server (`tests/servers/moto_bucket.py`), its
//! bucket public the way STScI's is (anyone may GetObject, nobody may list), objects uploaded by boto3
//! whole or in parts with a checksum. The ETags and checksums are moto's and botocore's, so they check our
//! reading of S3 that the stand-in in `mast.rs` shares.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// One object to upload.
pub struct Upload<'a> {
    pub key: &'a str,
    pub file: &'a Path,
    /// Uploaded in parts of this size (multipart), else whole.
    pub part_size: Option<usize>,
    /// `CRC32`, `SHA256`, `SHA1`, or none.
    pub checksum: Option<&'a str>,
}

/// The running server; stopped when dropped.
pub struct Moto {
    /// `http://127.0.0.1:PORT/BUCKET`: path-style, as `cloud.bucket_url` takes it.
    pub bucket_url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// moto with `bucket` holding `uploads`; `None` (the test says it is skipped) when moto or boto3
    /// cannot be imported, unless `REQUIRE_MOTO` is set.
    pub fn start(bucket: &str, uploads: &[Upload]) -> Option<Moto> {
        let importable = Command::new("python3")
            .args(["-c", "import moto.server, boto3, flask"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !importable {
            assert!(
                std::env::var_os("REQUIRE_MOTO").is_none(),
                "moto is required here (REQUIRE_MOTO) but python3 cannot import moto.server and boto3 \
                 (pip install 'moto[server]')"
            );
            eprintln!("SKIPPED: moto is not installed (pip install 'moto[server]')");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let list: Vec<serde_json::Value> = uploads
            .iter()
            .map(|u| {
                serde_json::json!({"key": u.key, "file": u.file, "part_size": u.part_size,
                                   "checksum": u.checksum})
            })
            .collect();
        let manifest = dir.path().join("uploads.json");
        std::fs::write(&manifest, serde_json::to_vec(&list).unwrap()).unwrap();
        let port = super::free_port();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/moto_bucket.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(bucket)
            .arg(&manifest)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "moto did not start");
        Some(Moto {
            bucket_url: format!("http://127.0.0.1:{port}/{bucket}"),
            child,
            _dir: dir,
        })
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
