//! The embedded SQLite backend: WAL, `synchronous = FULL`, and group commit.
//!
//! Writes go through one writer task that owns one connection and commits every write that
//! is waiting in a single transaction (one fsync for the batch); each caller is answered only
//! after that commit. Reads use a small pool; the cache-miss read has its own connections
//! ([`lookups`]). A watcher polls `PRAGMA data_version` and, when another connection
//! committed, reads the `api_credential_change` log to drop changed keys.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{
    AbortOnDrop, AuthRecord, CHANGE_FEED_CAPACITY, Change, CredentialRecord, CredentialRow,
    CredentialStore, ListQuery, NewCredential, Registration, Revocation, Rolled, StoreError,
    Update, Updated, credential_columns, select_credential, timed,
};
use crate::attributes::format_time;
use crate::audit::{Event, EventQuery, Origin};
use crate::credential::ApiKey;
use crate::telemetry::Metrics;
use chrono::{DateTime, Utc};

mod lookups;

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

enum WriteOp {
    Register {
        new: Box<NewCredential>,
        /// The row and its audit event as JSON, made by the caller: the writer is one task
        /// for every write, so what can be done before it is done before it.
        row: String,
        event: String,
        reply: oneshot::Sender<Result<Registration, StoreError>>,
    },
    Update {
        key: ApiKey,
        update: Box<Update>,
        origin: Box<Origin>,
        reply: oneshot::Sender<Result<Updated, StoreError>>,
    },
    Roll {
        roll: Box<Roll>,
        reply: oneshot::Sender<Result<Rolled, StoreError>>,
    },
    MasterKeyId {
        /// The keys, as a JSON array (read by `json_each`).
        keys: String,
        id: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Touch {
        /// The keys, as a JSON array (read by `json_each`).
        keys: String,
        at: String,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Revoke {
        key: ApiKey,
        origin: Box<Origin>,
        reply: oneshot::Sender<Result<Revocation, StoreError>>,
    },
    /// A write that changes nothing of substance: proves the database accepts commits.
    Probe {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

/// A roll's inputs, boxed in the queue.
struct Roll {
    old: ApiKey,
    new: ApiKey,
    master_key_id: String,
    old_until: DateTime<Utc>,
    origin: Origin,
}

enum Outcome {
    Registration(Registration),
    Update(Updated),
    Roll(Rolled),
    MasterKeyId,
    Touch,
    Revocation(Revocation),
    Probe,
}

/// Credentials in one SQLite file.
pub struct SqliteStore {
    reads: SqlitePool,
    writes: mpsc::Sender<WriteOp>,
    /// Whether the last write committed; shared with the writer task so `/ready` tells the
    /// truth about writes, not only about reads.
    health: Arc<WriteHealth>,
    /// The file opened at start: a file deleted or replaced under us is noticed.
    file: Arc<FileIdentity>,
    /// The writer task: `close` waits for it to commit what it accepted.
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Tells the writer to finish.
    closing: Arc<Notify>,
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
        let writer = connect_migrated(path, &connect).await?;
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
        let (tx, rx) = mpsc::channel(options.max_batch * 4);
        let health = Arc::new(WriteHealth::default());
        let writer = Writer {
            conn: Some(writer),
            connect: reopen.clone(),
            file: file.clone(),
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let closing = Arc::new(Notify::new());
        let writer = tokio::spawn(writer.run(rx, options.max_batch, closing.clone()));
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        Ok(Self {
            reads,
            writes: tx,
            health,
            file,
            writer: std::sync::Mutex::new(Some(writer)),
            closing,
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

    async fn write<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteOp,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(make(reply))
            .await
            .map_err(|_| StoreError::new("the SQLite writer has stopped"))?;
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

/// How often the writer, while writes are failing, tries a probe write to find out whether
/// the database accepts them again (and, when healthy, checks the file is still in place).
const PROBE_EVERY: Duration = Duration::from_secs(1);

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

/// The one task that writes. It owns its connection, and throws it away after any failed
/// write: a connection whose `COMMIT` failed may still be inside a transaction, and every
/// later write would then land in a transaction that is never committed.
struct Writer {
    conn: Option<SqliteConnection>,
    connect: SqliteConnectOptions,
    file: Arc<FileIdentity>,
    health: Arc<WriteHealth>,
    metrics: Metrics,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<WriteOp>,
        max_batch: usize,
        closing: Arc<Notify>,
    ) {
        let mut batch = Vec::with_capacity(max_batch);
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = rx.recv_many(&mut batch, max_batch) => {
                    if received == 0 {
                        break;
                    }
                    self.commit(&mut batch).await;
                }
                _ = tick.tick() => self.watch().await,
                () = closing.notified() => {
                    // Refuse new writes, then commit (and answer) every one already queued.
                    rx.close();
                    while rx.recv_many(&mut batch, max_batch).await > 0 {
                        self.commit(&mut batch).await;
                    }
                    break;
                }
            }
        }
        if let Some(conn) = self.conn.take()
            && let Err(e) = conn.close().await
        {
            tracing::warn!(error = %e, "closing the SQLite writer connection");
        }
    }

    /// Between writes: notice a deleted file at once, and while writes fail, probe until
    /// one commits so readiness comes back without waiting for a client to write.
    async fn watch(&mut self) {
        if let Err(reason) = self.file.check() {
            self.fail(&reason);
        } else if self.health.is_failing() {
            let (reply, _) = oneshot::channel();
            let mut probe = vec![WriteOp::Probe { reply }];
            self.commit(&mut probe).await;
        }
    }

    fn fail(&mut self, reason: &str) {
        self.conn = None;
        self.health.failed(reason);
    }

    /// The connection, reopened when the last write failed.
    async fn connection(&mut self) -> Result<&mut SqliteConnection, StoreError> {
        self.file.check().map_err(StoreError::new)?;
        if self.conn.is_none() {
            self.conn = Some(SqliteConnection::connect_with(&self.connect).await?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::new("the SQLite writer has no connection"))
    }

    /// Commits a batch and answers every write in it, each only after its commit.
    async fn commit(&mut self, batch: &mut Vec<WriteOp>) {
        let started = Instant::now();
        let result = match self.connection().await {
            Ok(conn) => apply(conn, batch).await,
            Err(e) => Err(e),
        };
        // Not `timed`: the connection borrows `self` mutably.
        self.metrics.observe_db("write_batch", started);
        let result = result.and_then(|outcomes| {
            // Committed into a file nobody will open again: not durable, not acknowledged.
            self.file.check().map_err(StoreError::new)?;
            Ok(outcomes)
        });
        match result {
            Ok(outcomes) => {
                self.health.succeeded();
                answer(batch.drain(..), outcomes.into_iter().map(Ok));
            }
            Err(e) if e.is_statement_error() && batch.len() > 1 => {
                // One write refused by the database (an operator's trigger, say) must not
                // fail its neighbours: retry each on its own.
                self.conn = None;
                tracing::warn!(error = %e.report(), size = batch.len(), "write batch refused; retrying one by one");
                let ops = std::mem::take(batch);
                for op in ops {
                    let mut one = vec![op];
                    Box::pin(self.commit(&mut one)).await;
                }
            }
            Err(e) if e.is_statement_error() => {
                self.conn = None;
                tracing::warn!(error = %e.report(), "write refused by the database");
                answer(batch.drain(..), std::iter::once(Err(e)));
            }
            Err(e) => {
                self.fail(&e.report().to_string());
                let n = batch.len();
                answer(batch.drain(..), (0..n).map(|_| Err(e.clone())));
            }
        }
    }
}

fn answer(
    ops: impl Iterator<Item = WriteOp>,
    outcomes: impl Iterator<Item = Result<Outcome, StoreError>>,
) {
    for (op, outcome) in ops.zip(outcomes) {
        // A caller that went away (client disconnected) is not an error: its write stands.
        let mismatch = || StoreError::new("writer outcome mismatch");
        match op {
            WriteOp::Register { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Registration(r) => Ok(r),
                    _ => Err(mismatch()),
                }));
            }
            WriteOp::Revoke { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Revocation(r) => Ok(r),
                    _ => Err(mismatch()),
                }));
            }
            WriteOp::Update { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Update(u) => Ok(u),
                    _ => Err(mismatch()),
                }));
            }
            WriteOp::Roll { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Roll(r) => Ok(r),
                    _ => Err(mismatch()),
                }));
            }
            WriteOp::Touch { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Touch => Ok(()),
                    _ => Err(mismatch()),
                }));
            }
            WriteOp::MasterKeyId { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::MasterKeyId => Ok(()),
                    _ => Err(mismatch()),
                }));
            }
            WriteOp::Probe { reply } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Probe => Ok(()),
                    _ => Err(mismatch()),
                }));
            }
        }
    }
}

