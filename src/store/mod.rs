//! The storage seam: the `CredentialStore` trait that HTTP handlers and the authenticator
//! talk to, and the backends behind it. Handlers never see SQL; a backend is chosen once,
//! from the database URL, by [`open`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::attributes::{Scopes, State, format_time};
use crate::audit::{Event, EventQuery, Origin};
use crate::credential::ApiKey;
use crate::telemetry::Metrics;

pub mod postgres;
pub mod sqlite;

/// The columns of a [`CredentialRow`]: one list for every backend's reads and `RETURNING`s.
macro_rules! credential_columns {
    () => {
        "api_key, active, created_at, revoked_at, revoked_by, name, owner, meta, scopes, \
         expires_at, last_used_at, master_key_id"
    };
}
pub(crate) use credential_columns;

/// `SELECT` of the columns of a [`CredentialRow`] followed by the rest of a query.
macro_rules! select_credential {
    ($($rest:literal),*) => {
        concat!(
            "SELECT ", $crate::store::credential_columns!(), " FROM api_credential ",
            $($rest),*
        )
    };
}
pub(crate) use select_credential;

/// Runs one database operation and records its latency under `op`, failed ones included.
pub(crate) async fn timed<T>(
    metrics: &Metrics,
    op: &'static str,
    operation: impl std::future::Future<Output = T>,
) -> T {
    let started = std::time::Instant::now();
    let out = operation.await;
    metrics.observe_db(op, started);
    out
}

/// A credential as stored, with its computed state: never a secret, never a hash of one.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = Credential)]
pub struct CredentialRecord {
    /// The public key.
    pub api_key: String,
    /// False once revoked; never true again.
    pub active: bool,
    /// When it was registered.
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<DateTime<Utc>>,
    /// The key that revoked it; none for a revocation made in the database directly.
    pub revoked_by: Option<String>,
    /// A label for people.
    pub name: Option<String>,
    /// Whom it belongs to (an external id).
    pub owner: Option<String>,
    /// Free-form attributes, a JSON object.
    #[schema(value_type = Object)]
    pub meta: Value,
    /// What it may do, sorted.
    pub scopes: Vec<String>,
    /// When it stops authenticating, if ever.
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<DateTime<Utc>>,
    /// When it last authenticated, coarsely.
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<DateTime<Utc>>,
    /// Which master key derived its secret; none when registered before that was recorded.
    pub master_key_id: Option<String>,
    /// Active, expired or revoked, when it was read.
    pub state: State,
}

/// A row as both backends read it; `meta` is JSON text on SQLite and `jsonb` on PostgreSQL,
/// `scopes` space-separated text on both.
#[derive(sqlx::FromRow)]
pub(crate) struct CredentialRow {
    api_key: String,
    active: bool,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    revoked_by: Option<String>,
    name: Option<String>,
    owner: Option<String>,
    meta: sqlx::types::Json<Value>,
    scopes: String,
    expires_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    master_key_id: Option<String>,
}

impl From<CredentialRow> for CredentialRecord {
    fn from(row: CredentialRow) -> Self {
        let mut scopes: Vec<String> = row
            .scopes
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect();
        scopes.sort_unstable();
        scopes.dedup();
        Self {
            state: State::of(row.active, row.expires_at, Utc::now()),
            api_key: row.api_key,
            active: row.active,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
            revoked_by: row.revoked_by,
            name: row.name,
            owner: row.owner,
            meta: row.meta.0,
            scopes,
            expires_at: row.expires_at,
            last_used_at: row.last_used_at,
            master_key_id: row.master_key_id,
        }
    }
}

/// Serializes a time as the API writes every time (RFC 3339, milliseconds, `Z`).
pub(crate) fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

fn rfc3339_opt<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// A credential to register: its key and its attributes, already checked.
#[derive(Debug, Clone)]
pub struct NewCredential {
    /// The key; its secret was verified by the caller.
    pub api_key: ApiKey,
    /// A label for people.
    pub name: Option<String>,
    /// Whom it belongs to.
    pub owner: Option<String>,
    /// Free-form attributes.
    pub meta: Map<String, Value>,
    /// What it may do.
    pub scopes: Scopes,
    /// When it stops authenticating.
    pub expires_at: Option<DateTime<Utc>>,
    /// The master key that verified its pair.
    pub master_key_id: Option<String>,
    /// Minted by the service (`issued` in the audit log) rather than registered by its
    /// holder (`registered`).
    pub issued: bool,
}

