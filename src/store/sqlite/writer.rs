//! The one writer: a thread of its own with its own rusqlite connection, which commits every
//! write waiting in its queue in one transaction (one fsync for the batch) and answers each
//! caller only after that commit. A whole batch, `BEGIN` to `COMMIT`, runs on this thread
//! without a hand-off: through an async driver each statement waited for the runtime to
//! schedule the writer again, behind the very requests whose writes it was holding.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

use super::lookups::parse_time;
use super::{FileIdentity, WriteHealth};
use crate::attributes::format_time;
use crate::audit::{EventKind, NewEvent, Origin};
use crate::credential::ApiKey;
use crate::store::{
    CredentialRow, NewCredential, Registration, Revocation, Rolled, StoreError, Update, Updated,
    credential_columns,
};
use crate::telemetry::Metrics;

/// How often the writer, while writes are failing, tries a probe write to find out whether
/// the database accepts them again (and, when healthy, checks the file is still in place).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Prepared statements kept per connection: every statement the writer runs, with room.
const STATEMENT_CACHE: usize = 32;

/// WAL frames after which the writer checkpoints itself (~40 MiB of 4 KiB pages). The
/// checkpointer thread copies frames into the database as they come, so the writer's own
/// checkpoint finds at most one pass's worth left to copy; it is what lets the WAL start
/// over from its beginning (the log restarts only once every frame was copied, which a
/// checkpointer racing the writer's next transaction never sees). At 2 000 frames the
/// writer's checkpoints came every ~0.1 s under sustained registrations and did much of
/// the copying inside commits.
const WRITER_CHECKPOINT_FRAMES: i64 = 10_000;

/// How long the checkpointer waits after a pass that found nothing to copy, and after one
/// that did. A pass copies every page changed since the last once, and ends with an fsync
/// of the database file: every 5 ms under load, the pages every batch changes (the end of
/// the event log, the upper levels of the B-trees) were copied again and again, and the
/// database's fsyncs slowed the commits' own. Every 200 ms (4 000–5 000 frames at 20 000
/// registrations/s, under [`WRITER_CHECKPOINT_FRAMES`]) the checkpointer took 2.6 µs
/// of CPU per registration against 6–7 µs every 50 ms; the price is a larger copy and fsync
/// per pass, which shows in the slowest commits (p99 33–37 ms against 26–32 ms).
const CHECKPOINT_IDLE: Duration = Duration::from_millis(100);
const CHECKPOINT_BUSY: Duration = Duration::from_millis(200);

/// How long the queue must stay empty before the writer takes a write that waits for it to
/// be idle: longer than the gaps between batches under sustained writes, so that a paced
/// last-used chunk (1 000 rows: several ms of the writer's time and a larger fsync) is not
/// committed with, and ahead of, the registrations in flight.
const IDLE_AFTER: Duration = Duration::from_millis(2);

/// What the writer's queue carries.
pub(super) enum Message {
    Write(WriteOp),
    /// Commit (and answer) what is queued, then stop.
    Close,
}

