//! Admission of HTTP connections.
//!
//! Every connection costs a file descriptor, and so do the database's connections and files.
//! Left unbounded, one client holding enough idle keep-alive connections exhausts the
//! descriptors: `accept` then fails with `EMFILE` for everybody, and the database may fail to
//! open a file. So:
//!
//! - at most `max_connections` are open at once; the listener reserves a slot *before*
//!   accepting, so beyond the limit new connections wait in the kernel's backlog instead of
//!   being accepted and dropped;
//! - while the limit is reached and a client is waiting in the backlog (or `accept` ran out of
//!   descriptors), idle keep-alive connections are asked to close, oldest first — a connection
//!   between requests closes, one in the middle of a request finishes it first;
//! - `accept` failures back off exponentially and are logged once per episode, not once per
//!   attempt.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::store::{DatabaseTarget, StoreSettings};
use crate::telemetry::Metrics;

/// The derived default never goes below this many connections, however low the descriptor
/// limit: a service that can hold a handful of clients is more useful than one refusing to
/// start, and the shortfall is logged.
pub(crate) const MIN_DERIVED_CONNECTIONS: u32 = 16;

/// Highest connection limit, explicit or derived (Linux's default ceiling on descriptors per
/// process, `fs.nr_open`).
pub const MAX_CONNECTIONS: u32 = 1 << 20;

/// Descriptors the process needs besides the database and the connections: stdio (3), the
/// listener, the runtime's epoll, eventfd and signal pipe, log files, and short-lived ones
/// (the master key file, `/dev/urandom`, DNS lookups). An idle server uses about 12.
pub(crate) const BASE_RESERVED_DESCRIPTORS: u64 = 32;

/// Descriptors per SQLite connection in WAL mode: the database file and its WAL each hold
/// one, the shared-memory index one more per process; three per connection leaves room for
/// SQLite's temporary files.
const SQLITE_DESCRIPTORS_PER_CONNECTION: u64 = 3;

/// SQLite connections besides the read pool: the writer and the change watcher.
const SQLITE_OTHER_CONNECTIONS: u64 = 2;

/// A connection that has not yet finished its first request is spared this long: its client
/// has just connected and is sending its request, which closing would lose.
const NEWCOMER_GRACE: Duration = Duration::from_secs(1);

/// How often, while the limit is reached, the backlog is checked for waiting clients.
const BACKLOG_POLL: Duration = Duration::from_millis(25);

/// First and longest pause after a failed `accept`.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// An episode of `accept` failures ends after this long without one.
const ACCEPT_QUIET: Duration = Duration::from_secs(1);

/// A long episode is reminded in the log this often.
const ACCEPT_REMINDER: Duration = Duration::from_secs(60);

/// "The connection limit is reached" is logged at most this often.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(60);