/// Applies writes in one transaction; answers exist only once `COMMIT` returned OK.
///
/// The transaction is plain SQL rather than sqlx's `Transaction`: sqlx counts nesting
/// itself, and after a failed `COMMIT` that count and SQLite's state can disagree, turning
/// every later `BEGIN` into a savepoint that is never committed. A connection that failed
/// here is discarded by the caller, so each batch starts on a connection in autocommit mode
/// (and `BEGIN` itself fails if it were not).
async fn apply(conn: &mut SqliteConnection, ops: &[WriteOp]) -> Result<Vec<Outcome>, StoreError> {
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    let mut outcomes = Vec::with_capacity(ops.len());
    let mut events = Vec::new();
    let mut marker = Marker(false);
    let result = apply_within(conn, ops, &mut outcomes, &mut events, &mut marker).await;
    let result = match result {
        Ok(()) => record(conn, &events, marker).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        // Best effort: the caller discards this connection whatever happens here.
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        return Err(e.into());
    }
    if let Err(e) = sqlx::raw_sql("COMMIT").execute(&mut *conn).await {
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
        return Err(e.into());
    }
    Ok(outcomes)
}

/// Whether this transaction holds the marker row that tells the schema's audit triggers
/// that the service records these changes itself. It is inserted just before the first
/// statement that changes a credential, so a batch that changes none (a duplicate
/// registration, say) writes nothing, and is answered even while the disk is full.
struct Marker(bool);

