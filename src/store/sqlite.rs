//! The embedded SQLite backend: WAL, `synchronous = FULL`, and group commit.
//!
//! Writes go through one writer task that owns one connection and commits every write that
//! is waiting in a single transaction (one fsync for the batch); each caller is answered only
//! after that commit. Reads use a small pool. A watcher polls `PRAGMA data_version` and, when
//! another connection committed, reads the `api_credential_change` log to drop changed keys.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{mpsc, oneshot};

use super::{
    CredentialRecord, CredentialStore, InvalidationSink, KeyState, ListQuery, Registration,
    Revocation, StoreError,
};
use crate::credential::ApiKey;
use crate::telemetry::Metrics;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Page cache of each read connection, as SQLite's `cache_size` (negative: KiB).
const READER_CACHE_KIB: i64 = -512;

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
        key: ApiKey,
        reply: oneshot::Sender<Result<Registration, StoreError>>,
    },
    Revoke {
        key: ApiKey,
        by: Option<ApiKey>,
        reply: oneshot::Sender<Result<Revocation, StoreError>>,
    },
}

enum Outcome {
    Registration(Registration),
    Revocation(Revocation),
}

/// Credentials in one SQLite file.
pub struct SqliteStore {
    /// The change log's last entry when the store opened: the watcher reports everything
    /// after it, so no change between opening and the watcher's first poll is missed.
    opened_at_seq: i64,
    reads: SqlitePool,
    writes: mpsc::Sender<WriteOp>,
    connect: SqliteConnectOptions,
    options: SqliteOptions,
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
        let (tx, rx) = mpsc::channel(options.max_batch * 4);
        tokio::spawn(writer_loop(writer, rx, options.max_batch, metrics.clone()));
        Ok(Self {
            opened_at_seq,
            reads,
            writes: tx,
            connect,
            options,
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
            .map_err(|_| StoreError("the SQLite writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError("the SQLite writer dropped a write".into()))?
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

async fn writer_loop(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<WriteOp>,
    max_batch: usize,
    metrics: Metrics,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let started = Instant::now();
        let result = apply(&mut conn, &batch).await;
        metrics.observe_db("write_batch", started);
        match result {
            Ok(outcomes) => answer(batch.drain(..), outcomes.into_iter().map(Ok)),
            Err(e) if batch.len() > 1 => {
                // One bad write must not fail its neighbours: retry each on its own.
                tracing::warn!(error = %e, size = batch.len(), "write batch failed; retrying one by one");
                for op in batch.drain(..) {
                    let one = std::slice::from_ref(&op);
                    let result = apply(&mut conn, one).await.map(|mut o| o.remove(0));
                    answer(std::iter::once(op), std::iter::once(result));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "write failed");
                let n = batch.len();
                answer(batch.drain(..), (0..n).map(|_| Err(e.clone())));
            }
        }
    }
    if let Err(e) = conn.close().await {
        tracing::warn!(error = %e, "closing the SQLite writer connection");
    }
}

fn answer(
    ops: impl Iterator<Item = WriteOp>,
    outcomes: impl Iterator<Item = Result<Outcome, StoreError>>,
) {
    for (op, outcome) in ops.zip(outcomes) {
        // A caller that went away (client disconnected) is not an error: its write stands.
        match op {
            WriteOp::Register { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Registration(r) => Ok(r),
                    Outcome::Revocation(_) => Err(StoreError("writer outcome mismatch".into())),
                }));
            }
            WriteOp::Revoke { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Revocation(r) => Ok(r),
                    Outcome::Registration(_) => Err(StoreError("writer outcome mismatch".into())),
                }));
            }
        }
    }
}