/// The soft `RLIMIT_NOFILE` (`ulimit -n`), or `None` when unlimited or unknown.
pub(crate) fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives on this stack frame.
    let status = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (status == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Descriptors the database side may hold: SQLite keeps `read pool + writer + watcher`
/// connections with three descriptors each; PostgreSQL one socket per pooled connection, one
/// for the invalidation listener and one for a reconnection in progress.
pub(crate) fn database_descriptors(target: &DatabaseTarget, store: &StoreSettings) -> u64 {
    match target {
        DatabaseTarget::Sqlite(_) => {
            let readers =
                u64::from(crate::store::sqlite::SqliteOptions::default().read_connections);
            SQLITE_DESCRIPTORS_PER_CONNECTION * (readers + SQLITE_OTHER_CONNECTIONS)
        }
        DatabaseTarget::Postgres(_) => u64::from(store.max_connections) + 2,
    }
}

/// The default connection limit: the descriptor limit minus what the database and the rest of
/// the process need, at least [`MIN_DERIVED_CONNECTIONS`], at most [`MAX_CONNECTIONS`]
/// (also when the descriptor limit is unlimited or unknown).
pub(crate) fn derived_max_connections(open_files: Option<u64>, database: u64) -> u32 {
    let Some(open_files) = open_files else {
        return MAX_CONNECTIONS;
    };
    let room = open_files.saturating_sub(BASE_RESERVED_DESCRIPTORS + database);
    u32::try_from(room)
        .unwrap_or(MAX_CONNECTIONS)
        .clamp(MIN_DERIVED_CONNECTIONS, MAX_CONNECTIONS)
}

/// The open connections and the cap on them. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Connections(Arc<Shared>);

struct Shared {
    limit: u32,
    permits: Arc<Semaphore>,
    /// Open connections by id; ids grow, so iteration is oldest first.
    open: Mutex<BTreeMap<u64, Arc<Slot>>>,
    next_id: AtomicU64,
    /// Open connections asked to close and not closed yet.
    closing: AtomicUsize,
    /// When "limit reached" was last logged.
    limit_logged: Mutex<Option<Instant>>,
    metrics: Metrics,
}

/// One open connection, as the admission side sees it.
struct Slot {
    opened: Instant,
    /// Requests being handled now (more than one only with pipelining).
    busy: AtomicU32,
    /// Whether a request has been answered on it.
    served: AtomicBool,
    /// Whether it has been asked to close.
    closing: AtomicBool,
    close: Notify,
}

impl Slot {
    /// Whether closing it now loses nothing: no request in progress, and not a newcomer that
    /// is probably sending its first one.
    fn idle(&self, now: Instant) -> bool {
        self.busy.load(Ordering::Acquire) == 0
            && !self.closing.load(Ordering::Relaxed)
            && (self.served.load(Ordering::Acquire)
                || now.saturating_duration_since(self.opened) >= NEWCOMER_GRACE)
    }

    /// Returns whether this call is the one that asked.
    fn ask_to_close(&self) -> bool {
        let first = !self.closing.swap(true, Ordering::Relaxed);
        // Stores a wake-up if the connection task is not waiting yet: none is lost.
        self.close.notify_one();
        first
    }
}

/// Room for one more connection, reserved before accepting it.
pub(crate) struct Reservation(OwnedSemaphorePermit);

/// An open connection's place in the registry; frees its slot when dropped.
pub(crate) struct Admitted {
    shared: Arc<Shared>,
    id: u64,
    slot: Arc<Slot>,
    _permit: OwnedSemaphorePermit,
}

/// Marks its connection busy while a request is being handled.
pub(crate) struct Busy(Arc<Slot>);

impl Connections {
    /// A registry allowing `limit` open connections.
    pub(crate) fn new(limit: u32, metrics: Metrics) -> Self {
        let limit = limit.clamp(1, MAX_CONNECTIONS);
        metrics.set_connection_limit(limit);
        Self(Arc::new(Shared {
            limit,
            permits: Arc::new(Semaphore::new(limit as usize)),
            open: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            closing: AtomicUsize::new(0),
            limit_logged: Mutex::new(None),
            metrics,
        }))
    }

    /// The limit.
    pub(crate) fn limit(&self) -> u32 {
        self.0.limit
    }

    /// Connections open now.
    pub(crate) fn open_count(&self) -> usize {
        self.open().len()
    }

    fn open(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Slot>>> {
        // A panic while holding this lock leaves the map consistent (every operation on it is
        // a single insert, remove or scan), so a poisoned lock is still usable.
        self.0.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for room for one more connection. While there is none and a client is waiting in
    /// `listener`'s backlog, asks idle connections to close to make room.
    pub(crate) async fn reserve(&self, listener: &TcpListener) -> Reservation {
        if let Ok(permit) = self.0.permits.clone().try_acquire_owned() {
            return Reservation(permit);
        }
        let mut poll = tokio::time::interval(BACKLOG_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                permit = self.0.permits.clone().acquire_owned() => match permit {
                    Ok(permit) => return Reservation(permit),
                    // The semaphore is never closed.
                    Err(_) => std::future::pending::<()>().await,
                },
                _ = poll.tick() => {
                    if backlog_waiting(listener) {
                        self.log_limit_reached();
                        self.close_idle();
                    }
                }
            }
        }
    }

    fn log_limit_reached(&self) {
        let mut logged = self
            .0
            .limit_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if logged.is_none_or(|t| t.elapsed() >= LIMIT_LOG_EVERY) {
            tracing::info!(
                max_connections = self.0.limit,
                "connection limit reached: newcomers wait in the backlog while idle connections \
                 are closed to make room (logged at most once a minute)"
            );
            *logged = Some(Instant::now());
        }
    }

    /// Registers an accepted connection in the slot `reservation` holds.
    pub(crate) fn admit(&self, reservation: Reservation) -> Admitted {
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot {
            opened: Instant::now(),
            busy: AtomicU32::new(0),
            served: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            close: Notify::new(),
        });
        self.open().insert(id, slot.clone());
        self.0.metrics.connection_opened();
        Admitted {
            shared: self.0.clone(),
            id,
            slot,
            _permit: reservation.0,
        }
    }

    /// Asks the oldest idle connections to close: a tenth of the limit (at least one), less
    /// those already closing. Returns how many were asked.
    pub(crate) fn close_idle(&self) -> usize {
        let batch = (self.0.limit as usize / 10).max(1);
        let now = Instant::now();
        let open = self.open();
        let wanted = batch.saturating_sub(self.0.closing.load(Ordering::Relaxed));
        let mut asked = 0;
        for slot in open.values() {
            if asked == wanted {
                break;
            }
            if slot.idle(now) && slot.ask_to_close() {
                self.0.closing.fetch_add(1, Ordering::Relaxed);
                asked += 1;
            }
        }
        drop(open);
        self.0.metrics.closed_idle(asked as u64);
        asked
    }

    /// Asks every open connection to close once its request in progress, if any, is answered.
    pub(crate) fn close_all(&self) {
        for slot in self.open().values() {
            if slot.ask_to_close() {
                self.0.closing.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Resolves once every connection has closed (and no slot is reserved).
    pub(crate) async fn all_closed(&self) {
        // Holding every permit means nobody holds one. The semaphore is never closed, so the
        // error case cannot happen; treat it as done rather than wait forever.
        let _ = self.0.permits.acquire_many(self.0.limit).await;
    }
}

impl Admitted {
    /// Marks the connection busy until the returned guard is dropped.
    pub(crate) fn busy(&self) -> impl Fn() -> Busy + Clone + Send + Sync + 'static {
        let slot = self.slot.clone();
        move || {
            slot.busy.fetch_add(1, Ordering::AcqRel);
            Busy(slot.clone())
        }
    }

    /// Resolves when the connection has been asked to close (idle shedding or shutdown).
    pub(crate) async fn close_requested(&self) {
        self.slot.close.notified().await;
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&self.id);
        // Under the lock, so `close_idle` never sees the count and the map disagree.
        if self.slot.closing.load(Ordering::Relaxed) {
            self.shared.closing.fetch_sub(1, Ordering::Relaxed);
        }
        drop(open);
        self.shared.metrics.connection_closed();
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.served.store(true, Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a client is waiting in `listener`'s accept queue. Asked without accepting, so that
/// a full server closes idle connections only for someone who actually wants in.
fn backlog_waiting(listener: &TcpListener) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd and a zero timeout: poll only reads and writes `fd`, and does
    // not consume the readiness tokio's reactor tracks for the listener.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && fd.revents & libc::POLLIN != 0
}

/// Whether a failed `accept` concerns only the connection being accepted (it was reset or
/// aborted before we got to it, or the network under it failed): retry at once, quietly.
/// Anything else — out of descriptors (`EMFILE`, `ENFILE`) or memory — concerns every
/// connection and calls for backing off.
pub(crate) fn is_per_connection(e: &io::Error) -> bool {
    use io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || matches!(
            e.raw_os_error(),
            Some(
                libc::EPROTO
                    | libc::ENETDOWN
                    | libc::ENOPROTOOPT
                    | libc::EHOSTDOWN
                    | libc::ENONET
                    | libc::EHOSTUNREACH
                    | libc::EOPNOTSUPP
                    | libc::ENETUNREACH
            )
        )
}

/// Backoff and logging for `accept` failures: the first failure of an episode is logged, later
/// ones are counted, and the end of the episode (no failure for a second) is logged with the
/// count.
pub(crate) struct AcceptFailures {
    delay: Duration,
    episode: Option<Episode>,
    metrics: Metrics,
}

struct Episode {
    started: Instant,
    last: Instant,
    failures: u64,
    reminded: Instant,
}

impl AcceptFailures {
    /// No failure yet.
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self {
            delay: ACCEPT_BACKOFF_FIRST,
            episode: None,
            metrics,
        }
    }

    /// Records a failed `accept`; returns how long to pause before the next one.
    pub(crate) fn failed(&mut self, error: &io::Error, open: usize) -> Duration {
        let now = Instant::now();
        self.metrics.accept_error();
        match &mut self.episode {
            None => {
                tracing::warn!(
                    %error,
                    open_connections = open,
                    "accept failed; backing off and closing idle connections \
                     (further failures are counted until accepting recovers)"
                );
                self.episode = Some(Episode {
                    started: now,
                    last: now,
                    failures: 1,
                    reminded: now,
                });
            }
            Some(episode) => {
                episode.failures += 1;
                episode.last = now;
                if now.duration_since(episode.reminded) >= ACCEPT_REMINDER {
                    tracing::warn!(
                        %error,
                        failures = episode.failures,
                        since_s = now.duration_since(episode.started).as_secs(),
                        "accept still failing"
                    );
                    episode.reminded = now;
                }
            }
        }
        let delay = self.delay;
        self.delay = (self.delay * 2).min(ACCEPT_BACKOFF_MAX);
        delay
    }

    /// Records a successful `accept`: the next failure pauses briefly again.
    pub(crate) fn succeeded(&mut self) {
        self.delay = ACCEPT_BACKOFF_FIRST;
    }

    /// When the current episode ends if no failure comes first; `None` outside an episode.
    pub(crate) fn quiet_deadline(&self) -> Option<Instant> {
        self.episode.as_ref().map(|e| e.last + ACCEPT_QUIET)
    }

    /// Ends the current episode, logging its summary.
    pub(crate) fn end_episode(&mut self) {
        if let Some(episode) = self.episode.take() {
            tracing::info!(
                failures = episode.failures,
                duration_ms = episode.last.duration_since(episode.started).as_millis() as u64,
                "accepting connections again after {} failed accepts",
                episode.failures
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_limit_leaves_room_for_the_database() {
        // SQLite: 10 connections × 3 descriptors.
        assert_eq!(derived_max_connections(Some(1024), 30), 1024 - 32 - 30);
        assert_eq!(
            derived_max_connections(Some(64), 30),
            MIN_DERIVED_CONNECTIONS
        );
        assert_eq!(
            derived_max_connections(Some(0), 30),
            MIN_DERIVED_CONNECTIONS
        );
        assert_eq!(derived_max_connections(None, 30), MAX_CONNECTIONS);
        assert_eq!(derived_max_connections(Some(u64::MAX), 30), MAX_CONNECTIONS);
        let sqlite = DatabaseTarget::Sqlite("x.db".into());
        assert_eq!(database_descriptors(&sqlite, &StoreSettings::default()), 30);
        let pg = DatabaseTarget::Postgres("postgres://h/db".into());
        assert_eq!(database_descriptors(&pg, &StoreSettings::default()), 18);
    }

    #[test]
    fn accept_errors_are_told_apart() {
        assert!(!is_per_connection(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!is_per_connection(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(is_per_connection(&io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        assert!(is_per_connection(&io::Error::from_raw_os_error(
            libc::EPROTO
        )));
    }

    #[test]
    fn accept_backoff_doubles_up_to_its_ceiling_and_resets() {
        let mut failures = AcceptFailures::new(Metrics::new().unwrap());
        let e = io::Error::from_raw_os_error(libc::EMFILE);
        let delays: Vec<_> = (0..8).map(|_| failures.failed(&e, 0)).collect();
        assert_eq!(delays[0], ACCEPT_BACKOFF_FIRST);
        assert_eq!(delays[1], ACCEPT_BACKOFF_FIRST * 2);
        assert_eq!(*delays.last().unwrap(), ACCEPT_BACKOFF_MAX);
        assert!(failures.quiet_deadline().is_some());
        failures.succeeded();
        assert_eq!(failures.failed(&e, 0), ACCEPT_BACKOFF_FIRST);
        failures.end_episode();
        assert!(failures.quiet_deadline().is_none());
    }

    #[tokio::test]
    async fn idle_connections_close_oldest_first_and_busy_ones_never() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connections = Connections::new(3, Metrics::new().unwrap());
        let mut admitted = Vec::new();
        for _ in 0..3 {
            let reservation = connections.reserve(&listener).await;
            admitted.push(connections.admit(reservation));
        }
        // A newcomer that has not finished a request is spared.
        assert_eq!(connections.close_idle(), 0);
        let mark: Vec<_> = admitted.iter().map(Admitted::busy).collect();
        // 0 served a request and is idle; 1 is in the middle of one; 2 served one and is idle.
        drop(mark[0]());
        let in_progress = mark[1]();
        drop(mark[2]());
        assert_eq!(connections.close_idle(), 1);
        assert!(admitted[0].slot.closing.load(Ordering::Relaxed));
        // One is already closing: the batch (a tenth of 3, at least one) is full.
        assert_eq!(connections.close_idle(), 0);
        drop(admitted.remove(0));
        assert_eq!(connections.close_idle(), 1);
        assert!(
            !admitted[0].slot.closing.load(Ordering::Relaxed),
            "busy one asked to close"
        );
        assert!(admitted[1].slot.closing.load(Ordering::Relaxed));
        tokio::time::timeout(Duration::from_secs(1), admitted[1].close_requested())
            .await
            .expect("close request delivered");
        drop(in_progress);
        drop(admitted);
        tokio::time::timeout(Duration::from_secs(1), connections.all_closed())
            .await
            .expect("all closed");
    }
}
