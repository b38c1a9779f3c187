//! The embedded SQLite backend: WAL, `synchronous = FULL`, and group commit.
//!
//! Writes go through one writer thread that owns one connection and commits every write that
//! is waiting in a single transaction (one fsync for the batch); each caller is answered only
//! after that commit ([`writer`]). Reads use a small pool; the cache-miss read has its own
//! connections ([`lookups`]). A watcher polls `PRAGMA data_version` and, when another
//! connection committed, reads the `api_credential_change` log to drop changed keys.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::{broadcast, oneshot};

use super::{
    AbortOnDrop, AuthRecord, CHANGE_FEED_CAPACITY, Change, CredentialRecord, CredentialRow,
    CredentialStore, ListQuery, NewCredential, Registration, Revocation, Rolled, StoreError,
    Update, Updated, select_credential, timed,
};
use crate::attributes::format_time;
use crate::audit::{Event, EventQuery, Origin};
use crate::credential::ApiKey;
use crate::telemetry::Metrics;
use chrono::{DateTime, Utc};
use writer::{EventRow, Message, Roll, RowText, WriteOp, encode};

mod lookups;
mod writer;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Page cache of each read connection, as SQLite's `cache_size` (negative: KiB).
const READER_CACHE_KIB: i64 = -256;

/// Tuning for [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Read connections.
    pub read_connections: u32,
    /// Most writes committed in one transaction.
    pub max_batch: usize,
    /// How often the change watcher asks SQLite whether another connection committed.
    pub change_poll_interval: Duration,
    /// How long a statement waits for a lock before failing.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            read_connections: 8,
            max_batch: 512,
            change_poll_interval: Duration::from_millis(100),
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// Credentials in one SQLite file.
pub struct SqliteStore {
    reads: SqlitePool,
    /// The writer thread's queue.
    writes: std::sync::mpsc::Sender<Message>,
    /// Set by `close` before it tells the writer to finish: later writes are refused.
    closing: AtomicBool,
    /// Cleared by the writer thread when it ends, however it ends.
    writer_running: Arc<AtomicBool>,
    /// Answered when the writer thread has committed what it accepted and ended.
    writer_done: std::sync::Mutex<Option<oneshot::Receiver<()>>>,
    /// Whether the last write committed; shared with the writer so `/ready` tells the
    /// truth about writes, not only about reads.
    health: Arc<WriteHealth>,
    /// The file opened at start: a file deleted or replaced under us is noticed.
    file: Arc<FileIdentity>,
    /// For a probe write on a connection of its own (`check_writable`).
    busy_timeout: Duration,
    changes: broadcast::Sender<Change>,
    /// The change watcher, started by the first subscriber (a command-line tool that only
    /// reads or writes has none) and stopped with the store.
    watcher: OnceLock<AbortOnDrop>,
    /// The change log's last entry when the store opened: the watcher reports everything
    /// after it, so no change between opening and its first poll is missed.
    opened_at_seq: i64,
    change_poll_interval: Duration,
    /// For connections made after opening: never creates the file.
    connect: SqliteConnectOptions,
    /// The cache-miss read's own connections.
    lookups: Arc<lookups::Lookups>,
    /// Its latency histogram (`op="state"`), resolved once.
    lookup_seconds: prometheus::Histogram,
    metrics: Metrics,
}

fn connect_options(path: &Path, busy_timeout: Duration) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: an acknowledged write survives a power loss, not only a process crash.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(busy_timeout)
        .foreign_keys(true)
}

