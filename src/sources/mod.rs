//! Sources of notices: the inbox folder (and, later, the IMAP mailbox). Sources only hand bytes to ingest.

pub mod inbox;