impl NewCredential {
    /// A credential registered by its holder, with no attributes but these scopes.
    pub fn new(api_key: ApiKey, scopes: Scopes) -> Self {
        Self {
            api_key,
            name: None,
            owner: None,
            meta: Map::new(),
            scopes,
            expires_at: None,
            master_key_id: None,
            issued: false,
        }
    }
}

/// What authentication needs of a stored credential.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuthRecord {
    /// False once revoked.
    pub active: bool,
    /// Space-separated scopes, as stored.
    pub scopes: String,
    /// Whom it belongs to.
    pub owner: Option<String>,
    /// When it stops authenticating.
    pub expires_at: Option<DateTime<Utc>>,
    /// Which master key derived its secret, once known.
    pub master_key_id: Option<String>,
}

/// A change of attributes: each `Some` replaces the stored value (`Some(None)` clears it).
#[derive(Debug, Clone, Default)]
pub struct Update {
    /// New name.
    pub name: Option<Option<String>>,
    /// New owner.
    pub owner: Option<Option<String>>,
    /// New meta, replacing the old one whole.
    pub meta: Option<Map<String, Value>>,
    /// New scopes.
    pub scopes: Option<Scopes>,
    /// New expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

impl Update {
    /// Whether it changes what a cached authentication holds (scopes, expiry, owner).
    pub fn touches_authentication(&self) -> bool {
        self.scopes.is_some() || self.expires_at.is_some() || self.owner.is_some()
    }
}

/// Result of a roll (SPEC §8.2). Anything but `Rolled` wrote nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Rolled {
    /// The new credential, durably registered with the old one's attributes; the old one's
    /// expiry was moved to the end of the grace period.
    Rolled(Box<CredentialRecord>),
    /// The old key was never registered.
    NotFound,
    /// The old key is revoked.
    Revoked,
    /// The old key is past its expiry.
    Expired,
    /// The new key is registered already.
    Duplicate,
}

impl Rolled {
    /// Why a credential whose row reads `(active, expires_at)` — or no row — cannot be
    /// rolled now; `None` when it can.
    pub(crate) fn refusal(row: Option<(bool, Option<DateTime<Utc>>)>) -> Option<Self> {
        match row {
            None => Some(Self::NotFound),
            Some((false, _)) => Some(Self::Revoked),
            Some((true, Some(at))) if at <= Utc::now() => Some(Self::Expired),
            Some(_) => None,
        }
    }
}

/// Result of an update.
#[derive(Debug, Clone, PartialEq)]
pub enum Updated {
    /// Changed, durably; the credential as it is now.
    Changed(Box<CredentialRecord>),
    /// The key was never registered.
    NotFound,
    /// The key is revoked: it cannot change.
    Revoked,
}

/// Result of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The key was stored, durably.
    Created,
    /// The key was already stored (active or revoked); nothing changed.
    Duplicate,
}

/// Result of a revocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// This call revoked the key, durably.
    Revoked,
    /// The key is unknown or was already revoked; nothing changed.
    NotFound,
}

impl Registration {
    /// The outcome of an `INSERT … ON CONFLICT DO NOTHING` that touched `rows` rows.
    pub(crate) fn from_rows(rows: u64) -> Self {
        if rows == 1 {
            Self::Created
        } else {
            Self::Duplicate
        }
    }
}

impl Revocation {
    /// The outcome of an `UPDATE … WHERE active` that touched `rows` rows.
    pub(crate) fn from_rows(rows: u64) -> Self {
        if rows == 1 {
            Self::Revoked
        } else {
            Self::NotFound
        }
    }
}

/// A page request for [`CredentialStore::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only keys sorting after this one.
    pub after: Option<ApiKey>,
    /// Only active (true) or revoked (false) credentials.
    pub active: Option<bool>,
    /// Only credentials of this owner.
    pub owner: Option<String>,
    /// Only credentials in this state, now.
    pub state: Option<State>,
    /// Only credentials derived with this master key.
    pub master_key_id: Option<String>,
    /// At most this many records.
    pub limit: u32,
}