impl SqliteStore {
    /// Opens the file (creating it when absent), applies migrations and starts the writer.
    pub async fn open(
        path: &Path,
        options: SqliteOptions,
        metrics: Metrics,
    ) -> Result<Self, anyhow::Error> {
        let connect = connect_options(path, options.busy_timeout);
        connect_migrated(path, &connect).await?.close().await?;
        let file =
            Arc::new(FileIdentity::open(path).map_err(|e| {
                anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display())
            })?);
        // Each reader keeps a small page cache of its own: the OS page cache holds the file
        // for all of them, and eight full-size (2 MiB) caches would be most of the memory
        // budget.
        let read_connect = connect
            .clone()
            .pragma("cache_size", READER_CACHE_KIB.to_string());
        let reads = SqlitePoolOptions::new()
            .max_connections(options.read_connections)
            .min_connections(options.read_connections)
            // A local file does not go stale like a network connection; pinging it before
            // every query would double the cost of a cache miss.
            .test_before_acquire(false)
            .connect_with(read_connect)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
        let opened_at_seq: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM api_credential_change")
                .fetch_one(&reads)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("cannot read SQLite database {}: {e}", path.display())
                })?;
        let lookups = lookups::Lookups::open(
            path,
            options.read_connections as usize,
            options.busy_timeout,
        )
        .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
        // Reconnecting must never create a fresh, empty database in place of a deleted one.
        let reopen = connect.clone().create_if_missing(false);
        let conn = writer::connect(path, options.busy_timeout)
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
        // Unbounded: every queued write is a request waiting for its answer, so the queue is
        // bounded by the requests in flight.
        let (tx, rx) = std::sync::mpsc::channel();
        let health = Arc::new(WriteHealth::default());
        let writer = writer::Writer {
            conn: Some(conn),
            busy_timeout: options.busy_timeout,
            file: file.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let writer_running = Arc::new(AtomicBool::new(true));
        let (done, writer_done) = oneshot::channel();
        let running = writer_running.clone();
        let max_batch = options.max_batch;
        std::thread::Builder::new()
            .name("credgate-writer".into())
            .spawn(move || {
                // Cleared however the thread ends, a panic included.
                struct Running(Arc<AtomicBool>);
                impl Drop for Running {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::Release);
                    }
                }
                let _running = Running(running);
                writer.run(&rx, max_batch);
                drop(rx);
                let _ = done.send(());
            })
            .map_err(|e| anyhow::anyhow!("cannot start the SQLite writer thread: {e}"))?;
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        Ok(Self {
            reads,
            writes: tx,
            closing: AtomicBool::new(false),
            writer_running,
            writer_done: std::sync::Mutex::new(Some(writer_done)),
            health,
            file,
            busy_timeout: options.busy_timeout,
            changes,
            watcher: OnceLock::new(),
            opened_at_seq,
            change_poll_interval: options.change_poll_interval,
            connect: reopen,
            lookups: Arc::new(lookups),
            lookup_seconds: metrics.db_histogram("state"),
            metrics,
        })
    }

    /// Applies migrations to the file without starting a store (the `migrate` command).
    pub async fn migrate(path: &Path) -> Result<(), anyhow::Error> {
        let connect = connect_options(path, SqliteOptions::default().busy_timeout);
        connect_migrated(path, &connect).await?.close().await?;
        Ok(())
    }

    /// Sets `last_used_at`: at once, or when the writer is idle (by `idle_until`).
    async fn touch_rows(
        &self,
        keys: &[ApiKey],
        at: DateTime<Utc>,
        idle_until: Option<Instant>,
    ) -> Result<(), StoreError> {
        let (keys, at) = (json_keys(keys), format_time(&at));
        self.write(|reply| WriteOp::Touch {
            keys,
            at,
            idle_until,
            reply,
        })
        .await
    }

    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let stopped = || StoreError::new("the SQLite writer has stopped");
        if self.closing.load(Ordering::Acquire) {
            return Err(stopped());
        }
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(Message::Write(make(reply)))
            .map_err(|_| stopped())?;
        answer
            .await
            .map_err(|_| StoreError::new("the SQLite writer dropped a write"))?
    }
}

/// Opens one connection to the file (creating it when absent) and applies the migrations.
async fn connect_migrated(
    path: &Path,
    connect: &SqliteConnectOptions,
) -> Result<SqliteConnection, anyhow::Error> {
    let mut conn = SqliteConnection::connect_with(connect)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
    MIGRATOR
        .run(&mut conn)
        .await
        .map_err(|e| anyhow::anyhow!("cannot migrate SQLite database {}: {e}", path.display()))?;
    Ok(conn)
}

