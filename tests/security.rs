//! Security properties as tests: no notice can make a download leave the download root; the MAST token
//! and the mail passwords appear in no log line, status, check-config output or error; the token never
//! goes to another host, not even after a redirect. (That allowed_senders cannot be bypassed by a display
//! name, a Reply-To or a second From is shown in `sources::mail`'s tests and against Dovecot in imap.rs.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mast::{Faults, MastStandIn, fits_product, serve_products, wait_done};
use common::{Daemon, Workspace, record, wait_until};
use serde_json::json;

#[test]
fn no_notice_can_make_a_download_leave_the_download_root() {
    let mast = MastStandIn::start();
    let ws = Workspace::with_base(&mast.base_url, "");
    let hostile: Vec<(&str, &str, &str)> = vec![
        ("mission", "filename", "../../../escaped.fits"),
        ("mission", "filename", "/tmp/escaped.fits"),
        ("mission", "filename", "..\\..\\escaped.fits"),
        ("mission", "fileset", ".."),
        ("mission", "fileset", "a/../../.."),
        ("mission", "fileset", "."),
        ("fileset", "mission", "../JWST"),
        ("fileset", "mission", "JWST/.."),
        ("fileset", "filename", "ok\u{0}.fits"),
        ("fileset", "filename", "line\nbreak.fits"),
        ("fileset", "uri", "mast:TESS/product/../../../../etc/passwd"),
        ("fileset", "uri", "https://elsewhere.example/product.fits"),
    ];
    let mut records = Vec::new();
    for (n, (_, field, value)) in hostile.iter().enumerate() {
        let mut r = record(100 + n as u64, "New");
        r[*field] = json!(value);
        records.push(r);
    }
    // One good record, of a mission fetched by its mast: URI.
    let mut good = record(1, "New");
    good["mission"] = json!("TESS");
    let name = good["filename"].as_str().unwrap().to_string();
    mast.put(&name, fits_product(&name, 2, 1));
    records.push(good);

    let d = Daemon::start_watching(&ws);
    ws.drop_notice("hostile.json", &serde_json::to_vec(&records).unwrap());
    assert!(
        wait_until(Duration::from_secs(20), || ws.db().exists()
            && ws.jobs_in("done") == 1),
        "{}",
        d.log()
    );
    // Every hostile record refused, by field; nothing but the one product written, under the root.
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 1);
    let error =
        std::fs::read_to_string(ws.inbox().join("rejected/hostile.json.error.txt")).unwrap();
    for (n, (_, field, _)) in hostile.iter().enumerate() {
        assert!(
            error.contains(&format!("record {n}")) && error.contains(field),
            "record {n} ({field}) not reported:\n{error}"
        );
    }
    let everything = ws.tree("");
    let outside: Vec<&String> = everything
        .iter()
        .filter(|p| {
            !p.starts_with("mastDownload/")
                && !p.starts_with("inbox/")
                && !p.starts_with("mastsub.")
                && !p.starts_with("mastsub.toml")
        })
        .collect();
    assert!(outside.is_empty(), "files outside the root: {outside:?}");
    assert_eq!(
        ws.tree("mastDownload"),
        vec![format!("tess/jw00001001001_02201_00001/{name}")]
    );
    assert!(!std::path::Path::new("/tmp/escaped.fits").exists());
    assert_eq!(mast.seen().len(), 1, "only the good product was asked for");
}

