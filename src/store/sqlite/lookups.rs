//! The cache-miss read, `lookup`, on its own connections: rusqlite, one prepared statement
//! per connection, run on the calling thread. Through sqlx every SQLite query is two
//! hand-offs to the connection's own thread; for a point read of one indexed row that was
//! most of the cost of a cache miss. Each connection keeps its statement beside it rather
//! than in rusqlite's statement cache, which hashes the SQL text twice per use.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::store::AuthRecord;

const LOOKUP: &str = "SELECT active, scopes, owner, expires_at, master_key_id FROM api_credential \
                      WHERE api_key = ?1";

/// The lookup statement of a [`Reader`], prepared on its connection.
type Lookup<'conn> = rusqlite::Statement<'conn>;

self_cell::self_cell!(
    /// A read-only connection and its prepared lookup.
    struct Reader {
        owner: Connection,
        #[covariant]
        dependent: Lookup,
    }
);

// SAFETY: a `Statement` is not `Send` only because it borrows its `Connection`, which is
// `Send` but not `Sync`. Here the connection and its one statement live and move together
// in the cell, and nothing else borrows the connection: moving the pair to another thread
// leaves no reference behind, as rusqlite's own statement cache (`Send`) does with its
// statements. Connections are opened with `SQLITE_OPEN_NO_MUTEX` (SQLite's multi-thread
// mode), which allows a connection on any thread, one thread at a time.
unsafe impl Send for Reader {}

/// A small pool of read-only connections for `lookup`.
pub(super) struct Lookups {
    path: PathBuf,
    /// Idle connections; a lookup takes one, or opens one when none is idle.
    idle: Mutex<Vec<Reader>>,
    /// Most idle connections kept.
    keep: usize,
    busy_timeout: Duration,
    closed: AtomicBool,
}

impl Lookups {
    /// Opens one connection now, so a missing or unreadable file fails at start.
    pub(super) fn open(path: &Path, keep: usize, busy_timeout: Duration) -> rusqlite::Result<Self> {
        let lookups = Self {
            path: path.to_owned(),
            idle: Mutex::new(Vec::with_capacity(keep)),
            keep: keep.max(1),
            busy_timeout,
            closed: AtomicBool::new(false),
        };
        let first = lookups.connect()?;
        lookups.idle().push(first);
        Ok(lookups)
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Reader>> {
        // A vector of connections: a panic elsewhere cannot leave it half-updated.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connect(&self) -> rusqlite::Result<Reader> {
        // Never creates the file: a deleted database is an error, not a fresh empty one.
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        // Reads only; a small page cache of its own, as the OS page cache holds the file (a
        // 4 MiB cache measured no faster: a lookup's two leaf pages are rarely cached anyway).
        conn.pragma_update(None, "query_only", true)?;
        conn.pragma_update(None, "cache_size", super::READER_CACHE_KIB)?;
        Reader::try_new(conn, |conn| conn.prepare(LOOKUP))
    }

    /// What authentication needs of `key`; `None` when it was never registered.
    pub(super) fn lookup(&self, key: &str) -> rusqlite::Result<Option<AuthRecord>> {
        let taken = self.idle().pop();
        let mut reader = match taken {
            Some(reader) => reader,
            None => self.connect()?,
        };
        let found = reader.with_dependent_mut(|_, statement| {
            statement
                .query_row([key], |row| {
                    Ok(AuthRecord {
                        active: row.get(0)?,
                        scopes: row.get(1)?,
                        owner: row.get(2)?,
                        expires_at: row
                            .get::<_, Option<String>>(3)?
                            .map(|text| parse_time(&text))
                            .transpose()
                            .map_err(|e| {
                                rusqlite::Error::FromSqlConversionFailure(
                                    3,
                                    rusqlite::types::Type::Text,
                                    e.into(),
                                )
                            })?,
                        master_key_id: row.get(4)?,
                    })
                })
                .optional()
        });
        // A connection whose query failed is dropped: the next lookup opens a fresh one
        // (the file may have been replaced, or a lock left behind).
        if found.is_ok() && !self.closed.load(Ordering::Acquire) {
            let mut idle = self.idle();
            if idle.len() < self.keep {
                idle.push(reader);
            }
        }
        found
    }

    /// Closes every idle connection; lookups after it open and drop their own.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.idle().clear();
    }
}

/// A stored time, in the formats SQLite's date functions and sqlx write: RFC 3339 (what
/// credgate writes), or `YYYY-MM-DD HH:MM:SS[.fff]` in UTC (what an operator's
/// `datetime('now', '+1 day')` writes).
pub(super) fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(t) = DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%:z") {
        return Ok(t.with_timezone(&Utc));
    }
    Err(format!("{text:?} is not a time"))
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn stored_times_are_read_in_every_format_sqlite_writes() {
        let at = "2030-01-02T03:04:05Z";
        let expect = chrono::DateTime::parse_from_rfc3339(at).map(|t| t.to_utc());
        for text in [
            "2030-01-02T03:04:05Z",
            "2030-01-02T03:04:05.000Z",
            "2030-01-02T05:04:05+02:00",
            "2030-01-02 03:04:05",
            "2030-01-02 03:04:05.000",
            "2030-01-02T03:04:05",
            "2030-01-02 05:04:05+02:00",
        ] {
            assert_eq!(parse_time(text).ok(), expect.ok(), "{text}");
        }
        assert!(parse_time("tomorrow").is_err());
        assert!(parse_time("").is_err());
    }
}
