//! Server certificates made the ways people make them, with the `openssl` command (not with the code
//! under test): each in a folder of its own under the given directory, with what a client lists in
//! `ca_file` and the SHA-256 fingerprint as `openssl x509 -noout -fingerprint -sha256` prints it.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::imap_server::ServerCert;

/// A certificate for a server, and what a client trusts it by.
#[derive(Clone, Debug)]
pub struct Made {
    /// For the server.
    pub server: ServerCert,
    /// For the client's `ca_file`: the certificate itself when self-signed, else its CA's.
    pub ca_file: PathBuf,
    /// "sha256:AB:CD:…", from openssl's output, as `tls_fingerprint` takes it.
    pub fingerprint: String,
}

/// Whether the `openssl` command is there.
pub fn available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh folder `name` under `dir`.
fn folder(dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The SHA-256 fingerprint of the PEM certificate `cert`, by openssl: "sha256:AB:CD:…".
pub fn fingerprint(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl x509 -fingerprint failed");
    let text = String::from_utf8(out.stdout).unwrap();
    // "sha256 Fingerprint=AB:CD:..." (OpenSSL 3) or "SHA256 Fingerprint=..." (1.1).
    let hex = text
        .trim()
        .split_once('=')
        .map(|(_, h)| h.to_string())
        .expect("openssl's fingerprint line");
    format!("sha256:{hex}")
}

fn made(d: &Path, cert: &str, key: &str, ca_file: &str) -> Made {
    Made {
        server: ServerCert {
            cert_pem: std::fs::read_to_string(d.join(cert)).unwrap(),
            key_pem: std::fs::read_to_string(d.join(key)).unwrap(),
        },
        ca_file: d.join(ca_file),
        fingerprint: fingerprint(&d.join(cert)),
    }
}

/// `openssl req -x509 … -subj /CN=<cn>` and `extra` arguments: a self-signed certificate.
fn self_signed(dir: &Path, name: &str, cn: &str, extra: &[&str]) -> Made {
    let d = folder(dir, name);
    let subj = format!("/CN={cn}");
    let mut args = vec![
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.pem",
        "-days", "30", "-subj", &subj,
    ];
    args.extend_from_slice(extra);
    openssl(&d, &args);
    made(&d, "cert.pem", "key.pem", "cert.pem")
}

/// (a) The `openssl req -x509` default: CA:TRUE, no subjectAltName, `/CN=localhost`.
pub fn self_signed_ca_true_no_san(dir: &Path) -> Made {
    self_signed(dir, "ca-true-no-san", "localhost", &[])
}

/// (b) CA:TRUE (the default) with a subjectAltName for localhost and 127.0.0.1.
pub fn self_signed_ca_true_san(dir: &Path) -> Made {
    self_signed(
        dir,
        "ca-true-san",
        "localhost",
        &["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
    )
}

/// (c) CA:FALSE, with a subjectAltName for localhost and 127.0.0.1.
pub fn self_signed_ca_false(dir: &Path) -> Made {
    self_signed(
        dir,
        "ca-false",
        "localhost",
        &[
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
    )
}

/// (e) Self-signed for mail.example.org only (a host-name mismatch on loopback).
pub fn wrong_name(dir: &Path) -> Made {
    self_signed(
        dir,
        "wrong-name",
        "mail.example.org",
        &["-addext", "subjectAltName=DNS:mail.example.org"],
    )
}

/// (d) A private CA (`openssl req -x509`) and a server certificate it signed (`openssl x509 -req`) for
/// localhost and 127.0.0.1; `ca_file` is the CA's certificate.
pub fn private_ca(dir: &Path) -> Made {
    let d = folder(dir, "private-ca");
    openssl(
        &d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            "/CN=mastsub test private CA",
        ],
    );
    openssl(
        &d,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "req.pem",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        &d,
        &[
            "x509",
            "-req",
            "-in",
            "req.pem",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
        ],
    );
    made(&d, "cert.pem", "key.pem", "ca.pem")
}

/// (f) Self-signed for localhost and 127.0.0.1, valid only in 2020: OpenSSL 3.0's `req -x509` cannot
/// date a certificate in the past, so rcgen makes it; the fingerprint is still openssl's.
pub fn expired(dir: &Path) -> Made {
    let d = folder(dir, "expired");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2020, 12, 31);
    let cert = p.self_signed(&key).unwrap();
    std::fs::write(d.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(d.join("key.pem"), key.serialize_pem()).unwrap();
    made(&d, "cert.pem", "key.pem", "cert.pem")
}