/// Whether writes commit. Failures are logged when the state changes, not per write.
#[derive(Default)]
struct WriteHealth {
    failure: std::sync::Mutex<Option<String>>,
}

impl WriteHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // The guarded value is a plain Option: a panic elsewhere cannot leave it half-written.
        self.failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self, reason: &str) {
        let mut failure = self.lock();
        if failure.is_none() {
            tracing::error!(
                error = reason,
                "SQLite writes are failing: writes are refused and /ready answers 503 until one commits again"
            );
        }
        *failure = Some(reason.to_owned());
    }

    fn succeeded(&self) {
        if self.lock().take().is_some() {
            tracing::info!("SQLite writes commit again; ready");
        }
    }

    fn is_failing(&self) -> bool {
        self.lock().is_some()
    }

    fn check(&self) -> Result<(), StoreError> {
        match &*self.lock() {
            None => Ok(()),
            Some(reason) => Err(StoreError::new(format!("writes are failing: {reason}"))),
        }
    }
}

/// The database file as it was opened. SQLite keeps writing into a file that was deleted or
/// replaced under it; those writes are lost at the next start, so they must not be answered
/// as durable.
struct FileIdentity {
    path: PathBuf,
    /// Held open so its link count tells whether it was deleted.
    file: std::fs::File,
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let meta = file.metadata()?;
        Ok(Self {
            path: path.to_owned(),
            file,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Fails when the opened file is no longer the one at its path.
    fn check(&self) -> Result<(), String> {
        let path = self.path.display();
        match std::fs::metadata(&self.path) {
            Ok(now) if (now.dev(), now.ino()) == (self.dev, self.ino) => {}
            Ok(_) => {
                return Err(format!(
                    "the database file {path} was replaced by another file while in use; restart credgate"
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "the database file {path} was moved or deleted while in use; restart credgate"
                ));
            }
            Err(e) => return Err(format!("cannot stat the database file {path}: {e}")),
        }
        // Still at its path, yet unlinked: only a race with a delete and a re-link gets here.
        let held = self
            .file
            .metadata()
            .map_err(|e| format!("cannot stat the open database file {path}: {e}"))?;
        if held.nlink() == 0 {
            return Err(format!(
                "the database file {path} was deleted while in use; restart credgate"
            ));
        }
        Ok(())
    }
}

/// Keys as a JSON array, for `json_each`: one bound parameter for a batch of any size.
fn json_keys(keys: &[ApiKey]) -> String {
    serde_json::Value::from(keys.iter().map(ApiKey::as_str).collect::<Vec<_>>()).to_string()
}

#[async_trait]
impl CredentialStore for SqliteStore {
    async fn touch(&self, keys: &[ApiKey], at: DateTime<Utc>) -> Result<(), StoreError> {
        self.touch_rows(keys, at, None).await
    }

    /// The writer keeps it aside while other writes keep coming: see `writer::IDLE_AFTER`.
    async fn touch_when_idle(
        &self,
        keys: &[ApiKey],
        at: DateTime<Utc>,
        latest: Instant,
    ) -> Result<(), StoreError> {
        self.touch_rows(keys, at, Some(latest)).await
    }

    async fn record_master_key_id(&self, keys: &[ApiKey], id: &str) -> Result<(), StoreError> {
        let (keys, id) = (json_keys(keys), id.to_owned());
        self.write(|reply| WriteOp::MasterKeyId { keys, id, reply })
            .await
    }

    async fn roll(
        &self,
        old: &ApiKey,
        new: &ApiKey,
        master_key_id: &str,
        old_until: DateTime<Utc>,
        origin: &Origin,
    ) -> Result<Rolled, StoreError> {
        let roll = Box::new(Roll {
            old: old.clone(),
            new: new.clone(),
            master_key_id: master_key_id.to_owned(),
            old_until,
            origin: origin.clone(),
        });
        self.write(|reply| WriteOp::Roll { roll, reply }).await
    }

    async fn register(
        &self,
        new: &NewCredential,
        origin: &Origin,
    ) -> Result<Registration, StoreError> {
        let row = Box::new(RowText::of(new)?);
        let event = Box::new(EventRow::of(origin.registered(new).map_err(encode)?));
        let new = Box::new(new.clone());
        self.write(|reply| WriteOp::Register {
            new,
            row,
            event,
            reply,
        })
        .await
    }

    async fn update(
        &self,
        key: &ApiKey,
        update: &Update,
        origin: &Origin,
    ) -> Result<Updated, StoreError> {
        let (key, update) = (key.clone(), Box::new(update.clone()));
        let origin = Box::new(origin.clone());
        self.write(|reply| WriteOp::Update {
            key,
            update,
            origin,
            reply,
        })
        .await
    }

    async fn revoke(&self, key: &ApiKey, origin: &Origin) -> Result<Revocation, StoreError> {
        let (key, origin) = (key.clone(), Box::new(origin.clone()));
        self.write(|reply| WriteOp::Revoke { key, origin, reply })
            .await
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
        // One credential's events: its registrations through `registered_event` (see the
        // migration `0004_audit.sql`), every other event through the partial index.
        let sql = if query.api_key.is_some() {
            "SELECT id, at, api_key, event, actor, source, detail FROM api_credential_event \
             WHERE id > ?1 AND api_key = ?2 AND event NOT IN ('registered', 'issued') \
             UNION ALL \
             SELECT id, at, api_key, event, actor, source, detail FROM api_credential_event \
             WHERE id > ?1 AND api_key = ?2 AND id IN ( \
                 SELECT registered_event FROM api_credential WHERE api_key = ?2 \
                 UNION \
                 SELECT detail ->> 'registered_event' FROM api_credential_event \
                 WHERE api_key = ?2 AND event = 'deleted' \
                   AND event NOT IN ('registered', 'issued')) \
             ORDER BY id LIMIT ?3"
        } else {
            "SELECT id, at, api_key, event, actor, source, detail FROM api_credential_event \
             WHERE id > ?1 ORDER BY id LIMIT ?3"
        };
        let events = sqlx::query_as::<_, Event>(sql)
            .bind(query.after.unwrap_or(0))
            .bind(query.api_key.as_ref().map(ApiKey::as_str))
            .bind(i64::from(query.limit));
        Ok(timed(&self.metrics, "events", events.fetch_all(&self.reads)).await?)
    }

    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        // On a connection of its own: a maintenance command, not a credential write.
        let mut conn = SqliteConnection::connect_with(&self.connect).await?;
        let done = sqlx::query("DELETE FROM api_credential_event WHERE at < ?")
            .bind(format_time(&before))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        Ok(done?.rows_affected())
    }

    async fn lookup(&self, key: &ApiKey) -> Result<Option<AuthRecord>, StoreError> {
        let started = Instant::now();
        // On the calling thread: a point read of one indexed row takes microseconds, less
        // than handing it to another thread and back (`spawn_blocking` halved the miss
        // throughput; see BENCHMARKS.md).
        let found = self.lookups.lookup(key.as_str());
        self.lookup_seconds.observe(started.elapsed().as_secs_f64());
        Ok(found?)
    }

    async fn get(&self, key: &ApiKey) -> Result<Option<CredentialRecord>, StoreError> {
        let query = sqlx::query_as::<_, CredentialRow>(select_credential!("WHERE api_key = ?"))
            .bind(key.as_str());
        let row = timed(&self.metrics, "get", query.fetch_optional(&self.reads)).await?;
        Ok(row.map(CredentialRecord::from))
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<CredentialRecord>, StoreError> {
        let rows = sqlx::query_as::<_, CredentialRow>(list_sql(
            query.after.is_some(),
            query.owner.is_some(),
        ))
        .bind(query.after.as_ref().map(ApiKey::as_str))
        .bind(query.active)
        .bind(query.owner.as_deref())
        .bind(query.master_key_id.as_deref())
        .bind(query.state.map(|s| s.to_string()))
        .bind(format_time(&chrono::Utc::now()))
        .bind(i64::from(query.limit));
        let rows = timed(&self.metrics, "list", rows.fetch_all(&self.reads)).await?;
        Ok(rows.into_iter().map(CredentialRecord::from).collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if !self.writer_running.load(Ordering::Acquire) {
            return Err(StoreError::new("the SQLite writer has stopped"));
        }
        self.file.check().map_err(StoreError::new)?;
        self.health.check()?;
        sqlx::query("SELECT 1 FROM api_credential LIMIT 1")
            .fetch_optional(&self.reads)
            .await?;
        Ok(())
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.file.check().map_err(StoreError::new)?;
        // A connection of its own, so a failure here is reported to the caller alone and
        // leaves the writer's state untouched.
        let (path, busy_timeout) = (self.file.path.clone(), self.busy_timeout);
        let result = tokio::task::spawn_blocking(move || {
            let conn = writer::connect(&path, busy_timeout)?;
            let (reply, _) = oneshot::channel();
            writer::apply(&conn, &[WriteOp::Probe { reply }]).map(|_| ())
        })
        .await
        .map_err(|e| StoreError::new(format!("the write probe failed: {e}")))
        .and_then(|probe| probe);
        result.map_err(|e| StoreError::new(format!("{}: {}", self.file.path.display(), e.report())))
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        let changes = self.changes.subscribe();
        // Outside a runtime (a synchronous benchmark) there is nothing to run it on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.watcher.get_or_init(|| {
                AbortOnDrop(runtime.spawn(watch_changes(
                    self.connect.clone(),
                    self.opened_at_seq,
                    self.change_poll_interval,
                    self.changes.clone(),
                )))
            });
        }
        changes
    }

