//! What the IMAP tests need of a real IMAP server, whichever it is: Dovecot (`dovecot.rs`), GNU Mailutils
//! imap4d (`imap4d.rs`), Cyrus (`cyrus.rs`). Each is a real server from Debian's packages, started by the
//! test in a temp dir on free loopback ports.

use std::path::{Path, PathBuf};

use super::dovecot::Imap;

/// A certificate and key for a server, as PEM.
#[derive(Clone, Debug)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A running IMAP server.
pub trait ImapServer {
    /// "Dovecot", "imap4d", "Cyrus".
    fn name(&self) -> &'static str;
    /// Plain IMAP, with STARTTLS.
    fn port(&self) -> u16;
    /// Implicit TLS.
    fn tls_port(&self) -> u16;
    /// The PEM file a client names as `imap.ca_file` for the server's default certificate (a private
    /// CA's certificate).
    fn ca_file(&self) -> &Path;
    /// The test user's login name and password.
    fn user(&self) -> &str;
    fn password(&self) -> &str;
    /// A client logged in as the test user.
    fn client(&self) -> Imap;
    /// Delivers `mail` into `mailbox` (the server's own name for it) with APPEND.
    fn deliver(&self, mailbox: &str, mail: &[u8]) {
        let mut c = self.client();
        c.append(mailbox, mail);
        c.logout();
    }
    /// The UIDs in `mailbox` (the server's own name) matching `criteria` ("ALL", "UNSEEN"), in order;
    /// empty when the mailbox does not exist.
    fn uids(&self, mailbox: &str, criteria: &str) -> Vec<u32> {
        let mut c = self.client();
        let uids = c.uids("SELECT", mailbox, criteria);
        c.logout();
        uids
    }
    /// The server's own name for a folder a user writes as `path` with `/` (e.g. "MAST/processed" is
    /// "MAST.processed" on Dovecot's Maildir, "INBOX.MAST.processed" on Debian's Cyrus).
    fn mailbox_name(&self, path: &str) -> String;
    /// Stops the server and every session process it started (so that every connection really ends);
    /// waits until its ports refuse connections.
    fn stop(&mut self);
    /// Starts it again after `stop`, with the same mail, and waits until it serves IMAP.
    fn start_again(&mut self);
    /// The server's log so far (for failure messages).
    fn log(&self) -> String;
    /// How many logins the server has refused so far.
    fn failed_logins(&self) -> usize;
}

/// Writes `cert` into `dir` as cert.pem and key.pem; returns their paths.
pub fn write_cert(dir: &Path, cert: &ServerCert) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, &cert.cert_pem).unwrap();
    std::fs::write(&k, &cert.key_pem).unwrap();
    (c, k)
}
