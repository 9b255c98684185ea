//! File-system steps that must not lose or replace anything: no-replace renames and directory fsync.

use std::io;
use std::path::Path;

/// Renames `from` to `to` unless `to` exists, atomically: `AlreadyExists` if it does.
pub fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            // File systems without RENAME_NOREPLACE: fall back to link + unlink below.
            Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    // A hard link fails if the name exists, so this never replaces a file either.
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

/// Makes a rename or a new entry in `dir` durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// True for errors that mean the disk, not the data, is the trouble: full, over quota, read-only, or not
/// ours to write. They are waited out, not counted as failed attempts.
pub fn is_disk_trouble(e: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ENOSPC | Errno::EDQUOT | Errno::EROFS | Errno::EACCES | Errno::EPERM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_no_replace_refuses_an_existing_name() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::write(&a, "new").unwrap();
        std::fs::write(&b, "old").unwrap();
        assert_eq!(
            rename_no_replace(&a, &b).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "old");
        std::fs::remove_file(&b).unwrap();
        rename_no_replace(&a, &b).unwrap();
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new");
        assert!(!a.exists());
    }

    #[test]
    fn disk_trouble_is_recognised() {
        assert!(is_disk_trouble(&io::Error::from_raw_os_error(
            nix::libc::ENOSPC
        )));
        assert!(!is_disk_trouble(&io::Error::from_raw_os_error(
            nix::libc::ECONNRESET
        )));
    }
}