    async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let _ = self.writes.send(Message::Close);
        let done = self
            .writer_done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(done) = done
            && done.await.is_err()
        {
            tracing::error!("the SQLite writer thread failed");
        }
        self.reads.close().await;
        self.lookups.close();
    }
}

/// Polls for changes committed by other connections and publishes them on the feed, until
/// its task is aborted (with the store).
async fn watch_changes(
    connect: SqliteConnectOptions,
    from_seq: i64,
    every: Duration,
    feed: broadcast::Sender<Change>,
) {
    let mut watcher = ChangeWatcher {
        conn: None,
        data_version: 0,
        seq: from_seq,
        pruned: None,
    };
    // Polled ten times a second: its statements would drown the debug log.
    let connect = connect.disable_statement_logging();
    let mut failing = false;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match watcher.poll(&connect, &feed).await {
            Err(e) => {
                // Entries still expire with the TTL; the log keeps what we missed for
                // later. Logged once per outage, not ten times a second.
                if !failing {
                    tracing::warn!(error = %e.report(), "SQLite change watcher cannot read the change log");
                    failing = true;
                }
                watcher.conn = None;
            }
            Ok(()) if failing => {
                tracing::info!("SQLite change watcher reads the change log again");
                failing = false;
            }
            Ok(()) => {}
        }
    }
}

