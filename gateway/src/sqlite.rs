//! What every SQLite store of the gateway (findings, approvals, sessions)
//! does the same way: create the file owner-only, open it read-write, WAL
//! with `synchronous = FULL`, and bring the schema up to date by
//! `user_version`.

use std::{
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};

/// Why a store could not be opened; each store maps it to its own error.
#[derive(Debug)]
pub enum OpenError {
    /// The file cannot be used, with the reason in words.
    Unusable(String),
    /// SQLite failed while doing this.
    Sqlite {
        /// What was being done.
        doing: &'static str,
        /// The error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer gateway.
    UnsupportedSchema {
        /// Its `user_version`.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
}

fn sqlite(doing: &'static str) -> impl FnOnce(rusqlite::Error) -> OpenError {
    move |source| OpenError::Sqlite { doing, source }
}

/// Opens (creating if needed) the database at `path`, owner-only (its
/// contents describe jobs' traffic; SQLite gives the -wal and -shm files
/// the database file's mode), in WAL mode with `synchronous = FULL` (WAL's
/// usual NORMAL may lose the last commits on power loss). The directory
/// must exist.
pub fn open_private(path: &Path, busy_timeout: Duration) -> Result<Connection, OpenError> {
    open_private_paged(path, busy_timeout, None)
}

/// [`open_private`], and a database that has no page yet (new) is created
/// with pages of `page_size` bytes (a power of two, 512 to 65,536) instead
/// of SQLite's 4,096. The size is fixed once the database holds a page (in
/// WAL mode for good), so an existing database keeps the size it has.
pub fn open_private_paged(
    path: &Path,
    busy_timeout: Duration,
    page_size: Option<u32>,
) -> Result<Connection, OpenError> {
    let uid = nix::unistd::geteuid();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(OpenError::Unusable(format!("directory {} does not exist", dir.display())));
        }
    }
    if path.is_dir() {
        return Err(OpenError::Unusable("it is a directory".into()));
    }
    // Only ever closes a descriptor of a file this call created, which no
    // connection can hold locks on yet.
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(OpenError::Unusable(e.to_string())),
    }
    // SQLite reports permission problems as "unable to open database file";
    // the OS error says what is actually wrong. access(2), not open+close:
    // closing any descriptor of the file drops every POSIX lock this process
    // holds on it, including those of another connection (the session
    // writer's while the pruner opens its own), after which a reader could
    // delete the WAL under the writer.
    if let Err(e) = nix::unistd::access(path, nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK) {
        return Err(OpenError::Unusable(format!("{e} (uid {uid})")));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| OpenError::Unusable(e.to_string()))?;
    // SQLite silently falls back to read-only for a write-protected file; a
    // store that cannot write must say so now, not at its first write.
    if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false) {
        return Err(OpenError::Unusable(format!("the file is not writable by this user (uid {uid})")));
    }
    conn.busy_timeout(busy_timeout).map_err(sqlite("setting busy_timeout"))?;
    if let Some(size) = page_size {
        // Before WAL is enabled: that writes the first page, which fixes the size.
        let pages: i64 =
            conn.pragma_query_value(None, "page_count", |row| row.get(0)).map_err(sqlite("reading the page count"))?;
        if pages == 0 {
            conn.pragma_update(None, "page_size", size).map_err(sqlite("setting the page size"))?;
        }
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| match e.sqlite_error_code() {
            Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen) => OpenError::Unusable(format!(
                "{e}: SQLite must create the -wal and -shm files next to it; is the directory writable by this user (uid {uid})?"
            )),
            _ => OpenError::Sqlite { doing: "enabling WAL", source: e },
        })?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::Unusable(format!("cannot enable WAL journaling (journal_mode is {mode})")));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(sqlite("setting synchronous"))?;
    Ok(conn)
}

/// One schema migration.
#[derive(Clone, Copy)]
pub enum Migration {
    /// Statements run as one batch.
    Sql(&'static str),
    /// Code, for what SQL cannot say (re-encoding rows); it runs inside the
    /// migration's transaction.
    Code(fn(&Connection) -> rusqlite::Result<()>),
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Migration::Sql(sql) => f.debug_tuple("Sql").field(sql).finish(),
            Migration::Code(_) => f.write_str("Code(..)"),
        }
    }
}

/// Applies the `migrations` the database has not seen yet (`user_version`
/// counts those applied), in one immediate transaction.
pub fn migrate(conn: &Connection, migrations: &[&'static str]) -> Result<(), OpenError> {
    let steps: Vec<Migration> = migrations.iter().map(|sql| Migration::Sql(sql)).collect();
    migrate_steps(conn, &steps)
}

/// [`migrate`], with steps that may be code.
pub fn migrate_steps(conn: &Connection, migrations: &[Migration]) -> Result<(), OpenError> {
    let supported = migrations.len() as i64;
    let version = |conn: &Connection| -> Result<i64, OpenError> {
        conn.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(sqlite("reading the schema version"))
    };
    if version(conn)? == supported {
        return Ok(());
    }
    let tx =
        Transaction::new_unchecked(conn, TransactionBehavior::Immediate).map_err(sqlite("starting a transaction"))?;
    // Read again under the write lock: another process may have migrated
    // between the first read and the lock.
    let found = version(&tx)?;
    if !(0..=supported).contains(&found) {
        return Err(OpenError::UnsupportedSchema { found, supported });
    }
    let start = usize::try_from(found).unwrap_or(0);
    for (i, step) in migrations.iter().enumerate().skip(start) {
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql),
            Migration::Code(run) => run(&tx),
        }
        .map_err(sqlite("creating the schema"))?;
        tx.pragma_update(None, "user_version", i as i64 + 1).map_err(sqlite("setting the schema version"))?;
    }
    tx.commit().map_err(sqlite("committing the schema"))
}

