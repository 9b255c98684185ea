//! What keeps one database file in one pair of hands: the run lock beside it, and the file's identity.
//!
//! The run lock (`<database>.run.lock`, a `flock` held for a process's life, its pid written inside) lets
//! one `mastsub run` (or one `mastsub download` into a folder) use a database at a time; `status`, `list`,
//! `ingest` and `retry` never take it. It is a file of its own, like the migration lock `<database>.lock`:
//! the database file itself is never locked by mastsub, since closing any descriptor of it would drop
//! SQLite's own POSIX locks. The lock file is never removed (removing a lock file lets two processes each
//! lock a different file of the same name); a stale pid in it is harmless, since it is only read while
//! the lock is held.
//!
//! The identity (device and inode) of the database file is taken through its path right after opening;
//! checked again later, a missing file or another one at the path means the database was deleted, moved
//! or replaced while open, and whatever is recorded from then on goes into a file no one will read.

use std::fs::{File, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The device and inode of a file, as `stat` gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
}

/// What became of a file since its identity was taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing is at the path any more.
    Missing,
    /// Another file is at the path.
    Replaced,
}

impl Change {
    /// How an error message says it.
    pub fn describe(&self) -> &'static str {
        match self {
            Change::Missing => "deleted or moved away",
            Change::Replaced => "replaced by another file",
        }
    }
}

impl FileIdentity {
    /// The identity of the file at `path` now (symbolic links followed, as SQLite follows them).
    pub fn of(path: &Path) -> io::Result<FileIdentity> {
        let meta = std::fs::metadata(path)?;
        Ok(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Whether `path` still names this file. `Ok(None)`: it does; an error: the path could not be looked
    /// at for another reason (permissions, I/O), which proves nothing either way.
    pub fn check(&self, path: &Path) -> io::Result<Option<Change>> {
        match FileIdentity::of(path) {
            Ok(now) if now == *self => Ok(None),
            Ok(_) => Ok(Some(Change::Replaced)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                Ok(Some(Change::Missing))
            }
            Err(e) => Err(e),
        }
    }
}

/// The run lock on a database, held until dropped.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

/// Who holds a run lock, as its file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// Its pid, if the file names one.
    pub pid: Option<u32>,
    /// Its command (`run`, `download`), if the file names one.
    pub command: Option<String>,
}

/// Why the run lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum RunLockError {
    /// Another process holds it.
    #[error("another mastsub {}{} is using {database}", .holder.command.as_deref().unwrap_or("process"), .holder.pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held {
        /// The database.
        database: String,
        /// What the lock file says of its holder.
        holder: LockHolder,
    },
    /// The lock file could not be opened, locked or written.
    #[error("cannot take the run lock {path}: {source}")]
    Io {
        /// The lock file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// `<database>.run.lock`.
pub fn run_lock_path(database: &Path) -> PathBuf {
    let mut p = database.as_os_str().to_owned();
    p.push(".run.lock");
    PathBuf::from(p)
}

impl RunLock {
    /// Takes the run lock of `database` for `command` (`run`, `download`) without waiting, and writes this
    /// process's pid and the command into it.
    pub fn acquire(database: &Path, command: &str) -> Result<RunLock, RunLockError> {
        let path = run_lock_path(database);
        let io_err = |source| RunLockError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(RunLockError::Held {
                    database: database.display().to_string(),
                    holder: read_holder(&mut file),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        file.write_all(format!("{} {command}\n", std::process::id()).as_bytes())
            .map_err(io_err)?;
        Ok(RunLock { _file: file })
    }
}

/// What a held lock file says of its holder. The holder writes its pid just after taking the lock, so an
/// empty file is read again for a moment.
fn read_holder(file: &mut File) -> LockHolder {
    let mut text = String::new();
    for _ in 0..10 {
        text.clear();
        if file.rewind().is_ok() && file.read_to_string(&mut text).is_ok() && !text.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    parse_holder(&text)
}

/// `"<pid> <command>\n"`, as [`RunLock::acquire`] writes it; whatever is missing or unreadable is `None`.
fn parse_holder(text: &str) -> LockHolder {
    let mut words = text.split_whitespace();
    LockHolder {
        pid: words.next().and_then(|p| p.parse().ok()),
        command: words
            .next()
            .filter(|c| c.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("mastsub.db");
        let first = RunLock::acquire(&db, "run").unwrap();
        let text = std::fs::read_to_string(run_lock_path(&db)).unwrap();
        assert_eq!(text, format!("{} run\n", std::process::id()));
        // flock locks belong to the open file description: a second open in this process is refused too.
        match RunLock::acquire(&db, "download") {
            Err(e @ RunLockError::Held { .. }) => {
                let shown = e.to_string();
                assert!(
                    shown.contains(&format!("another mastsub run (pid {})", std::process::id())),
                    "{shown}"
                );
                assert!(shown.contains("mastsub.db"), "{shown}");
            }
            other => panic!("not refused: {other:?}"),
        }
        drop(first);
        let again = RunLock::acquire(&db, "download").unwrap();
        let text = std::fs::read_to_string(run_lock_path(&db)).unwrap();
        assert_eq!(text, format!("{} download\n", std::process::id()));
        drop(again);
    }

    #[test]
    fn a_lock_file_that_says_nothing_useful_gives_an_unnamed_holder() {
        assert_eq!(
            parse_holder("4242 run\n"),
            LockHolder {
                pid: Some(4242),
                command: Some("run".into())
            }
        );
        assert_eq!(
            parse_holder(""),
            LockHolder {
                pid: None,
                command: None
            }
        );
        assert_eq!(parse_holder("x \u{1b}[31m").command, None);
    }

    #[test]
    fn the_identity_tells_a_deleted_or_replaced_file_from_the_same_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"one").unwrap();
        let id = FileIdentity::of(&path).unwrap();
        assert_eq!(id.check(&path).unwrap(), None);
        std::fs::write(&path, b"rewritten in place").unwrap();
        assert_eq!(id.check(&path).unwrap(), None, "same inode");
        let other = dir.path().join("g");
        std::fs::write(&other, b"two").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(id.check(&path).unwrap(), Some(Change::Replaced));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(id.check(&path).unwrap(), Some(Change::Missing));
    }
}
