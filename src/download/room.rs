//! `download.min_free_space`: no body is written while it would leave the download file system with
//! less than that free.
//!
//! A product's size is known when its answer's headers arrive (Content-Length, or a 206's total); the
//! attempt asks for room then, before its first byte is written, and without an extra request. Several
//! workers start at once, so free space alone would let each of them take the same room: what running
//! attempts will still write is reserved here and counted as taken, and each reservation shrinks as its
//! bytes reach the disk (and so leave the free space). An attempt refused room ends as
//! [`FetchError::NoRoom`](super::error::FetchError::NoRoom), which the policy turns into a wait, never a
//! failure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Room that counts as having appeared: the file system has this much more free than when an attempt
/// was refused.
const GREW: u64 = 1024 * 1024;

/// The room still promised to running attempts, and the floor of free space.
#[derive(Debug)]
pub struct Room {
    /// `download.min_free_space`, in bytes.
    min_free: AtomicU64,
    /// Bytes that admitted attempts have yet to write.
    promised: Mutex<u64>,
    /// Set when an attempt was refused room: the pool claims nothing until room appears or the wait is
    /// over, so that a full disk costs MAST a few requests per wait, not one per queued job.
    blocked: AtomicBool,
    block: Mutex<Option<Block>>,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    /// The wait ends then (the pool claims again: at most a worker's worth of attempts ask).
    until: Instant,
    /// What the file system had free when the attempt was refused.
    free: u64,
}

/// How a wait for room ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unblocked {
    /// Room appeared: the jobs waiting for it may all ask again now.
    RoomAppeared,
    /// The wait is over: the jobs ask again as their times come.
    WaitOver,
}

/// Room promised to one attempt; given back as its bytes are written, and the rest when dropped.
#[derive(Debug)]
pub struct Reservation {
    room: Arc<Room>,
    left: u64,
}

/// Why room was refused: the bytes free for the attempt (what the file system has, less what is promised
/// to others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// See above.
    pub free: u64,
}

impl Room {
    /// The floor is `min_free` bytes (0: no guard).
    pub fn new(min_free: u64) -> Arc<Room> {
        Arc::new(Room {
            min_free: AtomicU64::new(min_free),
            promised: Mutex::new(0),
            blocked: AtomicBool::new(false),
            block: Mutex::new(None),
        })
    }

    /// An attempt was refused room on a file system with `free` bytes: claims stop for `wait`.
    pub fn block(&self, free: u64, wait: Duration) {
        let mut b = self.block.lock().unwrap_or_else(|e| e.into_inner());
        *b = Some(Block {
            until: Instant::now() + wait,
            free,
        });
        self.blocked.store(true, Ordering::Relaxed);
    }

    /// Whether claims wait for room.
    pub fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }

    /// Ends the wait if room appeared (the file system now has `free_now` bytes free) or its time is
    /// over; says which.
    pub fn check(&self, free_now: Option<u64>) -> Option<Unblocked> {
        let mut b = self.block.lock().unwrap_or_else(|e| e.into_inner());
        let block = (*b)?;
        let how = if free_now.is_some_and(|f| f >= block.free.saturating_add(GREW)) {
            Unblocked::RoomAppeared
        } else if Instant::now() >= block.until {
            Unblocked::WaitOver
        } else {
            return None;
        };
        *b = None;
        self.blocked.store(false, Ordering::Relaxed);
        Some(how)
    }

    /// `download.min_free_space`.
    pub fn min_free(&self) -> u64 {
        self.min_free.load(Ordering::Relaxed)
    }

    /// Room for `needed` more bytes on a file system with `free` bytes available, or why not.
    pub fn admit(self: &Arc<Self>, free: u64, needed: u64) -> Result<Reservation, Refused> {
        let mut promised = self.promised.lock().unwrap_or_else(|e| e.into_inner());
        let available = free.saturating_sub(*promised);
        if available < needed.saturating_add(self.min_free()) {
            return Err(Refused { free: available });
        }
        *promised += needed;
        Ok(Reservation {
            room: self.clone(),
            left: needed,
        })
    }
}

impl Reservation {
    /// `bytes` of it were written: they are no longer free space, so no longer promised.
    pub fn wrote(&mut self, bytes: u64) {
        let n = bytes.min(self.left);
        if n > 0 {
            self.left -= n;
            let mut promised = self.room.promised.lock().unwrap_or_else(|e| e.into_inner());
            *promised = promised.saturating_sub(n);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let left = self.left;
        self.wrote(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_promised_to_one_attempt_is_not_given_to_another_until_written_or_dropped() {
        let room = Room::new(100);
        // 1,000 free: 800 and the floor of 100 fit...
        let mut first = room.admit(1_000, 800).unwrap();
        // ...but a second 800 does not, though the disk still shows 1,000 free.
        assert_eq!(room.admit(1_000, 800).unwrap_err(), Refused { free: 200 });
        // 100 and the floor fit (and the room is given back at once).
        assert!(room.admit(1_000, 100).is_ok());
        // Half written: the disk shows 600 free and 400 is still promised.
        first.wrote(400);
        assert_eq!(room.admit(600, 150).unwrap_err(), Refused { free: 200 });
        assert!(room.admit(600, 100).is_ok());
        drop(first);
        assert!(room.admit(600, 500).is_ok(), "all given back");
    }

    #[test]
    fn a_refusal_stops_claims_until_room_appears_or_the_wait_is_over() {
        let room = Room::new(0);
        assert!(!room.is_blocked());
        room.block(10 * GREW, Duration::from_secs(3600));
        assert!(room.is_blocked());
        assert_eq!(room.check(Some(10 * GREW + 1)), None, "a byte is not room");
        assert_eq!(room.check(None), None);
        assert_eq!(room.check(Some(11 * GREW)), Some(Unblocked::RoomAppeared));
        assert!(!room.is_blocked());
        room.block(0, Duration::ZERO);
        assert_eq!(room.check(Some(0)), Some(Unblocked::WaitOver));
        assert_eq!(room.check(Some(0)), None, "not blocked any more");
    }

    #[test]
    fn no_floor_and_no_size_always_fit_on_a_disk_with_anything_free() {
        let room = Room::new(0);
        assert!(room.admit(1, 0).is_ok());
        assert!(room.admit(0, 0).is_ok());
        assert!(room.admit(0, 1).is_err());
    }
}
