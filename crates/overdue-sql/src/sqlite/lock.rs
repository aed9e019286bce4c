//! The single-process lock: an exclusive advisory lock on `<database>.lock`.
//!
//! An embedded SQLite store is used by one overdue process at a time. SQLite itself would let
//! two processes share the file, but then neither could know that the other holds no claims,
//! and the store could not clear stale leases at open. The lock makes that knowledge true:
//! while it is held no other overdue process has the database open, and when a process dies
//! (even by `kill -9`) the OS releases the lock with its file descriptors.
//!
//! The lock is `std::fs::File::try_lock` (`flock(LOCK_EX | LOCK_NB)` on Unix, `LockFileEx` on
//! Windows). It is per open file, so a second open of the same database inside one process is
//! refused too. The holder's process id is written into the file for the error message.

use std::ffi::OsString;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use overdue_core::{Error, Result};

use super::BACKEND;

/// Pause between attempts while another process holds the lock.
const LOCK_RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// Held for the life of the store; dropping it (closing the file) releases the lock.
#[derive(Debug)]
pub(crate) struct ProcessLock {
    _file: File,
    path: PathBuf,
}

impl ProcessLock {
    /// The lock file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// The process lock file of a database: `<database>.lock`, next to it.
pub fn lock_path(db: &Path) -> PathBuf {
    let mut name = OsString::from(db.as_os_str());
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the lock for `db`, retrying for up to `timeout`.
pub(crate) fn acquire(db: &Path, timeout: Duration) -> Result<ProcessLock> {
    let path = lock_path(db);
    let io_error = |what: &str, e: std::io::Error| {
        Error::store(BACKEND, format!("{what} lock file {}: {e}", path.display()), false, e)
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_error("cannot open", e))?;
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {
                let waited = started.elapsed();
                if waited >= timeout {
                    let holder = read_holder(&mut file);
                    return Err(Error::Store {
                        backend: BACKEND,
                        message: format!(
                            "database {} is in use by another overdue process{holder}: lock file {} \
                             still held after waiting {waited:.1?}; an embedded sqlite store serves one \
                             process at a time",
                            db.display(),
                            path.display(),
                        ),
                        transient: false,
                        source: None,
                    });
                }
                std::thread::sleep(LOCK_RETRY_INTERVAL.min(timeout - waited));
            }
            Err(TryLockError::Error(e)) => return Err(io_error("cannot lock", e)),
        }
    }
    // Best effort: record who holds the lock, for the next process's error message.
    let pid = std::process::id().to_string();
    let recorded = file
        .set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(pid.as_bytes()));
    if let Err(e) = recorded {
        tracing::debug!(error = %e, lock = %path.display(), "could not record the pid in the lock file");
    }
    Ok(ProcessLock { _file: file, path })
}

/// ` (pid N)` if the lock file names its holder.
fn read_holder(file: &mut File) -> String {
    let mut text = String::new();
    match file.seek(SeekFrom::Start(0)).and_then(|_| file.take(32).read_to_string(&mut text)) {
        Ok(_) if !text.trim().is_empty() && text.trim().bytes().all(|b| b.is_ascii_digit()) => {
            format!(" (pid {})", text.trim())
        }
        _ => String::new(),
    }
}
