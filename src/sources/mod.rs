//! Sources of notices: the inbox folder and the IMAP mailbox. Sources only hand bytes to ingest.

pub mod imap;
pub mod imap_folders;
pub mod inbox;
pub mod mail;
mod writers;
