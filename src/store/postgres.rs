//! The PostgreSQL backend, for many stateless instances on one database.
//!
//! A trigger announces every change of `active` with `pg_notify`; each instance keeps one
//! `LISTEN` connection and drops the named key from its cache. Notifications sent while that
//! connection is down are lost, so every (re)connection clears the whole cache: a lost
//! listener can cost cache hits, never a revocation.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::types::Json;
use tokio::sync::broadcast;

use super::{
    AbortOnDrop, AuthRecord, CHANGE_FEED_CAPACITY, Change, CredentialRecord, CredentialRow,
    CredentialStore, ListQuery, NewCredential, Registration, Revocation, Rolled, StoreError,
    StoreSettings, Update, Updated, credential_columns, select_credential, timed,
};
use crate::audit::{Event, EventQuery, NewEvent, Origin};
use crate::credential::ApiKey;
use crate::telemetry::Metrics;
use chrono::{DateTime, Utc};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The notification channel the schema's trigger sends on.
pub(crate) const CHANNEL: &str = "credgate_credential_changed";

const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Credentials in one PostgreSQL database.
pub struct PgStore {
    pool: PgPool,
    metrics: Metrics,
    /// Whether the LISTEN connection is up; `/ready` fails while it is not, because this
    /// instance would not hear revocations made elsewhere.
    listening: Arc<AtomicBool>,
    changes: broadcast::Sender<Change>,
    connect: PgConnectOptions,
    /// The LISTEN task, started by the first subscriber (a command-line tool has none) and
    /// stopped with the store.
    listener: OnceLock<AbortOnDrop>,
}

fn connect_options(url: &str, settings: &StoreSettings) -> Result<PgConnectOptions, anyhow::Error> {
    let timeout_ms = settings.timeout.as_millis().to_string();
    Ok(PgConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL: {e}"))?
        .application_name("credgate")
        // A wedged query fails (500) instead of holding a worker forever. `credgate.audit`
        // tells the schema's audit trigger that this connection records its own events.
        .options([
            ("statement_timeout", timeout_ms.as_str()),
            ("credgate.audit", "service"),
        ]))
}

/// Connects a pool and applies the migrations (serialised across instances by sqlx's
/// advisory lock).
async fn migrated_pool(
    connect: &PgConnectOptions,
    max_connections: u32,
    timeout: Duration,
) -> Result<PgPool, anyhow::Error> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_with(connect.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("cannot migrate PostgreSQL database: {e}"))?;
    Ok(pool)
}

impl PgStore {
    /// Connects and applies migrations.
    pub async fn open(
        url: &str,
        settings: &StoreSettings,
        metrics: Metrics,
    ) -> Result<Self, anyhow::Error> {
        let connect = connect_options(url, settings)?;
        let pool = migrated_pool(&connect, settings.max_connections, settings.timeout).await?;
        metrics.set_listener_connected(false);
        let listening = Arc::new(AtomicBool::new(false));
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        Ok(Self {
            pool,
            metrics,
            listening,
            changes,
            connect,
            listener: OnceLock::new(),
        })
    }

    /// Applies migrations without starting a store (the `migrate` command).
    pub async fn migrate(url: &str) -> Result<(), anyhow::Error> {
        let settings = StoreSettings::default();
        let connect = connect_options(url, &settings)?;
        migrated_pool(&connect, 1, settings.timeout)
            .await?
            .close()
            .await;
        Ok(())
    }
}

/// Most times a write is run again after a serialization failure or a deadlock.
const TRANSIENT_RETRIES: u32 = 3;