/// State of the change watcher: its own connection (`data_version` is per connection) and
/// how far into the change log it has read.
struct ChangeWatcher {
    conn: Option<SqliteConnection>,
    data_version: i64,
    seq: i64,
    /// When the change log was last pruned.
    pruned: Option<Instant>,
}

/// How often the change log is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

impl ChangeWatcher {
    async fn poll(
        &mut self,
        connect: &SqliteConnectOptions,
        feed: &broadcast::Sender<Change>,
    ) -> Result<(), StoreError> {
        // A new connection has its own data_version numbering: always read the log once.
        let fresh = self.conn.is_none();
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self
                .conn
                .insert(SqliteConnection::connect_with(connect).await?),
        };
        if self.pruned.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            // A change older than the longest allowed TTL (one day) can concern no cached
            // entry anywhere: the entry would have been loaded before the change, and so
            // have expired since.
            sqlx::query(
                "DELETE FROM api_credential_change \
                 WHERE changed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 day')",
            )
            .execute(&mut *conn)
            .await?;
            self.pruned = Some(Instant::now());
        }
        let version: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut *conn)
            .await?;
        if version == self.data_version && !fresh {
            return Ok(());
        }
        let rows = sqlx::query(
            "SELECT seq, api_key FROM api_credential_change WHERE seq > ? ORDER BY seq",
        )
        .bind(self.seq)
        .fetch_all(&mut *conn)
        .await?;
        for row in &rows {
            let key: String = row.try_get("api_key")?;
            // No subscriber yet (start-up) means no cache to keep honest.
            let _ = feed.send(Change::Key(key));
            self.seq = row.try_get("seq")?;
        }
        self.data_version = version;
        Ok(())
    }
}

