//! File-system steps that must not lose or replace anything, nor leave the download folder: no-replace
//! renames, directory fsync, and folders walked without following symbolic links (`SafeDir`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

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

/// Why a path under the download folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// A symbolic link where a folder or a file of ours belongs: neither followed nor deleted.
    #[error(
        "{} is a symbolic link; mastsub never follows links inside its download folder (they could make \
         it write elsewhere): replace it with a real folder or remove it, then `mastsub retry`",
        .0.display()
    )]
    Link(PathBuf),
    /// Something other than a folder where a folder belongs (or other than a file where a file belongs).
    #[error("{} is not a {kind}; move it away, then `mastsub retry`", .0.display(), kind = .1)]
    NotA(PathBuf, &'static str),
    /// Any other error.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// To which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl PlaceError {
    /// The I/O error underneath, if any (for telling disk trouble).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            PlaceError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A folder opened without following symbolic links at any level below the download root, and the
/// files in it, named relative to it: nothing done through it can land outside the folder.
#[derive(Debug)]
pub struct SafeDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind
}

impl SafeDir {
    /// Opens `root` (the operator's own choice, which may itself be a link) and then each folder of
    /// `rel` below it without following links, creating what is missing when `create`.
    pub fn open(root: &Path, rel: &Path, create: bool) -> Result<SafeDir, PlaceError> {
        let io_err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |e: Errno| PlaceError::Io {
                op,
                path,
                source: errno_io(e),
            }
        };
        if create {
            std::fs::create_dir_all(root).map_err(|source| PlaceError::Io {
                op: "create folder",
                path: root.to_path_buf(),
                source,
            })?;
        }
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(root, flags, Mode::empty()).map_err(io_err("open", root))?;
        let mut dir = SafeDir {
            fd,
            path: root.to_path_buf(),
        };
        for part in rel.components() {
            let name = part.as_os_str();
            let path = dir.path.join(name);
            let open = |d: &SafeDir| {
                nix::fcntl::openat(d.fd.as_fd(), name, flags | OFlag::O_NOFOLLOW, Mode::empty())
            };
            let fd = match open(&dir) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match nix::sys::stat::mkdirat(
                        dir.fd.as_fd(),
                        name,
                        Mode::from_bits_truncate(0o777),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io_err("create folder", &path)(e)),
                    }
                    open(&dir).map_err(|e| dir.explain(name, &path, e, "folder"))?
                }
                Err(e) => return Err(dir.explain(name, &path, e, "folder")),
            };
            dir = SafeDir { fd, path };
        }
        Ok(dir)
    }

    /// The folder's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error opening `name`: a link or a wrong kind of thing is said as such.
    fn explain(
        &self,
        name: &std::ffi::OsStr,
        path: &Path,
        e: Errno,
        kind: &'static str,
    ) -> PlaceError {
        match self.stat(name) {
            Ok(Some(st)) if is_kind(&st, SFlag::S_IFLNK) => PlaceError::Link(path.to_path_buf()),
            Ok(Some(_)) if matches!(e, Errno::ENOTDIR | Errno::ELOOP | Errno::EISDIR) => {
                PlaceError::NotA(path.to_path_buf(), kind)
            }
            _ => PlaceError::Io {
                op: "open",
                path: path.to_path_buf(),
                source: errno_io(e),
            },
        }
    }

    fn stat(&self, name: &std::ffi::OsStr) -> Result<Option<FileStat>, Errno> {
        match nix::sys::stat::fstatat(self.fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The size of the regular file `name` (`None` if there is none); a link or a folder there is an
    /// error.
    pub fn file_size(&self, name: &str) -> Result<Option<u64>, PlaceError> {
        let path = self.path.join(name);
        match self.stat(name.as_ref()) {
            Ok(None) => Ok(None),
            Ok(Some(st)) if is_kind(&st, SFlag::S_IFLNK) => Err(PlaceError::Link(path)),
            Ok(Some(st)) if is_kind(&st, SFlag::S_IFREG) => Ok(Some(st.st_size as u64)),
            Ok(Some(_)) => Err(PlaceError::NotA(path, "file")),
            Err(e) => Err(PlaceError::Io {
                op: "look at",
                path,
                source: errno_io(e),
            }),
        }
    }

    /// Opens (creating) `name` for reading and writing, never through a link; emptied unless `append`.
    pub fn open_rw(&self, name: &str, append: bool) -> Result<std::fs::File, PlaceError> {
        let mut flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        if !append {
            flags |= OFlag::O_TRUNC;
        }
        self.open_file(name, flags, Mode::from_bits_truncate(0o666))
    }

    /// Opens `name` for reading, never through a link.
    pub fn open_read(&self, name: &str) -> Result<std::fs::File, PlaceError> {
        self.open_file(
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    }

    fn open_file(&self, name: &str, flags: OFlag, mode: Mode) -> Result<std::fs::File, PlaceError> {
        let path = self.path.join(name);
        // Not a FIFO or a device either: O_NONBLOCK keeps a FIFO from hanging the open, and the type is
        // checked after.
        let fd = nix::fcntl::openat(self.fd.as_fd(), name, flags | OFlag::O_NONBLOCK, mode)
            .map_err(|e| self.explain(name.as_ref(), &path, e, "file"))?;
        let st = nix::sys::stat::fstat(&fd).map_err(|e| PlaceError::Io {
            op: "look at",
            path: path.clone(),
            source: errno_io(e),
        })?;
        if !is_kind(&st, SFlag::S_IFREG) {
            return Err(PlaceError::NotA(path, "regular file"));
        }
        let file = std::fs::File::from(fd);
        // Back to blocking I/O for a regular file (O_NONBLOCK means nothing for one, but be plain).
        let fl = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| {
            PlaceError::Io {
                op: "open",
                path: path.clone(),
                source: errno_io(e),
            }
        })?;
        let fl = OFlag::from_bits_truncate(fl) & !OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(|e| {
            PlaceError::Io {
                op: "open",
                path,
                source: errno_io(e),
            }
        })?;
        Ok(file)
    }

    /// Removes the file `name` if it is there (a link there is left alone: it is not ours).
    pub fn remove(&self, name: &str) -> Result<(), PlaceError> {
        if self.file_size(name)?.is_none() {
            return Ok(());
        }
        match nix::unistd::unlinkat(
            self.fd.as_fd(),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(PlaceError::Io {
                op: "remove",
                path: self.path.join(name),
                source: errno_io(e),
            }),
        }
    }

    /// Renames `from` to `to` in this folder, replacing a file `to` (never a link or a folder).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), PlaceError> {
        self.file_size(to)?;
        nix::fcntl::renameat(self.fd.as_fd(), from, self.fd.as_fd(), to).map_err(|e| {
            PlaceError::Io {
                op: "publish",
                path: self.path.join(to),
                source: errno_io(e),
            }
        })
    }

    /// Renames `from` to `to` in this folder unless `to` exists (`AlreadyExists` then).
    pub fn rename_no_replace(&self, from: &str, to: &str) -> io::Result<()> {
        use nix::fcntl::RenameFlags;
        match nix::fcntl::renameat2(
            self.fd.as_fd(),
            from,
            self.fd.as_fd(),
            to,
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::EINVAL) => {
                // File systems without RENAME_NOREPLACE: a hard link fails if the name exists.
                nix::unistd::linkat(self.fd.as_fd(), from, self.fd.as_fd(), to, AtFlags::empty())
                    .map_err(errno_io)?;
                nix::unistd::unlinkat(
                    self.fd.as_fd(),
                    from,
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(errno_io)
            }
            Err(e) => Err(errno_io(e)),
        }
    }

    /// Makes the folder's entries durable.
    pub fn fsync(&self) -> Result<(), PlaceError> {
        nix::unistd::fsync(&self.fd).map_err(|e| PlaceError::Io {
            op: "fsync",
            path: self.path.clone(),
            source: errno_io(e),
        })
    }

    /// Bytes free for an unprivileged writer on the folder's file system, and its size.
    pub fn space(&self) -> Option<(u64, u64)> {
        nix::sys::statvfs::fstatvfs(&self.fd)
            .ok()
            .map(|s| free_and_size(&s))
    }
}