/// A database failure: what failed, and the database driver's error that caused it (kept,
/// not flattened, so the edge that answers 500 can log the whole chain once). Neither goes
/// to a caller.
#[derive(Debug, Clone)]
pub struct StoreError {
    context: Arc<str>,
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
    /// The database refused this one statement (a constraint or an operator's trigger);
    /// the database itself is fine and other writes may go on.
    statement: bool,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.context)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl StoreError {
    /// A failure of the database, the file or the connection to it, described by `context`.
    pub fn new(context: impl Into<Arc<str>>) -> Self {
        Self {
            context: context.into(),
            cause: None,
            statement: false,
        }
    }

    /// Whether only the statement was refused (a constraint or trigger), not the database
    /// as a whole failing (I/O error, full disk, read-only file, lost connection).
    pub fn is_statement_error(&self) -> bool {
        self.statement
    }

    /// The whole chain, `context: cause: …`, for logs.
    pub fn report(&self) -> crate::telemetry::Report<'_> {
        crate::telemetry::Report(self)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        // SQLite's primary result codes (the low byte of the extended code) that concern one
        // statement: SQLITE_TOOBIG 18, SQLITE_CONSTRAINT 19, SQLITE_MISMATCH 20, SQLITE_RANGE
        // 25. PostgreSQL's class 23 (integrity constraint violation) is the same thing.
        let statement = match &e {
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                code.starts_with("23")
                    || code
                        .parse::<i32>()
                        .is_ok_and(|c| matches!(c & 0xff, 18 | 19 | 20 | 25))
            }),
            _ => false,
        };
        Self {
            context: "database error".into(),
            cause: Some(Arc::new(e)),
            statement,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        // The same primary result codes as for sqlx's SQLite errors above.
        let statement = matches!(
            &e,
            rusqlite::Error::SqliteFailure(failure, _)
                if matches!(failure.extended_code & 0xff, 18 | 19 | 20 | 25)
        );
        Self {
            context: "database error".into(),
            cause: Some(Arc::new(e)),
            statement,
        }
    }
}

/// A change that cached authentications must not outlive, published by a backend's change
/// feed (other instances, direct SQL, this instance's own writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// This key changed (revoked, removed, or its scopes, expiry or owner) in the database.
    Key(String),
    /// Changes may have been missed (the feed was down): forget everything.
    All,
}

/// How many changes the feed buffers for a slow subscriber; one that falls further behind
/// is told to forget everything (`RecvError::Lagged`), so nothing is ever missed silently.
pub(crate) const CHANGE_FEED_CAPACITY: usize = 4096;