#[test]
fn secrets_appear_in_no_log_status_check_config_or_error() {
    const TOKEN: &str = "tok-SECRET-4e1f";
    const IMAP_PASSWORD: &str = "imap-SECRET-77a2";
    const SMTP_PASSWORD: &str = "smtp-SECRET-9c03";
    let mast = MastStandIn::start();
    mast.set_faults(Faults {
        token: Some(TOKEN.into()),
        ..Faults::default()
    });
    let (notice, _) = serve_products(&mast, 1, 2, 4);
    let smtp_password = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(smtp_password.path(), SMTP_PASSWORD).unwrap();
    // IMAP and SMTP point at closed ports: their errors must not carry the secrets either.
    let ws = Workspace::with_base(
        &mast.base_url,
        &format!(
            "[imap]\nenabled = true\nhost = \"127.0.0.1\"\nport = 9\ntls = \"none\"\nusername = \"u\"\n\
             password = \"{IMAP_PASSWORD}\"\n\n[email]\nenabled = true\nsmtp_host = \"127.0.0.1\"\n\
             smtp_port = 9\nusername = \"u\"\npassword_file = {:?}\nfrom = \"m@x.example\"\n\
             to = [\"a@x.example\"]\nretry_initial = \"200ms\"\nretry_max = \"1s\"\n",
            smtp_password.path()
        ),
    );
    let d = Daemon::start_with_env(
        &ws,
        &[("MAST_API_TOKEN", TOKEN), ("MASTSUB_LOG__LEVEL", "trace")],
    );
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("n.json", &notice);
    wait_done(&ws, &d, 2, Duration::from_secs(20));
    d.wait_for_log("e-mail: cannot send", Duration::from_secs(20));
    d.wait_for_log("IMAP u@127.0.0.1:9", Duration::from_secs(20));

    let mut outputs = vec![("daemon log".to_string(), d.log())];
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["list", "--json"],
        vec!["check-config"],
        vec!["-v", "check-config"],
    ] {
        let out = ws.cmd().args(&args).output().unwrap();
        outputs.push((
            args.join(" "),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    // An invalid config's error names the problem, not the secret.
    let bad = ws
        .cmd()
        .env("MASTSUB_DOWNLOAD__WORKERS", "0")
        .arg("check-config")
        .output()
        .unwrap();
    outputs.push((
        "invalid check-config".into(),
        String::from_utf8_lossy(&bad.stderr).into(),
    ));
    for (what, text) in &outputs {
        for secret in [TOKEN, IMAP_PASSWORD, SMTP_PASSWORD] {
            assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
        }
    }
    assert!(
        outputs[0].1.contains("TRACE"),
        "the log was not at trace level"
    );
    assert!(outputs[4].1.contains("(redacted)"), "{}", outputs[4].1);
}

/// A one-request-at-a-time HTTP server on a thread: `answer` makes the reply; every request's head is kept.
fn server(answer: impl Fn(&str) -> Vec<u8> + Send + 'static) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let sink = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let reply = answer(&head);
            sink.lock().unwrap().push(head);
            let _ = stream.write_all(&reply);
            let _ = stream.flush();
            let mut rest = Vec::new();
            let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
            let _ = stream.read_to_end(&mut rest);
        }
    });
    (port, heads)
}

#[test]
fn the_token_never_goes_to_another_host_not_even_after_a_redirect() {
    const TOKEN: &str = "tok-REDIRECT-5b2d";
    let r = record(1, "New");
    let name = r["filename"].as_str().unwrap().to_string();
    let body = fits_product(&name, 3, 1);
    let served = body.clone();
    // Elsewhere: serves the product to whoever asks.
    let (other_port, other_heads) = server(move |_| {
        let mut reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            served.len()
        )
        .into_bytes();
        reply.extend_from_slice(&served);
        reply
    });
    // "MAST": redirects every product to the other host.
    let (mast_port, mast_heads) = server(move |head| {
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        format!(
            "HTTP/1.1 302 Found\r\nLocation: http://localhost:{other_port}{path}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        )
        .into_bytes()
    });
    let ws = Workspace::with_base(&format!("http://127.0.0.1:{mast_port}"), "");
    let d = Daemon::start_with_env(&ws, &[("MAST_API_TOKEN", TOKEN)]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("n.json", &serde_json::to_vec(&[r]).unwrap());
    wait_done(&ws, &d, 1, Duration::from_secs(20));
    let path = ws
        .path("mastDownload")
        .join(format!("jwst/jw00001001001_02201_00001/{name}"));
    assert!(std::fs::read(path).unwrap() == body);

    let to_mast = mast_heads.lock().unwrap().join("\n");
    assert!(
        to_mast
            .to_ascii_lowercase()
            .contains(&format!("authorization: token {TOKEN}").to_ascii_lowercase()),
        "the MAST host did not get the token:\n{to_mast}"
    );
    let elsewhere = other_heads.lock().unwrap().join("\n");
    assert!(!elsewhere.is_empty(), "the redirect was not followed");
    assert!(
        !elsewhere.contains(TOKEN),
        "the token went to another host:\n{elsewhere}"
    );
    assert!(!d.log().contains(TOKEN));
}