/// The listing's statement. The cursor and the owner are written as plain comparisons when
/// given (`?1 IS NULL OR api_key > ?1` would hide them from SQLite's planner): a page then
/// starts at its cursor in the key order, and an owner's credentials are read from their
/// index, instead of every page reading the table from its first row. The other filters
/// are checked on the rows read; every parameter appears in every variant.
fn list_sql(after: bool, owner: bool) -> &'static str {
    macro_rules! list {
        ($keys:literal) => {
            select_credential!(
                "WHERE ",
                $keys,
                " AND (?2 IS NULL OR active = ?2) AND (?4 IS NULL OR master_key_id = ?4) ",
                "AND (?5 IS NULL ",
                "  OR (?5 = 'revoked' AND active = 0) ",
                "  OR (?5 = 'expired' AND active = 1 AND expires_at <= ?6) ",
                "  OR (?5 = 'active' AND active = 1 AND (expires_at IS NULL OR expires_at > ?6))) ",
                "ORDER BY api_key LIMIT ?7"
            )
        };
    }
    match (after, owner) {
        (false, false) => list!("?1 IS NULL AND ?3 IS NULL"),
        (true, false) => list!("api_key > ?1 AND ?3 IS NULL"),
        (false, true) => list!("?1 IS NULL AND owner = ?3"),
        (true, true) => list!("owner = ?3 AND api_key > ?1"),
    }
}

/// A migrated database file in a directory of its own, for unit tests.
#[cfg(test)]
pub(super) async fn migrated_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("credgate.db");
    SqliteStore::migrate(&path)
        .await
        .expect("a migrated database");
    (dir, path)
}

#[cfg(test)]
mod tests {
    use super::{list_sql, migrated_file};

    /// Each variant of the listing reads from where its page starts: the cursor through the
    /// key, an owner's credentials through their index. (Its results are checked by the API
    /// tests; this checks what SQLite makes of it.)
    #[tokio::test]
    async fn a_listing_page_starts_at_its_cursor_and_an_owner_uses_its_index() {
        let (_dir, path) = migrated_file().await;
        let conn = rusqlite::Connection::open(&path).expect("a connection");
        for (after, owner, expect) in [
            (
                true,
                false,
                "SEARCH api_credential USING PRIMARY KEY (api_key>?)",
            ),
            (
                false,
                true,
                "SEARCH api_credential USING INDEX api_credential_by_owner (owner=?)",
            ),
            (
                true,
                true,
                "SEARCH api_credential USING INDEX api_credential_by_owner (owner=? AND api_key>?)",
            ),
        ] {
            let mut plan = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {}", list_sql(after, owner)))
                .expect("the listing prepares");
            let steps: Vec<String> = plan
                .query_map(
                    rusqlite::params![
                        after.then_some("ak_m"),
                        None::<bool>,
                        owner.then_some("acme"),
                        None::<String>,
                        None::<String>,
                        None::<String>,
                        100
                    ],
                    |row| row.get(3),
                )
                .expect("a plan")
                .collect::<Result<_, _>>()
                .expect("its steps");
            assert_eq!(steps, [expect], "after {after}, owner {owner}");
        }
    }
}