/// Applies writes in one transaction; answers exist only once it has committed.
async fn apply(conn: &mut SqliteConnection, ops: &[WriteOp]) -> Result<Vec<Outcome>, StoreError> {
    let mut tx = conn.begin().await?;
    let mut outcomes = Vec::with_capacity(ops.len());
    for op in ops {
        outcomes.push(match op {
            WriteOp::Register { key, .. } => {
                let done = sqlx::query(
                    "INSERT INTO api_credential (api_key) VALUES (?) ON CONFLICT (api_key) DO NOTHING",
                )
                .bind(key.as_str())
                .execute(&mut *tx)
                .await?;
                Outcome::Registration(Registration::from_rows(done.rows_affected()))
            }
            WriteOp::Revoke { key, by, .. } => {
                let done = sqlx::query(
                    "UPDATE api_credential SET active = 0, revoked_by = ? WHERE api_key = ? AND active = 1",
                )
                .bind(by.as_ref().map(ApiKey::as_str))
                .bind(key.as_str())
                .execute(&mut *tx)
                .await?;
                Outcome::Revocation(Revocation::from_rows(done.rows_affected()))
            }
        });
    }
    tx.commit().await?;
    Ok(outcomes)
}

#[async_trait]
impl CredentialStore for SqliteStore {
    async fn register(&self, key: &ApiKey) -> Result<Registration, StoreError> {
        let key = key.clone();
        self.write(|reply| WriteOp::Register { key, reply }).await
    }

    async fn revoke(&self, key: &ApiKey, by: Option<&ApiKey>) -> Result<Revocation, StoreError> {
        let (key, by) = (key.clone(), by.cloned());
        self.write(|reply| WriteOp::Revoke { key, by, reply }).await
    }

    async fn state(&self, key: &ApiKey) -> Result<KeyState, StoreError> {
        let started = Instant::now();
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM api_credential WHERE api_key = ?")
                .bind(key.as_str())
                .fetch_optional(&self.reads)
                .await?;
        self.metrics.observe_db("state", started);
        Ok(KeyState::from_active(active))
    }

    async fn get(&self, key: &ApiKey) -> Result<Option<CredentialRecord>, StoreError> {
        let started = Instant::now();
        let row = sqlx::query_as::<_, CredentialRecord>(
            "SELECT api_key, active, created_at, revoked_at, revoked_by FROM api_credential WHERE api_key = ?",
        )
        .bind(key.as_str())
        .fetch_optional(&self.reads)
        .await?;
        self.metrics.observe_db("get", started);
        Ok(row)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<CredentialRecord>, StoreError> {
        let started = Instant::now();
        let rows = sqlx::query_as::<_, CredentialRecord>(
            "SELECT api_key, active, created_at, revoked_at, revoked_by FROM api_credential \
             WHERE (?1 IS NULL OR api_key > ?1) AND (?2 IS NULL OR active = ?2) \
             ORDER BY api_key LIMIT ?3",
        )
        .bind(query.after.as_ref().map(ApiKey::as_str))
        .bind(query.active)
        .bind(i64::from(query.limit))
        .fetch_all(&self.reads)
        .await?;
        self.metrics.observe_db("list", started);
        Ok(rows)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.writes.is_closed() {
            return Err(StoreError("the SQLite writer has stopped".into()));
        }
        sqlx::query("SELECT 1 FROM api_credential LIMIT 1")
            .fetch_optional(&self.reads)
            .await?;
        Ok(())
    }

    async fn watch_changes(&self, sink: Arc<dyn InvalidationSink>) {
        let mut watcher = ChangeWatcher {
            conn: None,
            data_version: 0,
            seq: self.opened_at_seq,
            pruned: None,
        };
        let mut tick = tokio::time::interval(self.options.change_poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = watcher.poll(&self.connect, sink.as_ref()).await {
                // Entries still expire with the TTL; the log keeps what we missed for later.
                tracing::warn!(error = %e, "SQLite change watcher");
                watcher.conn = None;
            }
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
        sink: &dyn InvalidationSink,
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
            sink.invalidate(&key).await;
            self.seq = row.try_get("seq")?;
        }
        self.data_version = version;
        Ok(())
    }
}
