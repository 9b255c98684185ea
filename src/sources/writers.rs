//! Whether any process holds a file open for writing, told from facts (on Linux), not from the file's age.
//!
//! First a read lease, `fcntl(F_SETLEASE, F_RDLCK)`: the kernel grants it exactly when nothing on this host
//! has the file open for writing (a descriptor, or a shared writable mapping made from one), refuses it
//! with EAGAIN when something does (or holds a write lease on it), and it is released at once. It needs the
//! file's owner or CAP_LEASE, and a file system with leases (EACCES, EPERM, EINVAL otherwise). Where it is
//! refused, `/proc/[pid]/fd` (with the `flags:` of `/proc/[pid]/fdinfo`) and `/proc/[pid]/maps` of every
//! process are looked at; that tells only if every process can be seen and read. Neither sees a writer on
//! another host, so on a network (or FUSE) file system "no writer" is never concluded.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::libc;

/// `F_SETSIG` of `<linux/fcntl.h>` (10 on every architecture); the libc crate has it only for musl.
const F_SETSIG: libc::c_int = 10;
/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`): from it, every process is in /proc.
const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";

/// File systems whose files other hosts (or a user-space server) may write: magic numbers of statfs(2).
const SHARED_FILE_SYSTEMS: &[u32] = &[
    0x6969,      // NFS
    0x517B,      // SMB
    0xFF53_4D42, // CIFS
    0xFE53_4D42, // SMB2
    0x6573_5546, // FUSE (sshfs, rclone, virtiofs, ...)
    0x0102_1997, // 9p
    0x00C3_6400, // Ceph
    0x5346_414F, // AFS
    0x6B41_4653, // kAFS
    0x7375_7245, // Coda
    0x0116_1970, // GFS2
    0x7461_636F, // OCFS2
    0x0BD0_0BD0, // Lustre
    0x2003_0528, // OrangeFS
    0x4750_4653, // GPFS
    0x786F_4256, // vboxsf
];

/// Opens `path` (read-only, not through a link, never blocking: a FIFO or a leased file must not hold
/// the inbox up) and asks [`open_for_writing`]. `None` if it cannot be opened.
pub(crate) fn writer_of(path: &Path) -> Option<bool> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    match file {
        Ok(file) => open_for_writing(path, &file),
        Err(e) => {
            tracing::debug!(
                "{}: cannot open it to ask about writers: {e}",
                path.display()
            );
            None
        }
    }
}

/// `Some(false)` when it is certain that no process holds `file` (opened read-only from `path`) open for
/// writing, `Some(true)` when one does, `None` when it cannot be told. Our own read-only descriptor is
/// not a writer.
pub(crate) fn open_for_writing(path: &Path, file: &File) -> Option<bool> {
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let answer = match read_lease(file) {
        Lease::Granted => Some(false),
        Lease::Refused => Some(true),
        Lease::Unavailable(e) => {
            tracing::debug!(
                "{}: no read lease ({e}); looking in /proc for a writer",
                path.display()
            );
            from_proc(path, meta.dev(), meta.ino())
        }
    };
    if answer == Some(false) && on_shared_file_system(file) {
        tracing::debug!(
            "{}: no writer on this host, but it is on a network file system",
            path.display()
        );
        return None;
    }
    answer
}

enum Lease {
    /// Granted (and released): nothing holds the file open for writing.
    Granted,
    /// EAGAIN: something holds it open for writing (or holds a write lease on it).
    Refused,
    /// Not ours to take (EACCES, EPERM), or no leases on this file system (EINVAL).
    Unavailable(io::Error),
}

fn read_lease(file: &File) -> Lease {
    let fd = file.as_raw_fd();
    // While the lease is held (two system calls), a process opening the file for writing makes the
    // kernel signal the holder: SIGIO by default, which would end the daemon. SIGURG is asked for
    // instead: ignored by default and handled nowhere in mastsub, it is dropped. The opener waits only
    // until the lease is released just below (or gets EWOULDBLOCK if it opens with O_NONBLOCK).
    // SAFETY: fcntl with integer arguments only, on a descriptor `file` keeps open throughout.
    if unsafe { libc::fcntl(fd, F_SETSIG, libc::SIGURG) } == -1 {
        return Lease::Unavailable(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } == 0 {
        // SAFETY: as above. Should this fail, closing `file` releases the lease all the same.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Lease::Granted;
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EAGAIN) {
        Lease::Refused
    } else {
        Lease::Unavailable(e)
    }
}

fn on_shared_file_system(file: &File) -> bool {
    match nix::sys::statfs::fstatfs(file) {
        // Magic numbers are 32 bits; f_type is signed on some targets.
        Ok(fs) => SHARED_FILE_SYSTEMS.contains(&(fs.filesystem_type().0 as u32)),
        Err(_) => true,
    }
}

/// The answer of `/proc` for the file (`dev`, `ino`): a writer found, or none among every process.
fn from_proc(path: &Path, dev: u64, ino: u64) -> Option<bool> {
    let look = match look_in_proc(Path::new("/proc"), dev, ino) {
        Ok(look) => look,
        Err(e) => {
            tracing::debug!("{}: cannot read /proc: {e}", path.display());
            return None;
        }
    };
    if let Some(pid) = look.writer {
        tracing::debug!(
            "{}: process {pid} holds it open for writing",
            path.display()
        );
        return Some(true);
    }
    if look.unreadable > 0 {
        tracing::debug!(
            "{}: no writer among the processes mastsub may look at, but {} it may not",
            path.display(),
            look.unreadable
        );
        return None;
    }
    if !sees_every_process() {
        tracing::debug!(
            "{}: no writer in /proc, but this /proc does not show every process (a PID namespace, \
             or hidepid)",
            path.display()
        );
        return None;
    }
    Some(false)
}

/// What a walk through `/proc` found.
#[derive(Debug, Default)]
pub(crate) struct ProcLook {
    /// A process holding the file open for writing (the first found).
    pub writer: Option<u32>,
    /// Processes whose descriptors or mappings could not be read (not ours, or hidden).
    pub unreadable: usize,
}

/// Walks `/proc/[pid]` of every process for a descriptor open for writing (or a shared writable
/// mapping) on the file (`dev`, `ino`); stops at the first.
pub(crate) fn look_in_proc(proc: &Path, dev: u64, ino: u64) -> io::Result<ProcLook> {
    let mut look = ProcLook::default();
    for entry in std::fs::read_dir(proc)? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        match process_writes(&entry.path(), dev, ino) {
            Ok(false) => {}
            Ok(true) => {
                look.writer = Some(pid);
                return Ok(look);
            }
            // Ended meanwhile: it writes nothing any more.
            Err(e) if gone(&e) => {}
            Err(_) => look.unreadable += 1,
        }
    }
    Ok(look)
}

/// The process ended while it was looked at (or its descriptor was closed).
fn gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Whether the process at `/proc/[pid]` (`base`) writes the file (`dev`, `ino`).
fn process_writes(base: &Path, dev: u64, ino: u64) -> io::Result<bool> {
    for fd in std::fs::read_dir(base.join("fd"))? {
        let fd = fd?;
        let link = fd.path();
        // Files only: sockets, pipes and anonymous inodes are named `socket:[...]` and so on.
        match std::fs::read_link(&link) {
            Ok(target) if target.as_os_str().as_bytes().starts_with(b"/") => {}
            Ok(_) => continue,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        }
        let meta = match std::fs::metadata(&link) {
            Ok(meta) => meta,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        if (meta.dev(), meta.ino()) != (dev, ino) {
            continue;
        }
        match fd_flags(&base.join("fdinfo").join(fd.file_name())) {
            Ok(flags) if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 => {
                return Ok(true);
            }
            Ok(_) => {}
            Err(e) if gone(&e) => {}
            Err(e) => return Err(e),
        }
    }
    // A shared writable mapping outlives the descriptor it was made from, and still writes the file.
    let maps = std::fs::read_to_string(base.join("maps"))?;
    Ok(maps_write(&maps, ino))
}

/// The `flags:` line of a `/proc/[pid]/fdinfo/[fd]` file (octal).
fn fd_flags(fdinfo: &Path) -> io::Result<u32> {
    let text = std::fs::read_to_string(fdinfo)?;
    text.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .ok_or_else(|| io::Error::other(format!("no flags in {}", fdinfo.display())))
}

/// Whether `/proc/[pid]/maps` text holds a shared writable mapping of inode `ino`. The device is not
/// compared (for some file systems, btrfs among them, maps shows another one than stat): a match on the
/// inode alone can only make a file wait, never take one too early.
pub(crate) fn maps_write(maps: &str, ino: u64) -> bool {
    maps.lines().any(|line| {
        let mut fields = line.split_ascii_whitespace();
        let perms = fields.nth(1).unwrap_or("").as_bytes();
        let inode = fields.nth(2).and_then(|i| i.parse::<u64>().ok());
        perms.get(1) == Some(&b'w') && perms.get(3) == Some(&b's') && inode == Some(ino)
    })
}

/// Whether this `/proc` shows every process of the host: the initial PID namespace (a container sees
/// only its own), and a `/proc` mounted without `hidepid` (systemd's `ProtectProc=`).
fn sees_every_process() -> bool {
    std::fs::read_link("/proc/self/ns/pid").is_ok_and(|ns| ns.as_os_str() == INITIAL_PID_NAMESPACE)
        && std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| proc_shows_every_pid(&m))
}

/// Whether the last `/proc` mount in `mountinfo` text has no `hidepid` (other than 0 / off).
pub(crate) fn proc_shows_every_pid(mountinfo: &str) -> bool {
    let options = mountinfo.lines().rev().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (mount.split(' ').nth(4)? == "/proc").then(|| fs.split(' ').nth(2).unwrap_or(""))
    });
    options.is_some_and(|options| {
        !options.split(',').any(|o| {
            o.strip_prefix("hidepid=")
                .is_some_and(|v| v != "0" && v != "off")
        })
    })
}