/// One write, with the channel its caller waits on.
pub(super) enum WriteOp {
    Register {
        new: Box<NewCredential>,
        /// Its columns and event as text, made by the caller: the writer is one thread
        /// for every write, so what can be done before it is done before it.
        row: Box<RowText>,
        event: Box<EventRow>,
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
        /// Written only once the queue is idle, until this time at the latest (see
        /// [`IDLE_AFTER`]); at once when `None`.
        idle_until: Option<Instant>,
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

/// A registration's columns that are stored as text of their own making.
pub(super) struct RowText {
    pub(super) meta: String,
    pub(super) scopes: String,
    pub(super) expires_at: Option<String>,
}

impl WriteOp {
    /// Whether this write waits, at `now`, for an idle moment.
    fn waits_for_idle(&self, now: Instant) -> bool {
        matches!(self, Self::Touch { idle_until: Some(until), .. } if *until > now)
    }
}

impl RowText {
    pub(super) fn of(new: &NewCredential) -> Result<Self, StoreError> {
        Ok(Self {
            meta: serde_json::to_string(&new.meta).map_err(encode)?,
            scopes: new.scopes.to_stored(),
            expires_at: new.expires_at.as_ref().map(format_time),
        })
    }
}

/// An audit event as its row's values.
pub(super) struct EventRow {
    api_key: String,
    event: &'static str,
    actor: Option<String>,
    source: &'static str,
    detail: Box<serde_json::value::RawValue>,
}

impl EventRow {
    pub(super) fn of(event: NewEvent) -> Self {
        Self {
            detail: event.detail,
            api_key: event.api_key,
            event: event.event,
            actor: event.actor,
            source: event.source,
        }
    }

    /// The values of [`INSERT_EVENT`], written `at`.
    fn values<'a>(&'a self, at: &'a str) -> impl rusqlite::Params + 'a {
        (
            &self.api_key,
            self.event,
            &self.actor,
            self.source,
            self.detail.get(),
            at,
        )
    }

    /// Whether this event made its credential (which then points at it).
    fn makes_credential(&self) -> bool {
        [EventKind::Registered, EventKind::Issued]
            .iter()
            .any(|kind| kind.as_str() == self.event)
    }
}

/// A value that could not be written as JSON for the database.
pub(super) fn encode(e: serde_json::Error) -> StoreError {
    StoreError::from(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// A roll's inputs, boxed in the queue.
pub(super) struct Roll {
    pub(super) old: ApiKey,
    pub(super) new: ApiKey,
    pub(super) master_key_id: String,
    pub(super) old_until: DateTime<Utc>,
    pub(super) origin: Origin,
}

pub(super) enum Outcome {
    Registration(Registration),
    Update(Updated),
    Roll(Rolled),
    MasterKeyId,
    Touch,
    Revocation(Revocation),
    Probe,
}

/// Opens a connection for writing. Never creates the file: a deleted database is an error,
/// not a fresh empty one.
pub(super) fn connect(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update_and_check(None, "journal_mode", "wal", |row| row.get::<_, String>(0))?;
    // FULL: an acknowledged write survives a power loss, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update_and_check(
        None,
        "wal_autocheckpoint",
        WRITER_CHECKPOINT_FRAMES,
        |row| row.get::<_, i64>(0),
    )?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Copies WAL frames into the database file beside the writer, so a commit rarely waits
/// for a checkpoint's writes and fsync (SQLite's automatic checkpoint runs inside the
/// commit that crosses its threshold). Runs until `stop` is dropped.
fn checkpointer(path: &Path, busy_timeout: Duration, stop: &Receiver<()>) {
    let mut conn: Option<Connection> = None;
    let mut wait = CHECKPOINT_IDLE;
    // The WAL's frames and those copied, at the last pass: while they move, the writer is
    // busy and the next pass comes soon.
    let mut last = (0, 0);
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(wait) {
        wait = CHECKPOINT_IDLE;
        if conn.is_none() {
            // The writer reports a missing or broken file; this thread only retries.
            conn = connect(path, busy_timeout).ok();
        }
        let Some(c) = &conn else { continue };
        // PASSIVE: never waits for the writer or readers, copies what it can.
        match c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        }) {
            Ok(now) => {
                if now != last {
                    wait = CHECKPOINT_BUSY;
                }
                last = now;
            }
            Err(_) => conn = None,
        }
    }
}

/// The writer thread's state. It owns its connection, and throws it away after any failed
/// write: a connection whose `COMMIT` failed may still be inside a transaction, and every
/// later write would then land in a transaction that is never committed.
pub(super) struct Writer {
    pub(super) conn: Option<Connection>,
    pub(super) busy_timeout: Duration,
    pub(super) file: Arc<FileIdentity>,
    pub(super) health: Arc<WriteHealth>,
    pub(super) metrics: Metrics,
}

impl Writer {
    /// The thread's loop: until told to close (or every sender is gone), take what is
    /// queued, up to `max_batch`, and commit it.
    pub(super) fn run(self, rx: &Receiver<Message>, max_batch: usize) {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (path, busy_timeout) = (self.file.path.clone(), self.busy_timeout);
        std::thread::scope(|scope| {
            let checkpoints = std::thread::Builder::new()
                .name("credgate-ckpt".into())
                .spawn_scoped(scope, move || checkpointer(&path, busy_timeout, &stopped));
            if let Err(e) = checkpoints {
                // The writer's own checkpoints still bound the WAL.
                tracing::warn!(error = %e, "cannot start the SQLite checkpoint thread");
            }
            self.write_until_closed(rx, max_batch);
            drop(stop);
        });
    }

    fn write_until_closed(mut self, rx: &Receiver<Message>, max_batch: usize) {
        let mut batch = Vec::with_capacity(max_batch);
        // Writes waiting for the queue to be idle, in the order they came.
        let mut waiting = VecDeque::new();
        let mut watched = Instant::now();
        let mut closing = false;
        while !closing {
            let wait = if waiting.is_empty() {
                PROBE_EVERY
            } else {
                IDLE_AFTER
            };
            match rx.recv_timeout(wait) {
                Ok(first) => {
                    let now = Instant::now();
                    let mut next = Some(first);
                    while let Some(message) = next.take() {
                        match message {
                            Message::Write(op) if op.waits_for_idle(now) => waiting.push_back(op),
                            Message::Write(op) => batch.push(op),
                            Message::Close => closing = true,
                        }
                        if !closing && batch.len() < max_batch {
                            next = rx.try_recv().ok();
                        }
                    }
                }
                // Idle: one waiting write, alone (another write coming now waits behind
                // only that one).
                Err(RecvTimeoutError::Timeout) => batch.extend(waiting.pop_front()),
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Waiting writes whose time is up go with this batch.
            let now = Instant::now();
            for _ in 0..waiting.len() {
                if let Some(op) = waiting.pop_front() {
                    if op.waits_for_idle(now) {
                        waiting.push_back(op);
                    } else {
                        batch.push(op);
                    }
                }
            }
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            if watched.elapsed() >= PROBE_EVERY {
                self.watch();
                watched = Instant::now();
            }
        }
        // New writes are refused by now (the store set its flag before sending `Close`):
        // commit, and answer, every one already queued, the waiting ones too.
        batch.extend(waiting.drain(..));
        loop {
            batch.extend(
                rx.try_iter()
                    .filter_map(|message| match message {
                        Message::Write(op) => Some(op),
                        Message::Close => None,
                    })
                    .take(max_batch),
            );
            if batch.is_empty() {
                break;
            }
            self.commit(&mut batch);
        }
        if let Some(conn) = self.conn.take()
            && let Err((_, e)) = conn.close()
        {
            tracing::warn!(error = %e, "closing the SQLite writer connection");
        }
    }

    /// Between writes: notice a deleted file at once, and while writes fail, probe until
    /// one commits so readiness comes back without waiting for a client to write.
    fn watch(&mut self) {
        if let Err(reason) = self.file.check() {
            self.fail(&reason);
        } else if self.health.is_failing() {
            let (reply, _) = oneshot::channel();
            let mut probe = vec![WriteOp::Probe { reply }];
            self.commit(&mut probe);
        }
    }

    fn fail(&mut self, reason: &str) {
        self.conn = None;
        self.health.failed(reason);
    }

    /// The connection, reopened when the last write failed.
    fn connection(&mut self) -> Result<&Connection, StoreError> {
        self.file.check().map_err(StoreError::new)?;
        if self.conn.is_none() {
            self.conn = Some(connect(&self.file.path, self.busy_timeout)?);
        }
        self.conn
            .as_ref()
            .ok_or_else(|| StoreError::new("the SQLite writer has no connection"))
    }

    /// Commits a batch and answers every write in it, each only after its commit.
    fn commit(&mut self, batch: &mut Vec<WriteOp>) {
        let started = Instant::now();
        let result = self.connection().and_then(|conn| apply(conn, batch));
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
                for op in std::mem::take(batch) {
                    self.commit(&mut vec![op]);
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

/// Applies writes in one transaction; answers exist only once `COMMIT` returned OK. A
/// connection that failed here is discarded by the caller, so each batch starts on a
/// connection in autocommit mode (and `BEGIN` itself fails if it were not).
pub(super) fn apply(conn: &Connection, ops: &[WriteOp]) -> Result<Vec<Outcome>, StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    // One time for the batch's new rows and events, as the schema's defaults would write
    // it (formatting it per row in SQL cost a tenth of the writer's instructions).
    let at = format_time(&Utc::now());
    let mut outcomes = Vec::with_capacity(ops.len());
    let mut events = Vec::new();
    let mut marker = Marker(false);
    let result = apply_within(conn, ops, &at, &mut outcomes, &mut events, &mut marker)
        .and_then(|()| record(conn, &events, &at, marker));
    if let Err(e) = result {
        // Best effort: the caller discards this connection whatever happens here.
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e);
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
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
    fn set(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        if !self.0 {
            conn.prepare_cached("INSERT INTO credgate_audit_writer (id) VALUES (1)")?
                .execute([])?;
            self.0 = true;
        }
        Ok(())
    }
}

/// Whether a key is stored and active; `None` when it is not stored.
fn active(conn: &Connection, key: &ApiKey) -> rusqlite::Result<Option<bool>> {
    conn.prepare_cached("SELECT active FROM api_credential WHERE api_key = ?1")?
        .query_row([key.as_str()], |row| row.get(0))
        .optional()
}

/// The writes of a batch, inside its transaction, collecting their audit events. (Each
/// check before a write is exact: the transaction holds the write lock.)
fn apply_within(
    conn: &Connection,
    ops: &[WriteOp],
    at: &str,
    outcomes: &mut Vec<Outcome>,
    events: &mut Vec<EventRow>,
    marker: &mut Marker,
) -> Result<(), StoreError> {
    // The batch's registrations first, with their events: they were all in flight
    // together, so any order among the batch's writes is one they could have had.
    let news: Vec<(&NewCredential, &RowText, &EventRow)> = ops
        .iter()
        .filter_map(|op| match op {
            WriteOp::Register {
                new, row, event, ..
            } => Some((&**new, &**row, &**event)),
            _ => None,
        })
        .collect();
    let mut registrations = register_all(conn, &news, at, marker)?.into_iter();
    for op in ops {
        let outcome = match op {
            WriteOp::Register { .. } => {
                let created = registrations
                    .next()
                    .ok_or_else(|| StoreError::new("registration outcome missing"))?;
                Outcome::Registration(created)
            }
            WriteOp::Update {
                key,
                update,
                origin,
                ..
            } => {
                let updated = self::update(conn, key, update, marker)?;
                if matches!(updated, Updated::Changed(_)) {
                    events.push(EventRow::of(origin.updated(key, update).map_err(encode)?));
                }
                Outcome::Update(updated)
            }
            WriteOp::Roll { roll, .. } => {
                let rolled = self::roll(conn, roll, at, marker)?;
                if let Rolled::Rolled(record) = &rolled {
                    for made in roll
                        .origin
                        .rolled(&roll.old, &roll.new, record, roll.old_until)
                        .map_err(encode)?
                    {
                        events.push(EventRow::of(made));
                    }
                }
                Outcome::Roll(rolled)
            }
            WriteOp::Touch { keys, at, .. } => {
                conn.prepare_cached(
                    "UPDATE api_credential SET last_used_at = ?1 \
                     WHERE api_key IN (SELECT value FROM json_each(?2)) \
                     AND (last_used_at IS NULL OR last_used_at < ?1)",
                )?
                .execute([at, keys])?;
                Outcome::Touch
            }
            WriteOp::MasterKeyId { keys, id, .. } => {
                conn.prepare_cached(
                    "UPDATE api_credential SET master_key_id = ?1 \
                     WHERE api_key IN (SELECT value FROM json_each(?2)) AND master_key_id IS NULL",
                )?
                .execute([id, keys])?;
                Outcome::MasterKeyId
            }
            WriteOp::Revoke { key, .. } if active(conn, key)? != Some(true) => {
                Outcome::Revocation(Revocation::NotFound)
            }
            WriteOp::Revoke { key, origin, .. } => {
                marker.set(conn)?;
                let done = conn
                    .prepare_cached(
                        "UPDATE api_credential SET active = 0, revoked_by = ?1 \
                         WHERE api_key = ?2 AND active = 1",
                    )?
                    .execute(params![
                        origin.actor.as_ref().map(ApiKey::as_str),
                        key.as_str()
                    ])?;
                let revoked = Revocation::from_rows(done as u64);
                if revoked == Revocation::Revoked {
                    events.push(EventRow::of(origin.revoked(key).map_err(encode)?));
                }
                Outcome::Revocation(revoked)
            }
            WriteOp::Probe { .. } => {
                conn.prepare_cached(
                    "INSERT INTO credgate_write_probe (id, at) \
                     VALUES (1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
                     ON CONFLICT (id) DO UPDATE SET at = excluded.at",
                )?
                .execute([])?;
                Outcome::Probe
            }
        };
        outcomes.push(outcome);
    }
    Ok(())
}

/// Inserts an audit event (`Statement::insert` answers its id).
const INSERT_EVENT: &str = "INSERT INTO api_credential_event \
                            (api_key, event, actor, source, detail, at) \
                            VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Writes a batch's audit events (other than its registrations'), in order, and removes
/// the marker row: both in the batch's transaction, just before its `COMMIT`.
fn record(
    conn: &Connection,
    events: &[EventRow],
    at: &str,
    marker: Marker,
) -> Result<(), StoreError> {
    let mut insert = conn.prepare_cached(INSERT_EVENT)?;
    for e in events {
        let id = insert.insert(e.values(at))?;
        // A roll's new credential: its row points at the event that made it (the schema's
        // trigger does this only for rows written by SQL).
        if e.makes_credential() {
            conn.prepare_cached(
                "UPDATE api_credential SET registered_event = ?1 WHERE api_key = ?2",
            )?
            .execute(params![id, e.api_key])?;
        }
    }
    if marker.0 {
        conn.prepare_cached("DELETE FROM credgate_audit_writer")?
            .execute([])?;
    }
    Ok(())
}

/// Registers a batch's credentials, in order, each with its event: the first of several
/// registrations of one key wins. Stored keys are found before anything is written, so a
/// batch of duplicates writes nothing and is answered even while the disk is full.
fn register_all(
    conn: &Connection,
    news: &[(&NewCredential, &RowText, &EventRow)],
    at: &str,
    marker: &mut Marker,
) -> rusqlite::Result<Vec<Registration>> {
    if news.is_empty() {
        return Ok(Vec::new());
    }
    let mut stored = conn.prepare_cached("SELECT 1 FROM api_credential WHERE api_key = ?1")?;
    let mut insert_event = conn.prepare_cached(INSERT_EVENT)?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO api_credential \
         (api_key, name, owner, meta, scopes, expires_at, master_key_id, registered_event, \
          created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (api_key) DO NOTHING",
    )?;
    let mut seen: HashSet<&str> = HashSet::with_capacity(news.len());
    let mut outcomes = Vec::with_capacity(news.len());
    for (new, row, event) in news {
        let key = new.api_key.as_str();
        if !seen.insert(key) || stored.exists([key])? {
            outcomes.push(Registration::Duplicate);
            continue;
        }
        marker.set(conn)?;
        // The event first, so the row is written once, with its event's id (an update of
        // the row after it would write the row twice).
        let event_id = insert_event.insert(event.values(at))?;
        let inserted = insert.execute(params![
            key,
            new.name,
            new.owner,
            row.meta,
            row.scopes,
            row.expires_at,
            new.master_key_id,
            event_id,
            at,
        ])?;
        // Created only when this statement stored the row (an operator's trigger could
        // skip it); then nothing was registered, and no event says otherwise.
        outcomes.push(if inserted == 1 {
            Registration::Created
        } else {
            conn.prepare_cached("DELETE FROM api_credential_event WHERE id = ?1")?
                .execute([event_id])?;
            Registration::Duplicate
        });
    }
    Ok(outcomes)
}

/// A stored time column, in any format [`parse_time`] reads.
fn time(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
    row.get::<_, Option<String>>(index)?
        .map(|text| parse_time(&text))
        .transpose()
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, e.into())
        })
}

/// A row of `credential_columns!()`.
fn credential_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<CredentialRow> {
    let meta: String = row.get(7)?;
    let meta = serde_json::from_str(&meta).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(7, rusqlite::types::Type::Text, e.into())
    })?;
    Ok(CredentialRow {
        api_key: row.get(0)?,
        active: row.get(1)?,
        created_at: time(row, 2)?.ok_or(rusqlite::Error::InvalidColumnType(
            2,
            "created_at".into(),
            rusqlite::types::Type::Null,
        ))?,
        revoked_at: time(row, 3)?,
        revoked_by: row.get(4)?,
        name: row.get(5)?,
        owner: row.get(6)?,
        meta: sqlx::types::Json(meta),
        scopes: row.get(8)?,
        expires_at: time(row, 9)?,
        last_used_at: time(row, 10)?,
        master_key_id: row.get(11)?,
    })
}

