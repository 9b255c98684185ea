//! mastsub: turns MAST data-notification notices into verified downloads.
//!
//! The pipeline, one module each: [`sources`] (inbox folder) hand notice bytes to [`ingest`], which
//! parses them ([`notice`]), decides what each event does ([`categorize`]) and records everything in the
//! [`store`], the only shared state; [`download`] workers claim jobs from it and fetch the products.
//! [`daemon`] runs the loops and [`service`] speaks to systemd; [`cli`] is the command line; [`status`]
//! renders reports; [`config`] and [`logging`] set the stage. See `docs/ARCHITECTURE.md`.

pub mod categorize;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod download;
pub mod filters;
pub mod fsutil;
pub mod hooks;
pub mod http;
pub mod ingest;
pub mod logging;
pub mod mailer;
pub mod notice;
pub mod oneshot;
pub mod product;
pub mod service;
pub mod sources;
pub mod status;
pub mod store;
pub mod tls;
pub mod verify;

/// Shared by unit tests that must not overlap.
#[cfg(test)]
pub(crate) mod test_support {
    /// Held by a unit test that starts a process, and by one that asserts no process holds a file open
    /// for writing: a child forked in between inherits the test's descriptors until it execs, and a read
    /// lease rightly counts it as a writer.
    pub static SPAWNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
}
