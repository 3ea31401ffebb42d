//! One recording gateway per database, and telling live sessions from
//! interrupted ones.
//!
//! The writer holds an exclusive `flock` on `<database>-writer.lock` for as
//! long as it runs and writes its start time into it. The kernel drops the
//! lock when the process dies, however it dies, so a reader that finds the
//! lock free knows every session without an end was interrupted; if the lock
//! is held, unended sessions started since the holder's start are live.

use std::{
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use super::{model::nanos, RecordError};

/// A held writer lock; released when dropped (or when the process dies).
pub(crate) struct WriterLock {
    _file: Flock<File>,
    /// When this writer started, Unix nanoseconds.
    pub(crate) since: i64,
}

impl std::fmt::Debug for WriterLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterLock").field("since", &self.since).finish_non_exhaustive()
    }
}

/// How long `acquire` retries: a reader holds the lock (shared) for
/// microseconds while it checks liveness.
const ACQUIRE_TRIES: u32 = 40;
const ACQUIRE_PAUSE: Duration = Duration::from_millis(25);

fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-writer.lock");
    PathBuf::from(name)
}

/// Takes the writer lock of `database`, or says who holds it.
pub(crate) fn acquire(database: &Path) -> Result<WriterLock, RecordError> {
    let path = lock_path(database);
    let open_err = |reason: String| RecordError::Open { path: database.to_owned(), reason };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| open_err(format!("{}: {e}", path.display())))?;
    let mut tries = 0;
    let mut locked = loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => break locked,
            Err((f, Errno::EWOULDBLOCK)) if tries < ACQUIRE_TRIES => {
                file = f;
                tries += 1;
                std::thread::sleep(ACQUIRE_PAUSE);
            }
            Err((mut f, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                return Err(RecordError::Locked { path: database.to_owned(), holder: holder.trim().to_owned() });
            }
            Err((_, errno)) => return Err(open_err(format!("{}: cannot lock: {errno}", path.display()))),
        }
    };
    let since = nanos(SystemTime::now());
    let stamp = format!("pid {} since {since}\n", std::process::id());
    locked
        .set_len(0)
        .and_then(|()| locked.rewind())
        .and_then(|()| locked.write_all(stamp.as_bytes()))
        .map_err(|e| open_err(format!("{}: {e}", path.display())))?;
    Ok(WriterLock { _file: locked, since })
}

/// If a gateway is recording into `database`, when it started (Unix
/// nanoseconds); `None` if none is.
pub(crate) fn live_since(database: &Path) -> Option<i64> {
    let file = File::open(lock_path(database)).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Free: nobody records. Dropping the guard unlocks at once.
        Ok(_free) => None,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut stamp = String::new();
            let _ = file.read_to_string(&mut stamp);
            // A holder that has not written its stamp yet has just started:
            // none of the sessions in the database are its own.
            Some(
                stamp
                    .split_whitespace()
                    .skip_while(|w| *w != "since")
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(i64::MAX),
            )
        }
        Err(_) => None,
    }
}