impl Marker {
    async fn set(&mut self, conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
        if !self.0 {
            sqlx::query("INSERT INTO credgate_audit_writer (id) VALUES (1)")
                .execute(&mut *conn)
                .await?;
            self.0 = true;
        }
        Ok(())
    }
}

/// Whether a key is stored and active; `None` when it is not stored.
async fn active(conn: &mut SqliteConnection, key: &ApiKey) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar("SELECT active FROM api_credential WHERE api_key = ?")
        .bind(key.as_str())
        .fetch_optional(&mut *conn)
        .await
}

/// The writes of a batch, inside its transaction, collecting their audit events. (Each
/// check before a write is exact: the transaction holds the write lock.)
async fn apply_within(
    conn: &mut SqliteConnection,
    ops: &[WriteOp],
    outcomes: &mut Vec<Outcome>,
    events: &mut Vec<String>,
    marker: &mut Marker,
) -> Result<(), sqlx::Error> {
    // The batch's registrations first, in a few statements for all of them: they were all
    // in flight together, so any order among the batch's writes is one they could have had.
    let news: Vec<(&ApiKey, &str)> = ops
        .iter()
        .filter_map(|op| match op {
            WriteOp::Register { new, row, .. } => Some((&new.api_key, row.as_str())),
            _ => None,
        })
        .collect();
    let mut registrations = register_all(conn, &news, marker).await?.into_iter();
    for op in ops {
        let outcome = match op {
            WriteOp::Register { event, .. } => {
                let created = registrations
                    .next()
                    .ok_or_else(|| sqlx::Error::Protocol("registration outcome missing".into()))?;
                if created == Registration::Created {
                    events.push(event.clone());
                }
                Outcome::Registration(created)
            }
            WriteOp::Update {
                key,
                update,
                origin,
                ..
            } => {
                let updated = self::update(conn, key, update, marker).await?;
                if matches!(updated, Updated::Changed(_)) {
                    events.push(json(&origin.updated(key, update))?);
                }
                Outcome::Update(updated)
            }
            WriteOp::Roll { roll, .. } => {
                let rolled = self::roll(conn, roll, marker).await?;
                if let Rolled::Rolled(record) = &rolled {
                    for event in roll
                        .origin
                        .rolled(&roll.old, &roll.new, record, roll.old_until)
                    {
                        events.push(json(&event)?);
                    }
                }
                Outcome::Roll(rolled)
            }
            WriteOp::Touch { keys, at, .. } => sqlx::query(
                "UPDATE api_credential SET last_used_at = ?1 \
                 WHERE api_key IN (SELECT value FROM json_each(?2)) \
                 AND (last_used_at IS NULL OR last_used_at < ?1)",
            )
            .bind(at.as_str())
            .bind(keys.as_str())
            .execute(&mut *conn)
            .await
            .map(|_| Outcome::Touch)?,
            WriteOp::MasterKeyId { keys, id, .. } => sqlx::query(
                "UPDATE api_credential SET master_key_id = ? \
                 WHERE api_key IN (SELECT value FROM json_each(?)) AND master_key_id IS NULL",
            )
            .bind(id.as_str())
            .bind(keys.as_str())
            .execute(&mut *conn)
            .await
            .map(|_| Outcome::MasterKeyId)?,
            WriteOp::Revoke { key, .. } if active(conn, key).await? != Some(true) => {
                Outcome::Revocation(Revocation::NotFound)
            }
            WriteOp::Revoke { key, origin, .. } => {
                marker.set(conn).await?;
                let done = sqlx::query(
                    "UPDATE api_credential SET active = 0, revoked_by = ? \
                     WHERE api_key = ? AND active = 1",
                )
                .bind(origin.actor.as_ref().map(ApiKey::as_str))
                .bind(key.as_str())
                .execute(&mut *conn)
                .await?;
                let revoked = Revocation::from_rows(done.rows_affected());
                if revoked == Revocation::Revoked {
                    events.push(json(&origin.revoked(key))?);
                }
                Outcome::Revocation(revoked)
            }
            WriteOp::Probe { .. } => sqlx::query(
                "INSERT INTO credgate_write_probe (id, at) \
                 VALUES (1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            )
            .execute(&mut *conn)
            .await
            .map(|_| Outcome::Probe)?,
        };
        outcomes.push(outcome);
    }
    Ok(())
}

/// Writes a batch's audit events, in one statement, and removes the marker row: both in the
/// batch's transaction, just before its `COMMIT`.
async fn record(
    conn: &mut SqliteConnection,
    events: &[String],
    marker: Marker,
) -> Result<(), sqlx::Error> {
    if !events.is_empty() {
        let events = format!("[{}]", events.join(","));
        sqlx::query(
            "INSERT INTO api_credential_event (api_key, event, actor, source, detail) \
             SELECT e.value ->> 'api_key', e.value ->> 'event', e.value ->> 'actor', \
                    e.value ->> 'source', e.value -> 'detail' \
             FROM json_each(?) AS e ORDER BY e.key",
        )
        .bind(events)
        .execute(&mut *conn)
        .await?;
    }
    if marker.0 {
        sqlx::query("DELETE FROM credgate_audit_writer")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// A value as JSON text, for SQLite's `json_each`.
fn json(value: &impl serde::Serialize) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// A row to register, as `register_all` passes it to SQLite (one JSON array for a batch).
#[derive(serde::Serialize)]
struct NewRow<'a> {
    api_key: &'a str,
    name: Option<&'a str>,
    owner: Option<&'a str>,
    meta: &'a serde_json::Map<String, serde_json::Value>,
    scopes: String,
    expires_at: Option<String>,
    master_key_id: Option<&'a str>,
}

/// Registers a batch's credentials, in order: the first of several registrations of one key
/// wins. Three statements whatever the batch's size (each statement costs a round trip to
/// SQLite's thread). Stored keys are found first, so a batch of duplicates writes nothing
/// and is answered even while the disk is full.
async fn register_all(
    conn: &mut SqliteConnection,
    news: &[(&ApiKey, &str)],
    marker: &mut Marker,
) -> Result<Vec<Registration>, sqlx::Error> {
    if news.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&str> = news.iter().map(|(key, _)| key.as_str()).collect();
    let keys = serde_json::to_string(&keys).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT api_key FROM api_credential WHERE api_key IN (SELECT value FROM json_each(?))",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    let mut taken: HashSet<&str> = stored.iter().map(String::as_str).collect();
    let rows: Vec<&str> = news
        .iter()
        .filter(|(key, _)| taken.insert(key.as_str()))
        .map(|(_, row)| *row)
        .collect();
    let mut inserted: HashSet<String> = HashSet::new();
    if !rows.is_empty() {
        marker.set(conn).await?;
        let rows = format!("[{}]", rows.join(","));
        // `WHERE true`: SQLite's way to tell an upsert's ON from a join's.
        inserted = sqlx::query_scalar(
            "INSERT INTO api_credential \
             (api_key, name, owner, meta, scopes, expires_at, master_key_id) \
             SELECT r.value ->> 'api_key', r.value ->> 'name', r.value ->> 'owner', \
                    r.value -> 'meta', r.value ->> 'scopes', r.value ->> 'expires_at', \
                    r.value ->> 'master_key_id' \
             FROM json_each(?) AS r WHERE true ORDER BY r.key \
             ON CONFLICT (api_key) DO NOTHING RETURNING api_key",
        )
        .bind(rows)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    }
    // Created only for a key this batch stored (an operator's trigger could skip a row),
    // and only for the first registration of it.
    Ok(news
        .iter()
        .map(|(key, _)| {
            if inserted.remove(key.as_str()) {
                Registration::Created
            } else {
                Registration::Duplicate
            }
        })
        .collect())
}

/// Changes the given attributes of an active credential.
async fn update(
    conn: &mut SqliteConnection,
    key: &ApiKey,
    update: &Update,
    marker: &mut Marker,
) -> Result<Updated, sqlx::Error> {
    match active(conn, key).await? {
        None => return Ok(Updated::NotFound),
        Some(false) => return Ok(Updated::Revoked),
        Some(true) => {}
    }
    marker.set(conn).await?;
    let row: Option<CredentialRow> = sqlx::query_as(concat!(
        "UPDATE api_credential SET ",
        "name = CASE WHEN ?1 THEN ?2 ELSE name END, ",
        "owner = CASE WHEN ?3 THEN ?4 ELSE owner END, ",
        "meta = COALESCE(?5, meta), ",
        "scopes = COALESCE(?6, scopes), ",
        "expires_at = CASE WHEN ?7 THEN ?8 ELSE expires_at END ",
        "WHERE api_key = ?9 AND active = 1 RETURNING ",
        credential_columns!()
    ))
    .bind(update.name.is_some())
    .bind(update.name.clone().flatten())
    .bind(update.owner.is_some())
    .bind(update.owner.clone().flatten())
    .bind(
        update
            .meta
            .as_ref()
            .map(|m| serde_json::Value::Object(m.clone()).to_string()),
    )
    .bind(update.scopes.as_ref().map(|s| s.to_stored()))
    .bind(update.expires_at.is_some())
    .bind(update.expires_at.flatten().as_ref().map(format_time))
    .bind(key.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    // Checked active above, within this transaction.
    Ok(row.map_or(Updated::Revoked, |row| {
        Updated::Changed(Box::new(row.into()))
    }))
}

/// Keys as a JSON array, for `json_each`: one bound parameter for a batch of any size.
fn json_keys(keys: &[ApiKey]) -> String {
    serde_json::Value::from(keys.iter().map(ApiKey::as_str).collect::<Vec<_>>()).to_string()
}

/// Rolls within the writer's transaction: the checks, the new row and the old one's expiry
/// commit together (a failure rolls back the batch, and the writer retries each write alone).
async fn roll(
    conn: &mut SqliteConnection,
    roll: &Roll,
    marker: &mut Marker,
) -> Result<Rolled, sqlx::Error> {
    let row: Option<(bool, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT active, expires_at FROM api_credential WHERE api_key = ?")
            .bind(roll.old.as_str())
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(refused) = Rolled::refusal(row) {
        return Ok(refused);
    }
    marker.set(conn).await?;
    let inserted = sqlx::query(
        "INSERT INTO api_credential \
         (api_key, name, owner, meta, scopes, expires_at, master_key_id) \
         SELECT ?1, name, owner, meta, scopes, expires_at, ?2 FROM api_credential \
         WHERE api_key = ?3 ON CONFLICT (api_key) DO NOTHING",
    )
    .bind(roll.new.as_str())
    .bind(roll.master_key_id.as_str())
    .bind(roll.old.as_str())
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() != 1 {
        return Ok(Rolled::Duplicate);
    }
    sqlx::query(
        "UPDATE api_credential SET expires_at = ?1 \
         WHERE api_key = ?2 AND (expires_at IS NULL OR expires_at > ?1)",
    )
    .bind(format_time(&roll.old_until))
    .bind(roll.old.as_str())
    .execute(&mut *conn)
    .await?;
    let new: CredentialRow = sqlx::query_as(select_credential!("WHERE api_key = ?"))
        .bind(roll.new.as_str())
        .fetch_one(&mut *conn)
        .await?;
    Ok(Rolled::Rolled(Box::new(new.into())))
}

#[async_trait]
impl CredentialStore for SqliteStore {
    async fn touch(&self, keys: &[ApiKey], at: DateTime<Utc>) -> Result<(), StoreError> {
        let keys = json_keys(keys);
        let at = format_time(&at);
        self.write(|reply| WriteOp::Touch { keys, at, reply }).await
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
        let row = json(&NewRow {
            api_key: new.api_key.as_str(),
            name: new.name.as_deref(),
            owner: new.owner.as_deref(),
            meta: &new.meta,
            scopes: new.scopes.to_stored(),
            expires_at: new.expires_at.as_ref().map(format_time),
            master_key_id: new.master_key_id.as_deref(),
        })?;
        let event = json(&origin.registered(new))?;
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
        let rows = sqlx::query_as::<_, CredentialRow>(select_credential!(
            "WHERE (?1 IS NULL OR api_key > ?1) AND (?2 IS NULL OR active = ?2) ",
            "AND (?3 IS NULL OR owner = ?3) AND (?4 IS NULL OR master_key_id = ?4) ",
            "AND (?5 IS NULL ",
            "  OR (?5 = 'revoked' AND active = 0) ",
            "  OR (?5 = 'expired' AND active = 1 AND expires_at <= ?6) ",
            "  OR (?5 = 'active' AND active = 1 AND (expires_at IS NULL OR expires_at > ?6))) ",
            "ORDER BY api_key LIMIT ?7"
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
        if self.writes.is_closed() {
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
        let mut conn = SqliteConnection::connect_with(&self.connect).await?;
        let (reply, _) = oneshot::channel();
        let result = apply(&mut conn, &[WriteOp::Probe { reply }]).await;
        let _ = conn.close().await;
        result
            .map(|_| ())
            .map_err(|e| StoreError::new(format!("{}: {}", self.file.path.display(), e.report())))
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
        self.closing.notify_one();
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = writer
            && let Err(e) = writer.await
        {
            tracing::error!(error = %e, "the SQLite writer task failed");
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