/// Bytes free for an unprivileged writer on the file system of `path`, and its size (for a path that may
/// not exist yet or is not ours to open as a `SafeDir`: the download root, seen by the pool and the
/// metrics).
pub fn space_of(path: &Path) -> Option<(u64, u64)> {
    nix::sys::statvfs::statvfs(path)
        .ok()
        .map(|s| free_and_size(&s))
}

fn free_and_size(s: &nix::sys::statvfs::Statvfs) -> (u64, u64) {
    let unit = s.fragment_size();
    (s.blocks_available() * unit, s.blocks() * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_dirs_refuse_links_at_every_level_and_touch_nothing_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), "keep").unwrap();

        let d = SafeDir::open(&root, Path::new("jwst/set"), true).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), d.path().join("f.part")).unwrap();
        let e = d.open_rw("f.part", false).unwrap_err();
        assert!(
            matches!(&e, PlaceError::Link(p) if p.ends_with("jwst/set/f.part")),
            "{e}"
        );
        assert!(matches!(d.file_size("f.part"), Err(PlaceError::Link(_))));
        d.remove("f.part").unwrap_err();
        assert!(
            d.path().join("f.part").symlink_metadata().is_ok(),
            "the link is left alone"
        );

        std::os::unix::fs::symlink(&outside, root.join("jwst/other")).unwrap();
        let e = SafeDir::open(&root, Path::new("jwst/other"), true).unwrap_err();
        assert!(
            matches!(&e, PlaceError::Link(p) if p.ends_with("jwst/other")),
            "{e}"
        );
        std::os::unix::fs::symlink(&outside, root.join("hst")).unwrap();
        let e = SafeDir::open(&root, Path::new("hst/new"), true).unwrap_err();
        assert!(
            matches!(&e, PlaceError::Link(p) if p.ends_with("hst")),
            "{e}"
        );
        assert!(!outside.join("new").exists());
        assert_eq!(
            std::fs::read_to_string(outside.join("victim")).unwrap(),
            "keep"
        );

        let f = d.open_rw("g.part", false).unwrap();
        drop(f);
        d.rename("g.part", "g").unwrap();
        assert!(d.path().join("g").is_file());
        std::fs::write(d.path().join("h.part"), "x").unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), d.path().join("h")).unwrap();
        assert!(matches!(d.rename("h.part", "h"), Err(PlaceError::Link(_))));
        d.fsync().unwrap();
        assert!(d.space().unwrap().0 > 0);
    }

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