/// Which file a store opened (device and inode), to notice it being
/// replaced or moved away under the open connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        let meta = std::fs::metadata(path)?;
        Ok(FileId { dev: meta.dev(), ino: meta.ino() })
    }
}

/// How a store's files were found damaged under its open connection.
///
/// SQLite does not notice these by itself: its page cache and the
/// write-ahead log it still holds open (unlinked) let commits succeed into
/// files nobody will ever read again. The stores check before and after
/// each commit. (Garbage written over the file in place, its log intact, is
/// SQLite's to notice: it reports the file corrupt when it reads a damaged
/// page. Reading the header here would mean opening the file, and closing
/// that descriptor would drop the POSIX locks SQLite holds on it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// Its write-ahead log was deleted while the connection had it open:
    /// what is committed into it is lost when the connection closes.
    #[error("its write-ahead log ({}) was deleted under the open connection", .0.suffix())]
    LogGone(LogFile),
    /// Nothing is at the path any more (moved away or deleted).
    #[error("the file was moved away or deleted")]
    Gone,
    /// Another file is at the path now (moved in, restored).
    #[error("another file was put at its path")]
    Replaced,
}

/// One of the files SQLite keeps next to a WAL-mode database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFile {
    /// The write-ahead log.
    Wal,
    /// Its shared-memory index.
    Shm,
}

impl LogFile {
    fn suffix(self) -> &'static str {
        match self {
            LogFile::Wal => "-wal",
            LogFile::Shm => "-shm",
        }
    }
}

impl Damage {
    /// Whether the path now holds another file or none: the store can be
    /// opened again there (someone moved the damaged file aside or restored
    /// one). Damage in place waits for the operator.
    pub fn reopenable(self) -> bool {
        matches!(self, Damage::Gone | Damage::Replaced)
    }
}

/// Checks that `path` is still the SQLite file `opened` (WAL mode, with a
/// connection open: SQLite keeps its -wal and -shm until the last
/// connection closes), with its -wal and -shm. Only metadata is read (see
/// [`Damage`]); other I/O errors are left to SQLite, which reports them on use.
pub fn check_files(path: &Path, opened: FileId) -> Result<(), Damage> {
    match FileId::of(path) {
        Ok(now) if now != opened => return Err(Damage::Replaced),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Damage::Gone),
        Err(_) => return Ok(()),
    }
    for log in [LogFile::Wal, LogFile::Shm] {
        let mut name = path.as_os_str().to_owned();
        name.push(log.suffix());
        if let Err(e) = std::fs::symlink_metadata(PathBuf::from(name)) {
            if e.kind() == std::io::ErrorKind::NotFound {
                return Err(Damage::LogGone(log));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_owner_only_wal_and_migrates_once() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.db");
        let migrations = ["CREATE TABLE a (x INTEGER);", "CREATE TABLE b (y INTEGER);"];
        let conn = open_private(&path, Duration::from_secs(1)).expect("open");
        migrate(&conn, &migrations).expect("migrate");
        migrate(&conn, &migrations).expect("migrating again is a no-op");
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).expect("version");
        assert_eq!(version, 2);
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let newer = migrate(&conn, &migrations[..1]).expect_err("a newer schema is refused");
        assert!(matches!(newer, OpenError::UnsupportedSchema { found: 2, supported: 1 }), "{newer:?}");
        assert!(matches!(open_private(dir.path(), Duration::from_secs(1)), Err(OpenError::Unusable(_))));
        let missing = dir.path().join("nope").join("x.db");
        assert!(matches!(open_private(&missing, Duration::from_secs(1)), Err(OpenError::Unusable(_))));
    }

    /// Opening a second connection in the same process must not drop the
    /// first one's POSIX locks: otherwise another process that opens and
    /// closes the database thinks it was the last user and deletes the WAL
    /// the first connection still writes to (committed records vanish).
    #[test]
    fn a_second_connection_keeps_the_first_ones_locks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.db");
        let writer = open_private(&path, Duration::from_secs(1)).expect("open");
        migrate(&writer, &["CREATE TABLE t (x INTEGER);"]).expect("migrate");
        writer.execute("INSERT INTO t VALUES (1)", []).expect("insert");
        drop(open_private(&path, Duration::from_secs(1)).expect("second connection"));
        let script = format!(
            "import sqlite3; c=sqlite3.connect('{}'); c.execute('select count(*) from t').fetchone(); c.close()",
            path.display()
        );
        let status = std::process::Command::new("python3").arg("-c").arg(&script).status().expect("python3");
        assert!(status.success());
        let wal = dir.path().join("x.db-wal");
        assert!(wal.exists(), "another process deleted the WAL of a live connection");
        writer.execute("INSERT INTO t VALUES (2)", []).expect("insert after");
        let n: i64 = writer.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("count");
        assert_eq!(n, 2);
    }
}