/// Runs a one-statement write, again when PostgreSQL aborted it with a serialization failure
/// (40001, possible when an operator sets `default_transaction_isolation = serializable`) or
/// a deadlock (40P01): the statement then took no effect, so running it again is safe. Any
/// other failure, a lost connection included, is answered as an error and never as success:
/// whether such a write committed is unknown, and a retried registration would answer 409.
async fn retrying<T, F, Fut>(mut run: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 0;
    loop {
        match run().await {
            Err(sqlx::Error::Database(db))
                if attempt < TRANSIENT_RETRIES
                    && matches!(db.code().as_deref(), Some("40001" | "40P01")) =>
            {
                attempt += 1;
                tracing::debug!(error = %db, attempt, "transient write failure; running it again");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

#[async_trait]
impl CredentialStore for PgStore {
    async fn register(
        &self,
        new: &NewCredential,
        origin: &Origin,
    ) -> Result<Registration, StoreError> {
        let event = origin.registered(new).map_err(encode)?;
        // One statement: the event is inserted only with the row, in its transaction.
        let done = timed(
            &self.metrics,
            "register",
            retrying(|| {
                sqlx::query(
                    "WITH created AS ( \
                       INSERT INTO api_credential \
                       (api_key, name, owner, meta, scopes, expires_at, master_key_id) \
                       VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (api_key) DO NOTHING \
                       RETURNING api_key) \
                     INSERT INTO api_credential_event (api_key, event, actor, source, detail) \
                     SELECT api_key, $8, $9, $10, $11 FROM created",
                )
                .bind(new.api_key.as_str())
                .bind(new.name.as_deref())
                .bind(new.owner.as_deref())
                .bind(Json(&new.meta))
                .bind(new.scopes.to_stored())
                .bind(new.expires_at)
                .bind(new.master_key_id.as_deref())
                .bind(event.event)
                .bind(event.actor.as_deref())
                .bind(event.source)
                .bind(Json(&event.detail))
                .execute(&self.pool)
            }),
        )
        .await?;
        Ok(Registration::from_rows(done.rows_affected()))
    }

    async fn update(
        &self,
        key: &ApiKey,
        update: &Update,
        origin: &Origin,
    ) -> Result<Updated, StoreError> {
        let event = origin.updated(key, update).map_err(encode)?;
        let changed = timed(
            &self.metrics,
            "update",
            retrying(|| {
                sqlx::query_as::<_, CredentialRow>(concat!(
                    "WITH changed AS (UPDATE api_credential SET ",
                    "name = CASE WHEN $1 THEN $2 ELSE name END, ",
                    "owner = CASE WHEN $3 THEN $4 ELSE owner END, ",
                    "meta = COALESCE($5, meta), ",
                    "scopes = COALESCE($6, scopes), ",
                    "expires_at = CASE WHEN $7 THEN $8 ELSE expires_at END ",
                    "WHERE api_key = $9 AND active RETURNING ",
                    credential_columns!(),
                    "), logged AS (",
                    "INSERT INTO api_credential_event (api_key, event, actor, source, detail) ",
                    "SELECT api_key, $10, $11, $12, $13 FROM changed) ",
                    "SELECT * FROM changed"
                ))
                .bind(update.name.is_some())
                .bind(update.name.clone().flatten())
                .bind(update.owner.is_some())
                .bind(update.owner.clone().flatten())
                .bind(update.meta.as_ref().map(Json))
                .bind(update.scopes.as_ref().map(|s| s.to_stored()))
                .bind(update.expires_at.is_some())
                .bind(update.expires_at.flatten())
                .bind(key.as_str())
                .bind(event.event)
                .bind(event.actor.as_deref())
                .bind(event.source)
                .bind(Json(&event.detail))
                .fetch_optional(&self.pool)
            }),
        )
        .await?;
        if let Some(row) = changed {
            return Ok(Updated::Changed(Box::new(row.into())));
        }
        // Revocation is permanent, so a revoked key read now was revoked then.
        let active: Option<bool> =
            sqlx::query_scalar("SELECT active FROM api_credential WHERE api_key = $1")
                .bind(key.as_str())
                .fetch_optional(&self.pool)
                .await?;
        Ok(match active {
            None => Updated::NotFound,
            Some(_) => Updated::Revoked,
        })
    }

    async fn touch(&self, keys: &[ApiKey], at: DateTime<Utc>) -> Result<(), StoreError> {
        let keys: Vec<&str> = keys.iter().map(ApiKey::as_str).collect();
        timed(
            &self.metrics,
            "touch",
            retrying(|| {
                sqlx::query(
                    "UPDATE api_credential SET last_used_at = $1 \
                     WHERE api_key = ANY($2) AND (last_used_at IS NULL OR last_used_at < $1)",
                )
                .bind(at)
                .bind(&keys)
                .execute(&self.pool)
            }),
        )
        .await?;
        Ok(())
    }

    async fn record_master_key_id(&self, keys: &[ApiKey], id: &str) -> Result<(), StoreError> {
        let keys: Vec<&str> = keys.iter().map(ApiKey::as_str).collect();
        timed(
            &self.metrics,
            "record_master_key_id",
            retrying(|| {
                sqlx::query(
                    "UPDATE api_credential SET master_key_id = $2 \
                     WHERE api_key = ANY($1) AND master_key_id IS NULL",
                )
                .bind(&keys)
                .bind(id)
                .execute(&self.pool)
            }),
        )
        .await?;
        Ok(())
    }

    async fn roll(
        &self,
        old: &ApiKey,
        new: &ApiKey,
        master_key_id: &str,
        old_until: DateTime<Utc>,
        origin: &Origin,
    ) -> Result<Rolled, StoreError> {
        let rolled = timed(
            &self.metrics,
            "roll",
            retrying(|| async {
                let mut tx = self.pool.begin().await?;
                // Locked: a revocation or another roll of the old key waits for this one.
                let row: Option<(bool, Option<DateTime<Utc>>)> = sqlx::query_as(
                    "SELECT active, expires_at FROM api_credential WHERE api_key = $1 FOR UPDATE",
                )
                .bind(old.as_str())
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(refused) = Rolled::refusal(row) {
                    return Ok(refused);
                }
                let inserted = sqlx::query(
                    "INSERT INTO api_credential \
                     (api_key, name, owner, meta, scopes, expires_at, master_key_id) \
                     SELECT $1, name, owner, meta, scopes, expires_at, $2 FROM api_credential \
                     WHERE api_key = $3 ON CONFLICT (api_key) DO NOTHING",
                )
                .bind(new.as_str())
                .bind(master_key_id)
                .bind(old.as_str())
                .execute(&mut *tx)
                .await?;
                if inserted.rows_affected() != 1 {
                    return Ok(Rolled::Duplicate);
                }
                sqlx::query(
                    "UPDATE api_credential SET expires_at = $1 \
                     WHERE api_key = $2 AND (expires_at IS NULL OR expires_at > $1)",
                )
                .bind(old_until)
                .bind(old.as_str())
                .execute(&mut *tx)
                .await?;
                let row: CredentialRow = sqlx::query_as(select_credential!("WHERE api_key = $1"))
                    .bind(new.as_str())
                    .fetch_one(&mut *tx)
                    .await?;
                let record = CredentialRecord::from(row);
                let events = origin
                    .rolled(old, new, &record, old_until)
                    .map_err(encode)?;
                record_events(&mut tx, &events).await?;
                tx.commit().await?;
                Ok(Rolled::Rolled(Box::new(record)))
            }),
        )
        .await?;
        Ok(rolled)
    }

    async fn revoke(&self, key: &ApiKey, origin: &Origin) -> Result<Revocation, StoreError> {
        let event = origin.revoked(key).map_err(encode)?;
        let done = timed(
            &self.metrics,
            "revoke",
            retrying(|| {
                sqlx::query(
                    "WITH revoked AS ( \
                       UPDATE api_credential SET active = false, revoked_by = $2 \
                       WHERE api_key = $1 AND active RETURNING api_key) \
                     INSERT INTO api_credential_event (api_key, event, actor, source, detail) \
                     SELECT api_key, $3, $2, $4, $5 FROM revoked",
                )
                .bind(key.as_str())
                .bind(event.actor.as_deref())
                .bind(event.event)
                .bind(event.source)
                .bind(Json(&event.detail))
                .execute(&self.pool)
            }),
        )
        .await?;
        Ok(Revocation::from_rows(done.rows_affected()))
    }

    async fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
        Ok(timed(
            &self.metrics,
            "events",
            sqlx::query_as::<_, Event>(
                "SELECT id, at, api_key, event, actor, source, detail FROM api_credential_event \
                 WHERE id > $1 AND ($2::text IS NULL OR api_key = $2) ORDER BY id LIMIT $3",
            )
            .bind(query.after.unwrap_or(0))
            .bind(query.api_key.as_ref().map(ApiKey::as_str))
            .bind(i64::from(query.limit))
            .fetch_all(&self.pool),
        )
        .await?)
    }

    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM api_credential_event WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn lookup(&self, key: &ApiKey) -> Result<Option<AuthRecord>, StoreError> {
        Ok(timed(
            &self.metrics,
            "state",
            sqlx::query_as(
                "SELECT active, scopes, owner, expires_at, master_key_id FROM api_credential \
                 WHERE api_key = $1",
            )
            .bind(key.as_str())
            .fetch_optional(&self.pool),
        )
        .await?)
    }

    async fn get(&self, key: &ApiKey) -> Result<Option<CredentialRecord>, StoreError> {
        let row = timed(
            &self.metrics,
            "get",
            sqlx::query_as::<_, CredentialRow>(select_credential!("WHERE api_key = $1"))
                .bind(key.as_str())
                .fetch_optional(&self.pool),
        )
        .await?;
        Ok(row.map(CredentialRecord::from))
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<CredentialRecord>, StoreError> {
        let rows = timed(
            &self.metrics,
            "list",
            sqlx::query_as::<_, CredentialRow>(select_credential!(
                "WHERE ($1::text IS NULL OR api_key > $1) AND ($2::boolean IS NULL OR active = $2) ",
                "AND ($3::text IS NULL OR owner = $3) AND ($4::text IS NULL OR master_key_id = $4) ",
                "AND ($5::text IS NULL ",
                "  OR ($5 = 'revoked' AND NOT active) ",
                "  OR ($5 = 'expired' AND active AND expires_at <= $6) ",
                "  OR ($5 = 'active' AND active AND (expires_at IS NULL OR expires_at > $6))) ",
                "ORDER BY api_key LIMIT $7"
            ))
            .bind(query.after.as_ref().map(ApiKey::as_str))
            .bind(query.active)
            .bind(query.owner.as_deref())
            .bind(query.master_key_id.as_deref())
            .bind(query.state.map(|s| s.to_string()))
            .bind(chrono::Utc::now())
            .bind(i64::from(query.limit))
            .fetch_all(&self.pool),
        )
        .await?;
        Ok(rows.into_iter().map(CredentialRecord::from).collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1 FROM api_credential LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        if !self.listening.load(Ordering::Acquire) {
            return Err(StoreError::new(
                "the invalidation listener is not connected",
            ));
        }
        Ok(())
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let (recovering, read_only): (bool, String) =
            sqlx::query_as("SELECT pg_is_in_recovery(), current_setting('transaction_read_only')")
                .fetch_one(&self.pool)
                .await?;
        if recovering || read_only != "off" {
            return Err(StoreError::new(
                "the PostgreSQL server is read-only (a standby, or default_transaction_read_only is on)",
            ));
        }
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        let changes = self.changes.subscribe();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.listener.get_or_init(|| {
                let listener = Listener {
                    connect: self.connect.clone(),
                    metrics: self.metrics.clone(),
                    listening: self.listening.clone(),
                    feed: self.changes.clone(),
                };
                AbortOnDrop(runtime.spawn(listener.run()))
            });
        }
        changes
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

/// An event's detail that could not be written as JSON.
fn encode(e: serde_json::Error) -> sqlx::Error {
    sqlx::Error::Encode(Box::new(e))
}

/// Inserts audit events within a transaction, in order.
async fn record_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    events: &[NewEvent],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO api_credential_event (api_key, event, actor, source, detail) \
         SELECT e.value ->> 'api_key', e.value ->> 'event', e.value ->> 'actor', \
                e.value ->> 'source', e.value -> 'detail' \
         FROM jsonb_array_elements($1) WITH ORDINALITY AS e(value, n) ORDER BY e.n",
    )
    .bind(Json(events))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The LISTEN side of the change feed: one connection of its own, reconnected with backoff;
/// runs until its task is aborted (with the store).
struct Listener {
    connect: PgConnectOptions,
    metrics: Metrics,
    listening: Arc<AtomicBool>,
    feed: broadcast::Sender<Change>,
}

impl Listener {
    fn set_listening(&self, up: bool) {
        self.listening.store(up, Ordering::Release);
        self.metrics.set_listener_connected(up);
    }

    fn publish(&self, change: Change) {
        // No subscriber yet (start-up) means no cache to keep honest.
        let _ = self.feed.send(change);
    }

    /// Connects a listener on its own one-connection pool, so it never takes a query slot.
    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(self.connect.clone());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }

    async fn run(self) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            match self.listen().await {
                Ok(mut listener) => {
                    // Whatever changed while we were not listening is unknown: forget it all.
                    self.publish(Change::All);
                    self.set_listening(true);
                    backoff = BACKOFF_FIRST;
                    tracing::info!("listening for credential changes");
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(note)) => self.publish(Change::Key(note.payload().to_owned())),
                            Ok(None) => {
                                // Lost and already re-established (eager reconnect): anything
                                // sent in between is gone.
                                self.metrics.listener_reconnected();
                                self.publish(Change::All);
                                tracing::warn!(
                                    "listener connection was lost and re-established; cache cleared"
                                );
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "listener connection lost");
                                break;
                            }
                        }
                    }
                    self.set_listening(false);
                    self.metrics.listener_reconnected();
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot listen for credential changes");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}