/// Changes the given attributes of an active credential.
fn update(
    conn: &Connection,
    key: &ApiKey,
    update: &Update,
    marker: &mut Marker,
) -> Result<Updated, StoreError> {
    match active(conn, key)? {
        None => return Ok(Updated::NotFound),
        Some(false) => return Ok(Updated::Revoked),
        Some(true) => {}
    }
    marker.set(conn)?;
    let meta = update
        .meta
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(encode)?;
    let row = conn
        .prepare_cached(concat!(
            "UPDATE api_credential SET ",
            "name = CASE WHEN ?1 THEN ?2 ELSE name END, ",
            "owner = CASE WHEN ?3 THEN ?4 ELSE owner END, ",
            "meta = COALESCE(?5, meta), ",
            "scopes = COALESCE(?6, scopes), ",
            "expires_at = CASE WHEN ?7 THEN ?8 ELSE expires_at END ",
            "WHERE api_key = ?9 AND active = 1 RETURNING ",
            credential_columns!()
        ))?
        .query_row(
            params![
                update.name.is_some(),
                update.name.clone().flatten(),
                update.owner.is_some(),
                update.owner.clone().flatten(),
                meta,
                update.scopes.as_ref().map(|s| s.to_stored()),
                update.expires_at.is_some(),
                update.expires_at.flatten().as_ref().map(format_time),
                key.as_str(),
            ],
            credential_row,
        )
        .optional()?;
    // Checked active above, within this transaction.
    Ok(row.map_or(Updated::Revoked, |row| {
        Updated::Changed(Box::new(row.into()))
    }))
}