/// Aborts a background task when dropped, so none outlives the handle that owns it.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where credentials live. One implementation per database; all share this contract.
#[async_trait]
pub trait CredentialStore: Send + Sync + 'static {
    /// Stores a new active credential, and its audit event. Exactly one of concurrent calls
    /// for a key gets `Created`.
    async fn register(
        &self,
        new: &NewCredential,
        origin: &Origin,
    ) -> Result<Registration, StoreError>;

    /// Revokes an active credential, recording who did it (`revoked_by` is the origin's
    /// actor) and its audit event. Exactly one of concurrent calls for a key gets `Revoked`.
    async fn revoke(&self, key: &ApiKey, origin: &Origin) -> Result<Revocation, StoreError>;

    /// What authentication needs of a key; `None` when it was never registered.
    async fn lookup(&self, key: &ApiKey) -> Result<Option<AuthRecord>, StoreError>;

    /// Changes the attributes of a credential that is not revoked, with its audit event.
    async fn update(
        &self,
        key: &ApiKey,
        update: &Update,
        origin: &Origin,
    ) -> Result<Updated, StoreError>;

    /// Sets `last_used_at` of these credentials to `at`, unless a later use is recorded
    /// already (another instance): one batch per interval (SPEC §8.4).
    async fn touch(&self, keys: &[ApiKey], at: DateTime<Utc>) -> Result<(), StoreError>;

    /// [`touch`](Self::touch), for a write that can wait for a moment when the store has
    /// nothing else to write, until `latest` at the latest: the paced last-used writes,
    /// which should not hold durable writes back. By default written at once.
    async fn touch_when_idle(
        &self,
        keys: &[ApiKey],
        at: DateTime<Utc>,
        latest: std::time::Instant,
    ) -> Result<(), StoreError> {
        let _ = latest;
        self.touch(keys, at).await
    }

    /// Records which master key derived these credentials' secrets, for credentials
    /// registered before that was recorded (SPEC §7.1: learnt at their next successful
    /// authentication). Leaves a recorded id as it is.
    async fn record_master_key_id(&self, keys: &[ApiKey], id: &str) -> Result<(), StoreError>;

    /// Registers `new` (derived with master key `master_key_id`) with the attributes of the
    /// active, unexpired credential `old`, and moves `old`'s expiry to `old_until` unless it
    /// ends sooner: both in one transaction with their audit events (`rolled` for the old
    /// key, `issued` for the new one), or nothing.
    async fn roll(
        &self,
        old: &ApiKey,
        new: &ApiKey,
        master_key_id: &str,
        old_until: DateTime<Utc>,
        origin: &Origin,
    ) -> Result<Rolled, StoreError>;

    /// A page of the audit log, oldest first.
    async fn events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError>;

    /// Deletes the audit events written before `before`; returns how many.
    async fn prune_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// One credential, revoked or not.
    async fn get(&self, key: &ApiKey) -> Result<Option<CredentialRecord>, StoreError>;

    /// A page of credentials ordered by key.
    async fn list(&self, query: &ListQuery) -> Result<Vec<CredentialRecord>, StoreError>;

    /// Whether the database answers, and (SQLite) whether the last write committed.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether the database accepts durable writes now: `serve` refuses to start on one
    /// that does not, rather than say it is ready and fail every write.
    async fn check_writable(&self) -> Result<(), StoreError>;

    /// The change feed: every change made by anyone (other instances, direct SQL) that a
    /// cached authentication must not outlive. The backend runs the feed itself, for as long
    /// as the store lives.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change>;

    /// Finishes the writes already accepted and stops the backend's background work; later
    /// writes fail. Called once when the service stops.
    async fn close(&self);
}

/// Which database a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server.
    Postgres(String),
}

impl DatabaseTarget {
    /// Parses `sqlite://relative/path.db`, `sqlite:///absolute/path.db` or `postgres://…`.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("the sqlite:// URL names no file".into());
            }
            return Ok(Self::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_owned()));
        }
        Err("the database URL must start with sqlite:// or postgres://".into())
    }
}

/// Connection settings that apply to every backend.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// Most database connections for queries (PostgreSQL; SQLite reads use a few).
    pub max_connections: u32,
    /// Longest a query may run, and longest to wait for a free connection.
    pub timeout: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            max_connections: crate::config::DEFAULT_DB_MAX_CONNECTIONS,
            timeout: crate::config::DEFAULT_DB_TIMEOUT,
        }
    }
}

/// Opens (creating when absent) and migrates the database a target names.
pub async fn open(
    target: &DatabaseTarget,
    settings: &StoreSettings,
    metrics: Metrics,
) -> anyhow::Result<Arc<dyn CredentialStore>> {
    match target {
        DatabaseTarget::Sqlite(path) => Ok(Arc::new(
            sqlite::SqliteStore::open(path, sqlite::SqliteOptions::default(), metrics).await?,
        )),
        DatabaseTarget::Postgres(url) => Ok(Arc::new(
            postgres::PgStore::open(url, settings, metrics).await?,
        )),
    }
}

/// Applies the schema to the database a target names.
pub async fn migrate(target: &DatabaseTarget) -> anyhow::Result<()> {
    match target {
        DatabaseTarget::Sqlite(path) => sqlite::SqliteStore::migrate(path).await,
        DatabaseTarget::Postgres(url) => postgres::PgStore::migrate(url).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(
            DatabaseTarget::parse("sqlite://data/x.db"),
            Ok(DatabaseTarget::Sqlite("data/x.db".into()))
        );
        assert_eq!(
            DatabaseTarget::parse("sqlite:///var/lib/x.db"),
            Ok(DatabaseTarget::Sqlite("/var/lib/x.db".into()))
        );
        assert!(matches!(
            DatabaseTarget::parse("postgres://u@h/db"),
            Ok(DatabaseTarget::Postgres(_))
        ));
        assert!(DatabaseTarget::parse("sqlite://").is_err());
        assert!(DatabaseTarget::parse("mysql://h/db").is_err());
        assert!(DatabaseTarget::parse("x.db").is_err());
    }
}