/// Rolls within the writer's transaction: the checks, the new row and the old one's expiry
/// commit together (a failure rolls back the batch, and the writer retries each write alone).
fn roll(
    conn: &Connection,
    roll: &Roll,
    at: &str,
    marker: &mut Marker,
) -> Result<Rolled, StoreError> {
    let row = conn
        .prepare_cached("SELECT active, expires_at FROM api_credential WHERE api_key = ?1")?
        .query_row([roll.old.as_str()], |row| Ok((row.get(0)?, time(row, 1)?)))
        .optional()?;
    if let Some(refused) = Rolled::refusal(row) {
        return Ok(refused);
    }
    marker.set(conn)?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO api_credential \
             (api_key, name, owner, meta, scopes, expires_at, master_key_id, created_at) \
             SELECT ?1, name, owner, meta, scopes, expires_at, ?2, ?4 FROM api_credential \
             WHERE api_key = ?3 ON CONFLICT (api_key) DO NOTHING",
        )?
        .execute([
            roll.new.as_str(),
            roll.master_key_id.as_str(),
            roll.old.as_str(),
            at,
        ])?;
    if inserted != 1 {
        return Ok(Rolled::Duplicate);
    }
    conn.prepare_cached(
        "UPDATE api_credential SET expires_at = ?1 \
         WHERE api_key = ?2 AND (expires_at IS NULL OR expires_at > ?1)",
    )?
    .execute([format_time(&roll.old_until).as_str(), roll.old.as_str()])?;
    let new = conn
        .prepare_cached(concat!(
            "SELECT ",
            credential_columns!(),
            " FROM api_credential WHERE api_key = ?1"
        ))?
        .query_row([roll.new.as_str()], credential_row)?;
    Ok(Rolled::Rolled(Box::new(new.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer thread on `path`, and its queue.
    fn start_writer(
        path: &Path,
    ) -> (
        std::sync::mpsc::Sender<Message>,
        std::thread::JoinHandle<()>,
    ) {
        let writer = Writer {
            conn: Some(connect(path, Duration::from_secs(5)).expect("a connection")),
            busy_timeout: Duration::from_secs(5),
            file: Arc::new(FileIdentity::open(path).expect("the file")),
            health: Arc::new(WriteHealth::default()),
            metrics: Metrics::new().expect("metrics"),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || writer.run(&rx, 64));
        (tx, thread)
    }

    /// Registers a new key, in a transaction of its own.
    fn register(conn: &Connection) -> ApiKey {
        let new = NewCredential::new(
            ApiKey::generate(),
            crate::attributes::Scopes::parse_list("*").expect("scopes"),
        );
        let key = new.api_key.clone();
        let (reply, _) = oneshot::channel();
        let register = WriteOp::Register {
            row: Box::new(RowText::of(&new).expect("row")),
            event: Box::new(EventRow::of(
                Origin::cli().registered(&new).expect("an event"),
            )),
            new: Box::new(new),
            reply,
        };
        apply(conn, &[register]).expect("a registration");
        key
    }

    /// A registered key, and the message that sets its last use to `at` when the writer is
    /// idle, before `until` at the latest.
    fn touch_when_idle(
        path: &Path,
        at: &str,
        until: Instant,
    ) -> (ApiKey, Message, oneshot::Receiver<Result<(), StoreError>>) {
        let conn = connect(path, Duration::from_secs(5)).expect("a connection");
        let key = register(&conn);
        let (reply, answer) = oneshot::channel();
        let touch = Message::Write(WriteOp::Touch {
            keys: format!("[\"{}\"]", key.as_str()),
            at: at.to_owned(),
            idle_until: Some(until),
            reply,
        });
        (key, touch, answer)
    }

    fn last_used(path: &Path, key: &ApiKey) -> Option<String> {
        connect(path, Duration::from_secs(5))
            .expect("a connection")
            .query_row(
                "SELECT last_used_at FROM api_credential WHERE api_key = ?1",
                [key.as_str()],
                |row| row.get(0),
            )
            .expect("the credential")
    }

    /// A write that waits for an idle writer (a paced last-used chunk) is written as soon as
    /// the queue stays empty a moment, long before its deadline.
    #[tokio::test]
    async fn a_write_waiting_for_an_idle_writer_is_written_once_the_queue_is_idle() {
        let (_dir, path) = super::super::migrated_file().await;
        let at = "2026-11-28T12:00:00.000Z";
        let (key, touch, answer) =
            touch_when_idle(&path, at, Instant::now() + Duration::from_secs(600));
        let (queue, thread) = start_writer(&path);
        queue.send(touch).expect("queued");
        tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .expect("written long before its deadline")
            .expect("answered")
            .expect("written");
        assert_eq!(last_used(&path, &key).as_deref(), Some(at));
        queue.send(Message::Close).expect("queued");
        thread.join().expect("the writer ends");
    }

    /// A clean stop writes, and answers, a write still waiting for an idle moment.
    #[tokio::test]
    async fn a_clean_stop_writes_what_waits_for_an_idle_writer() {
        let (_dir, path) = super::super::migrated_file().await;
        let at = "2026-11-28T12:00:00.000Z";
        let (key, touch, answer) =
            touch_when_idle(&path, at, Instant::now() + Duration::from_secs(600));
        let (queue, thread) = start_writer(&path);
        // Both queued before the writer looks: it sees the write, then the stop.
        queue.send(touch).expect("queued");
        queue.send(Message::Close).expect("queued");
        thread.join().expect("the writer ends");
        answer.await.expect("answered").expect("written");
        assert_eq!(last_used(&path, &key).as_deref(), Some(at));
    }

    /// Commits back to back, as under sustained load, with the checkpointer beside them:
    /// the WAL starts over instead of growing with every commit (to about 40 000 frames
    /// here with neither the checkpointer nor the writer's own checkpoint).
    #[tokio::test]
    async fn the_wal_starts_over_under_back_to_back_commits() {
        let (_dir, path) = super::super::migrated_file().await;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let beside = path.clone();
        let checkpoints =
            std::thread::spawn(move || checkpointer(&beside, Duration::from_secs(5), &stopped));
        let conn = connect(&path, Duration::from_secs(5)).expect("a connection");
        // No fsync: the test is about frames, not durability, and should be quick.
        conn.pragma_update(None, "synchronous", "OFF")
            .expect("synchronous off");
        for _ in 0..8_000 {
            register(&conn);
        }
        drop(stop);
        checkpoints.join().expect("the checkpointer ends");
        let frames = std::fs::metadata(path.with_extension("db-wal"))
            .map(|m| m.len() / (4096 + 24))
            .expect("the WAL");
        assert!(
            frames < 2 * WRITER_CHECKPOINT_FRAMES as u64,
            "the WAL grew to {frames} frames"
        );
    }
}
