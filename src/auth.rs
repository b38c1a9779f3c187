//! Authentication of a request from its two headers, in the order SPEC §2 fixes:
//! form → derivation (CPU only) → cache → database. A forged pair never reaches the cache or
//! the database; only positive answers are cached, for at most the TTL; a revocation seen
//! by this instance (its own, or reported by the store's change feed) drops the entry.
//! It knows nothing of HTTP: it takes the two presented values and returns an [`AuthOutcome`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use crate::attributes::{Interner, ScopeSet};
use crate::credential::{ApiKey, ApiSecret, EncodedSecret, KeyRing};
use crate::store::{AbortOnDrop, AuthRecord, Change, CredentialStore, StoreError};
use crate::telemetry::Metrics;

/// What an authenticated credential may do and whom it belongs to, as the cache holds it.
/// Small and cheap to clone: the scope set is shared between every cached credential with the
/// same scopes (most deployments have a few scope lists and 100 000 credentials); the owner,
/// usually unique per credential, is kept inline when short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    scopes: Arc<ScopeSet>,
    owner: Option<Owner>,
}

/// An owner as the cache keeps it: up to [`Owner::INLINE`] bytes in place, longer ones in one
/// shared allocation. 100 000 cached credentials with their own owners would otherwise cost
/// 100 000 small allocations (about 4 MiB).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    Inline { len: u8, bytes: [u8; Owner::INLINE] },
    Shared(Arc<str>),
}

impl Owner {
    /// Bytes kept in place: the enum is then as large as a `String`.
    const INLINE: usize = 22;

    fn new(owner: &str) -> Self {
        match u8::try_from(owner.len()) {
            Ok(len) if owner.len() <= Self::INLINE => {
                let mut bytes = [0; Self::INLINE];
                bytes[..owner.len()].copy_from_slice(owner.as_bytes());
                Self::Inline { len, bytes }
            }
            _ => Self::Shared(Arc::from(owner)),
        }
    }

    fn as_str(&self) -> &str {
        // Copied from a `&str` whole, so always UTF-8; the fallback is never taken.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Shared(owner) => owner.as_bytes(),
        }
    }
}

impl Profile {
    /// A copy that shares nothing with `self`: no reference count that another thread's
    /// copy also writes (see [`local`]).
    fn unshared(&self) -> Self {
        Self {
            scopes: Arc::new(self.scopes.unshared()),
            owner: self.owner.as_ref().map(|owner| Owner::new(owner.as_str())),
        }
    }

    /// The credential's scopes.
    pub fn scopes(&self) -> &ScopeSet {
        &self.scopes
    }

    /// The credential's owner.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_ref().map(Owner::as_str)
    }

    /// The credential's owner as bytes: for a header value, which checks them itself.
    pub(crate) fn owner_bytes(&self) -> Option<&[u8]> {
        self.owner.as_ref().map(Owner::as_bytes)
    }
}

/// An authenticated caller: the key it presented and what the credential may do.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The credential's key.
    pub key: ApiKey,
    /// Its scopes and owner.
    pub profile: Profile,
}

impl Caller {
    /// Whether the caller holds `scope` (or `*`).
    pub fn holds(&self, scope: &str) -> bool {
        self.profile.scopes.holds(scope)
    }
}

/// A cached authentication: who, and until when it may be trusted. Small on purpose: the
/// cache holds up to 100 000 of them.
#[derive(Clone)]
struct Entry {
    profile: Profile,
    /// `expires_at` in milliseconds since the epoch; `i64::MAX` when it never expires.
    expires_ms: i64,
    /// When the entry stops being trusted (the cache's TTL), in milliseconds of the
    /// authenticator's monotonic clock ([`monotonic_ms`]).
    stale_ms: u64,
    /// The derivation of the key checked when the entry was made, under the master keys in
    /// use then (the cache is emptied when they change): a hit compares the presented secret
    /// with it in constant time instead of computing the HMAC again.
    secret: EncodedSecret,
}

impl Entry {
    fn is_expired(&self) -> bool {
        // The clock is read only for credentials that expire.
        self.expires_ms != i64::MAX && now_ms() >= self.expires_ms
    }
}

/// A few recent cache hits per thread, in front of the shared cache. A hit in the shared
/// cache takes its shard's read lock and counts a reference on the credential's scope set:
/// four atomic writes to memory that every core writes on every request, so the cache lines
/// move between cores each time. A hit here touches only this thread's copy.
///
/// A copy is trusted only while nothing was invalidated since it was made: it carries the
/// authenticator's invalidation epoch read before the shared lookup it copies, and every
/// invalidation moves the epoch after it has emptied the shared cache (see
/// [`Inner::apply`]). Its TTL and expiry are the shared entry's.
mod local {
    use std::cell::RefCell;

    use super::{ApiKey, Entry};

    /// Slots per thread, direct-mapped by the key's hash.
    const SLOTS: usize = 64;

    /// One slot: a key seen once (`entry` is `None`), or a key and its private copy.
    struct Slot {
        /// Which authenticator filled it ([`super::Inner::id`]).
        authenticator: u64,
        epoch: u64,
        key: ApiKey,
        entry: Option<Entry>,
    }

    thread_local! {
        static SLOTS_OF_THREAD: RefCell<Vec<Option<Slot>>> = const { RefCell::new(Vec::new()) };
    }

    fn slot_of(sent: &[u8]) -> usize {
        use std::hash::BuildHasher as _;
        // Fixed seed: the index only spreads keys over a few slots.
        (foldhash::fast::FixedState::with_seed(0).hash_one(sent) as usize) % SLOTS
    }

    /// This thread's copy of `sent`'s entry, if it was made by `authenticator` at `epoch` and is
    /// still within its TTL at `now`.
    pub(super) fn get(
        authenticator: u64,
        epoch: u64,
        sent: &[u8],
        now: u64,
    ) -> Option<(ApiKey, Entry)> {
        SLOTS_OF_THREAD
            .try_with(|slots| {
                let slots = slots.try_borrow().ok()?;
                let slot = slots.get(slot_of(sent))?.as_ref()?;
                let entry = slot.entry.as_ref()?;
                (slot.authenticator == authenticator
                    && slot.epoch == epoch
                    && entry.stale_ms > now
                    && slot.key.as_str().as_bytes() == sent)
                    .then(|| (slot.key.clone(), entry.clone()))
            })
            .ok()
            .flatten()
    }

    /// Offers a hit of the shared cache, found at `epoch`. The second hit in a row of one
    /// key in its slot makes a private copy: keys used once cost no copy.
    pub(super) fn offer(authenticator: u64, epoch: u64, key: &ApiKey, entry: &Entry) {
        let _ = SLOTS_OF_THREAD.try_with(|slots| {
            let Ok(mut slots) = slots.try_borrow_mut() else {
                return;
            };
            if slots.is_empty() {
                slots.resize_with(SLOTS, || None);
            }
            let Some(slot) = slots.get_mut(slot_of(key.as_str().as_bytes())) else {
                return;
            };
            let seen = slot
                .as_ref()
                .is_some_and(|slot| slot.authenticator == authenticator && slot.key == *key);
            *slot = Some(Slot {
                authenticator,
                epoch,
                key: key.clone(),
                entry: seen.then(|| Entry {
                    profile: entry.profile.unshared(),
                    ..entry.clone()
                }),
            });
        });
    }
}

/// Milliseconds since the Unix epoch, for expiries. Read precisely: an expiry set to now
/// (a roll without grace) must hold from the next request on.
fn now_ms() -> i64 {
    #[cfg(target_os = "linux")]
    if let Some(ms) = clock_ms(libc::CLOCK_REALTIME) {
        return ms;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Milliseconds on a clock that never goes back (from an arbitrary origin, such as the boot),
/// for the cache's TTL: one that a wall-clock step cannot stretch. Read on every authentication, so coarsely where Linux can: its time
/// at the last tick, read without the hardware counter (7 ns against 23 ns here). It lags by
/// a tick at most (4 ms here), nothing next to a TTL.
fn monotonic_ms() -> u64 {
    #[cfg(target_os = "linux")]
    if let Some(ms) = clock_ms(libc::CLOCK_MONOTONIC_COARSE) {
        return u64::try_from(ms).unwrap_or(0);
    }
    precise_monotonic_ms()
}

/// Reads a Linux clock in milliseconds, in a few instructions (the standard library's reads
/// go through `Duration` and 128-bit milliseconds). `None` never happens for the clocks used
/// here (Linux has had them since 2.6.32); a fallback is there all the same.
#[cfg(target_os = "linux")]
fn clock_ms(id: libc::clockid_t) -> Option<i64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to write; it writes nothing else.
    let read = unsafe { libc::clock_gettime(id, &mut now) };
    (read == 0).then(|| now.tv_sec.saturating_mul(1000) + now.tv_nsec / 1_000_000)
}

fn precise_monotonic_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let since = ORIGIN.get_or_init(Instant::now).elapsed();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// How an authentication ended: one enum for the metric, the log and the caller's answer.
/// The rejections are told apart only in metrics; a caller sees one 401 for all of them.
#[derive(Debug, Clone)]
pub enum AuthOutcome {
    /// A registered, active, unexpired credential.
    Authenticated(Caller),
    /// A header missing, repeated or malformed.
    RejectedForm,
    /// The secret is not the derivation of the key.
    RejectedDerivation,
    /// Well-formed pair, key never registered.
    RejectedUnknown,
    /// Well-formed pair, key revoked.
    RejectedRevoked,
    /// Well-formed pair, key past its `expires_at`.
    RejectedExpired,
    /// The database failed: neither accepted nor rejected.
    Failed(StoreError),
}

impl AuthOutcome {
    /// The `result` label of every outcome, in declaration order of the variants.
    pub const LABELS: [&'static str; 7] = [
        "ok",
        "rejected_form",
        "rejected_derivation",
        "rejected_unknown",
        "rejected_revoked",
        "rejected_expired",
        "error",
    ];

    pub(crate) fn index(&self) -> usize {
        match self {
            Self::Authenticated(_) => 0,
            Self::RejectedForm => 1,
            Self::RejectedDerivation => 2,
            Self::RejectedUnknown => 3,
            Self::RejectedRevoked => 4,
            Self::RejectedExpired => 5,
            Self::Failed(_) => 6,
        }
    }

    /// The metric label of this outcome.
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

/// Cache settings.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// How long a positive answer is trusted; zero disables the cache.
    pub ttl: Duration,
    /// Most cached credentials.
    pub capacity: u64,
    /// How often `last_used_at` is written (SPEC §8.4); zero disables tracking.
    pub last_used_interval: Duration,
}

/// The keys queued for a last-used write.
type UsedKeys = std::collections::HashSet<ApiKey, foldhash::fast::RandomState>;

/// Slots of the last-used notes: a power of two.
const USAGE_SLOTS: usize = 1 << 14;

/// Keys queued before the flusher writes them without waiting for the interval to end: a
/// bound on the queue's memory (about 9 MiB of RSS when full, measured). Below it, every key
/// is written once per interval, at its end.
const USAGE_BATCH: usize = 100_000;

/// Keys written per `touch`, in key order: each is one write of the store's writer, so
/// other writes are not held behind a whole interval's keys, and in key order the rows of
/// one chunk share pages.
const TOUCH_CHUNK: usize = 1_000;

/// Which credentials authenticated in the current interval (SPEC §8.4), noted at the cost of
/// one hash and one relaxed atomic load per authentication; the first use of a key in an
/// interval also takes a lock to queue it. A flusher writes the queue in one batch per
/// interval, off the request path.
struct Usage {
    /// Per slot: the interval number (high 32 bits) and a fingerprint of the key (low 32)
    /// last noted there. Two keys sharing a slot only cost extra queueing, never a lost use.
    slots: Box<[AtomicU64]>,
    /// Counts flushes: the current interval.
    interval: AtomicU64,
    /// Keys used in this interval, not yet written. Hashed with foldhash: only authenticated
    /// keys get here (see [`Inner::cache`]).
    pending: std::sync::Mutex<UsedKeys>,
    /// Wakes the writer when `pending` holds a batch.
    full: Arc<tokio::sync::Notify>,
    hasher: foldhash::fast::FixedState,
}

impl Usage {
    fn new(full: Arc<tokio::sync::Notify>) -> Self {
        Self {
            slots: (0..USAGE_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            interval: AtomicU64::new(1),
            pending: std::sync::Mutex::default(),
            full,
            hasher: foldhash::fast::FixedState::default(),
        }
    }

    fn note(&self, key: &ApiKey) {
        use std::hash::BuildHasher as _;
        let hash = self.hasher.hash_one(key);
        let mark = (self.interval.load(Ordering::Relaxed) << 32) | (hash >> 32);
        let slot = &self.slots[(hash as usize) & (USAGE_SLOTS - 1)];
        if slot.load(Ordering::Relaxed) != mark {
            slot.store(mark, Ordering::Relaxed);
            let mut pending = self.pending();
            // Keys sharing a slot come back here; the set keeps each once per interval.
            if !pending.contains(key) {
                pending.insert(key.clone());
            }
            if pending.len() == USAGE_BATCH {
                self.full.notify_one();
            }
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, UsedKeys> {
        // A plain set: a panic elsewhere cannot leave it half-updated.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands over the keys queued so far; with `next_interval`, also starts a new interval
    /// (keys used from then on are queued again).
    fn take(&self, next_interval: bool) -> Vec<ApiKey> {
        if next_interval {
            self.interval.fetch_add(1, Ordering::Relaxed);
        }
        self.pending().drain().collect()
    }
}

/// Most master key ids waiting to be recorded; beyond it, a credential's id is learnt at a
/// later cache miss instead.
const MAX_PENDING_IDS: usize = 10_000;
/// Queued ids that wake the writer before the interval ends.
const IDS_BATCH: usize = 1_000;

/// Writes what authentication learns, in batches, off the request path, until aborted (with
/// the authenticator, which it holds only weakly, and never while waiting): the keys used in
/// each interval (`last_used_at`) and the master key ids of older credentials. Woken at the
/// end of each interval, or early by a full batch.
async fn write_learnt(inner: Weak<Inner>, every: Duration, wake: Arc<tokio::sync::Notify>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_tick = tick.tick().await + every;
    loop {
        let ended = tokio::select! {
            at = tick.tick() => {
                next_tick = at + every;
                true
            }
            () = wake.notified() => false,
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let mut learnt = strong.learnt(ended);
        if !ended {
            // A batch that filled early has until the interval ends: its keys are queued and
            // written paced, and what is left of them when the service stops cleanly is
            // written with the rest ([`Inner::learnt`] takes it). An interval's end is
            // written at once: a value at most one interval late.
            strong.queue_paced(std::mem::take(&mut learnt.keys));
        }
        drop(strong);
        let store = learnt.store.clone();
        learnt.write().await;
        if !ended {
            write_paced(&inner, &store, next_tick).await;
        }
    }
}

/// Writes the paced queue chunk by chunk, resting after each (see [`pause`]), until it is
/// empty or the authenticator is gone. Each chunk also waits for the store to be idle, so
/// that it is not written with, and ahead of, durable writes in flight.
async fn write_paced(
    inner: &Weak<Inner>,
    store: &Arc<dyn CredentialStore>,
    until: tokio::time::Instant,
) {
    let at = chrono::Utc::now();
    while let Some((chunk, left)) = inner.upgrade().and_then(|inner| inner.next_paced()) {
        let started = tokio::time::Instant::now();
        // The chunk waits for the store to be idle, but leaves each later chunk its reserve
        // before the deadline.
        let reserve = CHUNK_RESERVE.saturating_mul(u32::try_from(left + 1).unwrap_or(u32::MAX));
        let latest = until.checked_sub(reserve).unwrap_or(started).max(started);
        touch(store, &chunk, at, Some(latest)).await;
        if left == 0 {
            return;
        }
        let now = tokio::time::Instant::now();
        let pause = pause(
            now.saturating_duration_since(started),
            left,
            until.saturating_duration_since(now),
        );
        tokio::time::sleep(pause).await;
    }
}

/// Writes `last_used_at` of one chunk of keys: at once, or when the store is idle and by
/// `latest` at the latest. Coarse by design: a failure is logged and not retried; the next
/// use of each key is noted again.
async fn touch(
    store: &Arc<dyn CredentialStore>,
    keys: &[ApiKey],
    at: chrono::DateTime<chrono::Utc>,
    latest: Option<tokio::time::Instant>,
) {
    let written = match latest {
        Some(latest) => store.touch_when_idle(keys, at, latest.into_std()).await,
        None => store.touch(keys, at).await,
    };
    if let Err(e) = written {
        tracing::warn!(error = %e.report(), keys = keys.len(), "cannot write last_used_at");
    }
}

/// What a paced chunk leaves before the deadline for each chunk after it: when other writes
/// kept a chunk waiting that long, the rest still fit (a chunk's write takes a few ms).
const CHUNK_RESERVE: Duration = Duration::from_millis(50);

/// How much longer than a chunk's write a paced batch waits before its next chunk: last-used
/// writes then take about a tenth of the writer's time, and a burst of newly used keys
/// neither holds registrations back nor takes a core from requests for long.
const PACE: u32 = 9;

/// The pause of a paced batch after a chunk that took `took` (its wait for an idle store
/// included: a busy store is left alone longer), with `left` chunks still to write in
/// `room`: [`PACE`] times the chunk, but never so long that the rest, at this chunk's speed,
/// would end after the deadline.
fn pause(took: Duration, left: usize, room: Duration) -> Duration {
    let share = room / u32::try_from(left.max(1)).unwrap_or(u32::MAX);
    took.saturating_mul(PACE).min(share.saturating_sub(took))
}

/// One batch of what authentication learnt, taken from the queues.
struct Learnt {
    store: Arc<dyn CredentialStore>,
    /// Keys used since the last batch.
    keys: Vec<ApiKey>,
    /// Master key ids learnt for older credentials.
    ids: Vec<(ApiKey, String)>,
}

impl Learnt {
    /// Writes the batch, at once. Coarse by design: a failed write is logged and not retried;
    /// the next use of each key is noted again, and its id learnt at its next miss.
    async fn write(self) {
        let Self {
            store,
            mut keys,
            ids,
        } = self;
        keys.sort_unstable();
        let at = chrono::Utc::now();
        for chunk in keys.chunks(TOUCH_CHUNK) {
            touch(&store, chunk, at, None).await;
        }
        let mut by_id: std::collections::HashMap<String, Vec<ApiKey>> = Default::default();
        for (key, id) in ids {
            by_id.entry(id).or_default().push(key);
        }
        for (id, keys) in by_id {
            if let Err(e) = store.record_master_key_id(&keys, &id).await {
                tracing::warn!(error = %e.report(), keys = keys.len(), "cannot record master key ids");
            }
        }
    }
}

/// The positive-answer cache.
type Cache =
    quick_cache::sync::Cache<ApiKey, Entry, quick_cache::UnitWeighter, foldhash::fast::RandomState>;

/// Authenticates requests. Cheap to clone: clones share the cache.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    /// Tells this authenticator's per-thread copies ([`local`]) from another's.
    id: u64,
    /// The master keys; replaced whole when the key file is reloaded. Read on every request
    /// without a lock.
    keys: arc_swap::ArcSwap<KeyRing>,
    store: Arc<dyn CredentialStore>,
    /// Keys known active; `None` when caching is disabled. Hashed with foldhash rather than
    /// SipHash: only keys whose secret passed the HMAC check get here, so nobody without the
    /// master key can choose colliding keys.
    /// quick_cache rather than moka: a hit is one read lock and a hash probe, and an entry
    /// costs a few dozen bytes besides its value (SPEC §6: 100 000 of them in < 64 MiB).
    cache: Option<Cache>,
    /// How long an entry is trusted.
    ttl_ms: u64,
    /// Shares scope sets between cached credentials.
    scope_sets: Interner<ScopeSet>,
    /// Bumped on every invalidation, so a lookup that raced a revocation does not cache
    /// what it read before the revocation committed.
    epoch: AtomicU64,
    metrics: Metrics,
    /// Keys this instance revoked and already dropped, whose echo from the change feed is
    /// still to come: the echo is skipped rather than invalidating twice (see
    /// [`Authenticator::forget_revoked`] for why that is safe).
    forgotten: std::sync::Mutex<std::collections::HashSet<ApiKey>>,
    /// Drains the store's change feed into the cache; stopped with the authenticator.
    _follower: Option<AbortOnDrop>,
    /// Last-used notes; `None` when tracking is off.
    usage: Option<Usage>,
    /// Keys of a batch that filled early, still to be written at the writer's pace.
    paced: std::sync::Mutex<Vec<ApiKey>>,
    /// Master key ids learnt for credentials registered before ids were recorded.
    pending_ids: std::sync::Mutex<Vec<(ApiKey, String)>>,
    /// Wakes the writer of what was learnt before its interval ends.
    wake_writer: Arc<tokio::sync::Notify>,
    /// Writes `last_used_at` and learnt master key ids; stopped with the authenticator.
    _writer: Option<AbortOnDrop>,
}

/// Most revoked-here keys remembered while their echo is awaited; beyond it the set is
/// cleared (an echo then costs one more invalidation, nothing else).
const MAX_FORGOTTEN: usize = 10_000;

impl Authenticator {
    /// Builds an authenticator over a store.
    pub fn new(
        keys: impl Into<KeyRing>,
        store: Arc<dyn CredentialStore>,
        cache: CacheSettings,
        metrics: Metrics,
    ) -> Self {
        let last_used = cache.last_used_interval;
        let ttl_ms = u64::try_from(cache.ttl.as_millis()).unwrap_or(u64::MAX);
        let cache = (ttl_ms > 0 && cache.capacity > 0).then(|| {
            let capacity = usize::try_from(cache.capacity).unwrap_or(usize::MAX);
            Cache::with(
                capacity,
                cache.capacity,
                quick_cache::UnitWeighter,
                foldhash::fast::RandomState::default(),
                quick_cache::sync::DefaultLifecycle::default(),
            )
        });
        let changes = store.subscribe();
        let wake = Arc::new(tokio::sync::Notify::new());
        static IDS: AtomicU64 = AtomicU64::new(0);
        let inner = Arc::new_cyclic(|me: &Weak<Inner>| Inner {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            keys: arc_swap::ArcSwap::from_pointee(keys.into()),
            store,
            cache,
            ttl_ms,
            scope_sets: Interner::default(),
            epoch: AtomicU64::new(0),
            metrics,
            forgotten: std::sync::Mutex::default(),
            // Outside a runtime (a synchronous benchmark, say) there is no feed to follow.
            _follower: tokio::runtime::Handle::try_current()
                .ok()
                .map(|rt| AbortOnDrop(rt.spawn(follow(me.clone(), changes)))),
            usage: (!last_used.is_zero()).then(|| Usage::new(wake.clone())),
            paced: std::sync::Mutex::default(),
            pending_ids: std::sync::Mutex::default(),
            wake_writer: wake.clone(),
            _writer: tokio::runtime::Handle::try_current().ok().map(|rt| {
                let every = if last_used.is_zero() {
                    crate::config::DEFAULT_LAST_USED_INTERVAL
                } else {
                    last_used
                };
                AbortOnDrop(rt.spawn(write_learnt(me.clone(), every, wake.clone())))
            }),
        });
        Self { inner }
    }

    /// Authenticates a presented pair: the values of the key and secret headers as sent,
    /// `None` when a header is missing or unusable (repeated). Any bytes may be presented:
    /// what is not a well-formed key or secret is rejected for its form.
    pub async fn authenticate(&self, key: Option<&[u8]>, secret: Option<&[u8]>) -> AuthOutcome {
        let outcome = match self.check(key, secret).await {
            Ok(caller) => {
                if let Some(usage) = &self.inner.usage {
                    usage.note(&caller.key);
                }
                AuthOutcome::Authenticated(caller)
            }
            Err(outcome) => outcome,
        };
        self.inner.metrics.auth_result(&outcome);
        outcome
    }

    async fn check(
        &self,
        key: Option<&[u8]>,
        secret: Option<&[u8]>,
    ) -> Result<Caller, AuthOutcome> {
        let (sent, presented) = key.zip(secret).ok_or(AuthOutcome::RejectedForm)?;
        let parse_key = || ApiKey::parse(sent).map_err(|_| AuthOutcome::RejectedForm);
        let parse = || ApiSecret::parse(presented).map_err(|_| AuthOutcome::RejectedForm);
        let Some(cache) = &self.inner.cache else {
            let key = parse_key()?;
            let secret = parse()?;
            self.verify_derivation(&key, &secret)?;
            self.inner.metrics.cache_miss();
            let entry = self.load(&key, &secret, presented).await?;
            return Ok(Caller {
                key,
                profile: entry.profile,
            });
        };
        // The derivation is checked first on every path: against the cached derivation on a
        // hit (one constant-time compare of the text as sent: the canonical encoding is the
        // only well-formed one, so an equal value needs no decoding), by HMAC otherwise. A
        // forged secret costs the HMAC whether or not its key is cached, and never reaches
        // the database.
        // The key is looked up as sent: only well-formed keys are cached, so one found there
        // needs no parsing (the form is checked first, as SPEC §2 orders, on every other path).
        let now = monotonic_ms();
        // Read before either lookup: a copy made from what this finds must not outlive an
        // invalidation that lands after this read (see [`local`]).
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        let hit = local::get(self.inner.id, epoch, sent, now).or_else(|| {
            let found = cache
                .get(sent)
                .filter(|entry| entry.stale_ms > now)
                .and_then(|entry| Some((ApiKey::known(sent)?, entry)))?;
            local::offer(self.inner.id, epoch, &found.0, &found.1);
            Some(found)
        });
        let (key, entry) = match hit {
            Some((key, entry)) => {
                // A different secret may still be derived by another configured master key.
                if !entry.secret.is(presented) {
                    self.verify_derivation(&key, &parse()?)?;
                }
                self.inner.metrics.cache_hit();
                (key, entry)
            }
            // Missing, or past the TTL: read again.
            None => {
                let key = parse_key()?;
                // (The epoch was read before the derivation is checked: a change of master
                // keys after it makes the answer's cached derivation suspect, and the entry
                // is dropped.)
                let secret = parse()?;
                self.verify_derivation(&key, &secret)?;
                self.inner.metrics.cache_miss();
                // Concurrent misses on one key share this one lookup: the others wait on
                // the guard. Errors are not cached (dropping the guard lets one retry).
                let entry = match cache.get_value_or_guard_async(&key).await {
                    Ok(entry) if entry.stale_ms > monotonic_ms() => entry,
                    found => {
                        let entry = self.load(&key, &secret, presented).await?;
                        match found {
                            Err(guard) => {
                                let _ = guard.insert(entry.clone());
                            }
                            Ok(_) => cache.insert(key.clone(), entry.clone()),
                        }
                        if self.inner.epoch.load(Ordering::Acquire) != epoch {
                            // A change landed while we were reading: the answer may
                            // predate it.
                            cache.remove(&key);
                        }
                        entry
                    }
                };
                (key, entry)
            }
        };
        // No cache trusts an entry past its credential's expiry (SPEC §7.5).
        if entry.is_expired() {
            cache.remove(&key);
            return Err(AuthOutcome::RejectedExpired);
        }
        Ok(Caller {
            key,
            profile: entry.profile,
        })
    }

    /// Whether one of the configured master keys derived `secret` from `key` (an HMAC each).
    fn verify_derivation(&self, key: &ApiKey, secret: &ApiSecret) -> Result<(), AuthOutcome> {
        match self.inner.keys.load().verify(key, secret) {
            Some(_) => Ok(()),
            None => Err(AuthOutcome::RejectedDerivation),
        }
    }

    /// Reads `key`'s credential for the cache; `secret` is its parsed derivation, as sent in
    /// `presented`.
    async fn load(
        &self,
        key: &ApiKey,
        secret: &ApiSecret,
        presented: &[u8],
    ) -> Result<Entry, AuthOutcome> {
        match self.inner.store.lookup(key).await {
            Ok(Some(record)) => {
                if record.master_key_id.is_none() {
                    self.learn_master_key_id(key, secret);
                }
                // What was sent parsed, so it is the canonical text: kept as sent.
                let encoded = EncodedSecret::as_sent(presented).unwrap_or_else(|| secret.encoded());
                self.inner.entry(record, encoded)
            }
            Ok(None) => Err(AuthOutcome::RejectedUnknown),
            // Logged where the 500 is answered, with its cause.
            Err(e) => Err(AuthOutcome::Failed(e)),
        }
    }

    /// Queues, for the background writer, which master key derived the secret of a
    /// credential registered before that was recorded (at its cache misses; a failure only
    /// leaves it to a later miss).
    fn learn_master_key_id(&self, key: &ApiKey, secret: &ApiSecret) {
        let Some(id) = self
            .inner
            .keys
            .load()
            .verify(key, secret)
            .map(|d| d.key_id().to_owned())
        else {
            return;
        };
        let mut pending = self.inner.pending_ids();
        if pending.len() < MAX_PENDING_IDS {
            pending.push((key.clone(), id));
            if pending.len() == IDS_BATCH {
                self.inner.wake_writer.notify_one();
            }
        }
    }

    /// Writes what authentication learnt and has not written yet (last uses, master key ids),
    /// now: for a clean stop, which then loses none.
    pub async fn write_learnt(&self) {
        self.inner.learnt(true).write().await;
    }

    /// Drops `key` from the cache at once, after this instance changed its scopes, expiry or
    /// owner. The change feed's echo is applied too: unlike a revoked key, an updated one may
    /// be cached again in between.
    pub async fn forget(&self, key: &ApiKey) {
        self.inner.apply(Change::Key(key.as_str().to_owned())).await;
    }

    /// Drops `key` from the cache at once, after this instance revoked it. Only for
    /// revocations: the change feed's echo of this change is then skipped, which is safe
    /// because a revoked key can never be cached again (a lookup racing the revocation is
    /// kept out by the epoch guard), so no later event about it can matter.
    pub async fn forget_revoked(&self, key: &ApiKey) {
        self.inner.apply(Change::Key(key.as_str().to_owned())).await;
        if self.inner.cache.is_some() {
            let mut forgotten = self.inner.forgotten();
            if forgotten.len() >= MAX_FORGOTTEN {
                forgotten.clear();
            }
            forgotten.insert(key.clone());
        }
    }

    /// The number of cached credentials (approximate, for metrics).
    pub fn cached(&self) -> u64 {
        self.inner.cache.as_ref().map_or(0, |c| c.len() as u64)
    }

    /// The master keys secrets are checked with (the first mints).
    pub fn keys(&self) -> Arc<KeyRing> {
        self.inner.keys.load_full()
    }

    /// Replaces the master keys (a reload of the key file). Credentials derived from a key
    /// that is no longer in the ring fail authentication from the next request on, cached or
    /// not, since every request checks its derivation first.
    pub fn replace_keys(&self, keys: KeyRing) {
        self.inner.keys.store(Arc::new(keys));
        // Cached derivations may be of a key no longer configured: every credential is
        // checked by HMAC again at its next use. (A lookup racing this may cache an answer
        // read under the old keys; the epoch makes it drop that answer.)
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        if let Some(cache) = &self.inner.cache {
            cache.clear();
        }
        // Again once the cache is empty: per-thread copies made from what a lookup found
        // in between are no longer trusted (see [`local`]).
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

impl Inner {
    /// What is queued for writing: the store, the keys used (starting a new interval when
    /// `next_interval`) and the learnt master key ids.
    fn learnt(&self, next_interval: bool) -> Learnt {
        let mut keys = self
            .usage
            .as_ref()
            .map(|u| u.take(next_interval))
            .unwrap_or_default();
        keys.append(&mut self.paced());
        let ids = std::mem::take(&mut *self.pending_ids());
        Learnt {
            store: self.store.clone(),
            keys,
            ids,
        }
    }

    fn paced(&self) -> std::sync::MutexGuard<'_, Vec<ApiKey>> {
        // A plain list: a panic elsewhere cannot leave it half-updated.
        self.paced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds keys to the paced queue, kept sorted so that each chunk is one key range.
    fn queue_paced(&self, keys: Vec<ApiKey>) {
        let mut paced = self.paced();
        paced.extend(keys);
        paced.sort_unstable();
        paced.dedup();
    }

    /// The next chunk of the paced queue, and how many chunks are left after it.
    fn next_paced(&self) -> Option<(Vec<ApiKey>, usize)> {
        let mut paced = self.paced();
        if paced.is_empty() {
            return None;
        }
        let at = paced.len().saturating_sub(TOUCH_CHUNK);
        let chunk = paced.split_off(at);
        Some((chunk, paced.len().div_ceil(TOUCH_CHUNK)))
    }

    fn pending_ids(&self) -> std::sync::MutexGuard<'_, Vec<(ApiKey, String)>> {
        // A plain list: a panic elsewhere cannot leave it half-updated.
        self.pending_ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache entry for a stored credential, or why it does not authenticate.
    fn entry(&self, record: AuthRecord, secret: EncodedSecret) -> Result<Entry, AuthOutcome> {
        if !record.active {
            return Err(AuthOutcome::RejectedRevoked);
        }
        let expires_ms = record.expires_at.map_or(i64::MAX, |t| t.timestamp_millis());
        if expires_ms != i64::MAX && now_ms() >= expires_ms {
            return Err(AuthOutcome::RejectedExpired);
        }
        let scopes = self
            .scope_sets
            .get(&record.scopes, || ScopeSet::from_stored(&record.scopes));
        Ok(Entry {
            profile: Profile {
                scopes,
                owner: record.owner.as_deref().map(Owner::new),
            },
            expires_ms,
            stale_ms: monotonic_ms().saturating_add(self.ttl_ms),
            secret,
        })
    }

    fn forgotten(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<ApiKey>> {
        // A plain set: a panic elsewhere cannot leave it half-updated.
        self.forgotten.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a change from the feed, unless it is the echo of a revocation made here.
    async fn follow(&self, change: Change) {
        let echo = match &change {
            Change::Key(key) => ApiKey::parse(key)
                .map(|key| self.forgotten().remove(&key))
                .unwrap_or(false),
            Change::All => {
                self.forgotten().clear();
                false
            }
        };
        if !echo {
            self.apply(change).await;
        }
    }

    /// Forgets what `change` names, and makes lookups in flight not cache what they read.
    async fn apply(&self, change: Change) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let Some(cache) = &self.cache else { return };
        match change {
            Change::Key(key) => {
                if let Ok(key) = ApiKey::parse(&key) {
                    cache.remove(&key);
                }
            }
            Change::All => cache.clear(),
        }
        // Again once the entry is gone: a per-thread copy made from a lookup that found it
        // in between is no longer trusted (see [`local`]).
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// Applies the store's change feed to the cache until the feed closes. It holds the
/// authenticator weakly: the authenticator owns this task, not the other way round.
async fn follow(inner: Weak<Inner>, mut changes: broadcast::Receiver<Change>) {
    loop {
        let change = match changes.recv().await {
            Ok(change) => change,
            // Fell behind and changes were dropped: forget everything rather than guess.
            Err(broadcast::error::RecvError::Lagged(_)) => Change::All,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // None only while the authenticator is still being built, with an empty cache.
        if let Some(inner) = inner.upgrade() {
            inner.follow(change).await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The epoch guard in `check`, against a store double whose lookups the test holds and
    //! releases: the one race the integration tests cannot time.

    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;
    use tokio::sync::Notify;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::credential::MasterKey;
    use crate::store::{
        CredentialRecord, ListQuery, NewCredential, Registration, Revocation, Update, Updated,
    };

    /// A store with one answer for every key. It counts lookups, and holds the first one
    /// between reading its answer and returning it until the test releases it: a lookup that
    /// read the database just before a revocation committed and answers just after.
    struct HeldStore {
        /// Whether the key is active.
        state: Mutex<bool>,
        lookups: AtomicUsize,
        /// Signalled once the first lookup has read its answer.
        read: Notify,
        /// Lets the first lookup return its answer.
        release: Notify,
        changes: broadcast::Sender<Change>,
    }

    use crate::audit::{Event, EventQuery, Origin};

    #[async_trait]
    impl CredentialStore for HeldStore {
        async fn lookup(&self, _key: &ApiKey) -> Result<Option<AuthRecord>, StoreError> {
            let active = *self.state.lock().expect("state");
            if self.lookups.fetch_add(1, Ordering::SeqCst) == 0 {
                self.read.notify_one();
                self.release.notified().await;
            }
            Ok(Some(AuthRecord {
                active,
                scopes: "*".into(),
                owner: None,
                expires_at: None,
                master_key_id: Some("0000000000000000".into()),
            }))
        }

        fn subscribe(&self) -> broadcast::Receiver<Change> {
            self.changes.subscribe()
        }

        async fn close(&self) {}

        // The authenticator only looks keys up.
        async fn register(
            &self,
            _new: &NewCredential,
            _origin: &Origin,
        ) -> Result<Registration, StoreError> {
            unreachable!("not used by the authenticator")
        }

        async fn update(
            &self,
            _key: &ApiKey,
            _update: &Update,
            _origin: &Origin,
        ) -> Result<Updated, StoreError> {
            unreachable!("not used by the authenticator")
        }

        async fn events(&self, _query: &EventQuery) -> Result<Vec<Event>, StoreError> {
            unreachable!("not used by the authenticator")
        }

        async fn prune_events(
            &self,
            _before: chrono::DateTime<chrono::Utc>,
        ) -> Result<u64, StoreError> {
            unreachable!("not used by the authenticator")
        }

        async fn record_master_key_id(
            &self,
            _keys: &[ApiKey],
            _id: &str,
        ) -> Result<(), StoreError> {
            unreachable!("the test store's credentials have an id")
        }

        async fn touch(
            &self,
            _keys: &[ApiKey],
            _at: chrono::DateTime<chrono::Utc>,
        ) -> Result<(), StoreError> {
            unreachable!("last-used tracking is off in these tests")
        }

        async fn roll(
            &self,
            _old: &ApiKey,
            _new: &ApiKey,
            _master_key_id: &str,
            _old_until: chrono::DateTime<chrono::Utc>,
            _origin: &Origin,
        ) -> Result<crate::store::Rolled, StoreError> {
            unreachable!("not used by the authenticator")
        }

        async fn revoke(&self, _key: &ApiKey, _origin: &Origin) -> Result<Revocation, StoreError> {
            unreachable!("not used by the authenticator")
        }

        async fn get(&self, _key: &ApiKey) -> Result<Option<CredentialRecord>, StoreError> {
            unreachable!("not used by the authenticator")
        }

        async fn list(&self, _query: &ListQuery) -> Result<Vec<CredentialRecord>, StoreError> {
            unreachable!("not used by the authenticator")
        }

        async fn ping(&self) -> Result<(), StoreError> {
            unreachable!("not used by the authenticator")
        }

        async fn check_writable(&self) -> Result<(), StoreError> {
            unreachable!("not used by the authenticator")
        }
    }

    fn deriver() -> crate::credential::SecretDeriver {
        crate::credential::SecretDeriver::new(&MasterKey::from_bytes([7; 32]))
    }

    /// A [`HeldStore`] answering "active" that has already served `lookups` lookups (the
    /// first one is held), and an authenticator with a cache over it.
    fn held(lookups: usize) -> (Arc<HeldStore>, Authenticator) {
        let store = Arc::new(HeldStore {
            state: Mutex::new(true),
            lookups: AtomicUsize::new(lookups),
            read: Notify::new(),
            release: Notify::new(),
            changes: broadcast::channel(16).0,
        });
        let cache = CacheSettings {
            ttl: Duration::from_secs(300),
            capacity: 100,
            last_used_interval: Duration::ZERO,
        };
        let metrics = Metrics::new().expect("metrics");
        let auth = Authenticator::new(deriver(), store.clone(), cache, metrics);
        (store, auth)
    }

    /// An authentication of an active key whose lookup has read "active" and not yet
    /// answered, while the key is revoked in the store.
    struct Race {
        store: Arc<HeldStore>,
        auth: Authenticator,
        key: ApiKey,
        secret: String,
        first: JoinHandle<AuthOutcome>,
    }

    impl Race {
        async fn start() -> Self {
            let (store, auth) = held(0);
            let key = ApiKey::generate();
            let secret = deriver().secret_for(&key).expose();
            let first = tokio::spawn({
                let (auth, key, secret) = (auth.clone(), key.clone(), secret.clone());
                async move {
                    auth.authenticate(Some(key.as_str().as_bytes()), Some(secret.as_bytes()))
                        .await
                }
            });
            store.read.notified().await;
            *store.state.lock().expect("state") = false;
            Self {
                store,
                auth,
                key,
                secret,
                first,
            }
        }

        /// Lets the held lookup answer "active", then authenticates again: the revocation was
        /// seen while the lookup was in flight, so its answer must not have been cached and
        /// this authentication must look the key up afresh, and be refused.
        async fn finish(self) {
            self.store.release.notify_one();
            let first = self.first.await.expect("first authentication");
            // It read the database before the revocation: accepting it is right.
            assert!(matches!(first, AuthOutcome::Authenticated(_)), "{first:?}");
            let next = self
                .auth
                .authenticate(
                    Some(self.key.as_str().as_bytes()),
                    Some(self.secret.as_bytes()),
                )
                .await;
            assert_eq!(
                self.store.lookups.load(Ordering::SeqCst),
                2,
                "the answer read before the revocation was served from the cache"
            );
            assert!(matches!(next, AuthOutcome::RejectedRevoked), "{next:?}");
        }
    }

    #[test]
    fn a_key_is_queued_once_per_interval_however_often_it_is_used() {
        let usage = Usage::new(Arc::default());
        let keys: Vec<ApiKey> = (0..1000).map(|_| ApiKey::generate()).collect();
        for _ in 0..5 {
            for key in &keys {
                usage.note(key);
            }
        }
        let mut first = usage.take(false);
        assert_eq!(first.len(), keys.len());
        // Taken early (a full batch), the interval goes on: no key is queued again, but for
        // keys sharing a slot with another (the documented cost of a fixed table).
        for key in &keys {
            usage.note(key);
        }
        let slot = |key: &ApiKey| {
            use std::hash::BuildHasher as _;
            (usage.hasher.hash_one(key) as usize) & (USAGE_SLOTS - 1)
        };
        let mut per_slot = std::collections::HashMap::new();
        for key in &keys {
            *per_slot.entry(slot(key)).or_insert(0) += 1;
        }
        let again = usage.take(true);
        assert!(
            again.iter().all(|key| per_slot[&slot(key)] > 1),
            "{again:?}"
        );
        // A new interval: each key is queued again on its next use, once.
        for key in keys.iter().chain(&keys) {
            usage.note(key);
        }
        let mut second = usage.take(true);
        first.sort();
        second.sort();
        assert_eq!(first, second);
    }

    #[test]
    fn a_paced_batch_rests_nine_times_each_chunk_and_still_ends_by_its_deadline() {
        let ms = Duration::from_millis;
        // Plenty of room: nine times the chunk's write.
        assert_eq!(pause(ms(5), 10, ms(60_000)), ms(45));
        // Little room: the rest shares it (each chunk's slot 100 ms, minus the write).
        assert_eq!(pause(ms(20), 10, ms(1_000)), ms(80));
        // Late, or a chunk slower than its share: no pause at all.
        assert_eq!(pause(ms(20), 10, ms(100)), Duration::ZERO);
        assert_eq!(pause(ms(20), 3, Duration::ZERO), Duration::ZERO);
        // A whole batch at a steady speed: paced when the deadline allows, never past it.
        let elapsed = |chunks: usize, took: Duration, deadline: Duration| {
            let mut spent = Duration::ZERO;
            for left in (0..chunks).rev() {
                spent += took;
                if left > 0 {
                    spent += pause(took, left, deadline.saturating_sub(spent));
                }
            }
            spent
        };
        assert_eq!(elapsed(100, ms(7), ms(60_000)), ms(7 * 100 + 63 * 99));
        let tight = elapsed(100, ms(7), ms(2_000));
        assert!(tight > ms(1_900) && tight <= ms(2_000), "{tight:?}");
        // A batch that cannot make it is written flat out.
        assert_eq!(elapsed(100, ms(30), ms(2_000)), ms(3_000));
    }

    /// What is left of a paced batch is taken with the rest when the service stops cleanly
    /// (or at the interval's end), so no key of it is lost.
    #[tokio::test]
    async fn the_rest_of_a_paced_batch_is_written_with_the_next_batch() {
        let (_store, auth) = held(0);
        let mut keys: Vec<ApiKey> = (0..2 * TOUCH_CHUNK + 500)
            .map(|_| ApiKey::generate())
            .collect();
        auth.inner.queue_paced(keys[..TOUCH_CHUNK].to_vec());
        auth.inner.queue_paced(keys.clone());
        let (first, left) = auth.inner.next_paced().expect("a chunk");
        assert_eq!((first.len(), left), (TOUCH_CHUNK, 2));
        assert!(first.is_sorted());
        let mut rest = auth.inner.learnt(true).keys;
        assert!(auth.inner.next_paced().is_none());
        rest.extend(first);
        rest.sort();
        keys.sort();
        assert_eq!(rest, keys);
    }

    #[test]
    fn owners_are_kept_whole_inline_or_shared() {
        for owner in [
            "",
            "a",
            "customer-123456",
            &"x".repeat(22),
            &"é".repeat(11),
            &"y".repeat(23),
            &"z".repeat(200),
        ] {
            let kept = Owner::new(owner);
            assert_eq!(kept.as_str(), owner);
            assert_eq!(
                matches!(kept, Owner::Inline { .. }),
                owner.len() <= Owner::INLINE
            );
        }
        assert_eq!(std::mem::size_of::<Option<Owner>>(), 24);
    }

    /// A hit compares the presented secret with the cached derivation: a forged one is
    /// refused without a lookup, one derived by another configured master key is accepted,
    /// and a derivation by a master key no longer configured fails at once, cached or not.
    #[tokio::test]
    async fn a_cached_credential_is_checked_against_its_derivation() {
        let (store, auth) = held(1);
        let (first, second) = (
            MasterKey::from_bytes([7; 32]),
            MasterKey::from_bytes([8; 32]),
        );
        let ring = |keys: &[MasterKey]| KeyRing::new(keys).expect("a ring");
        auth.replace_keys(ring(&[first, second.clone()]));
        let key = ApiKey::generate();
        let secret_by = |master: &MasterKey| {
            crate::credential::SecretDeriver::new(master)
                .secret_for(&key)
                .expose()
        };
        let (by_first, by_second) = (deriver().secret_for(&key).expose(), secret_by(&second));
        let forged = secret_by(&MasterKey::from_bytes([9; 32]));
        let lookups = || store.lookups.load(Ordering::SeqCst);
        let outcome = |secret: &String| {
            let (auth, key, secret) = (auth.clone(), key.clone(), secret.clone());
            async move {
                auth.authenticate(Some(key.as_str().as_bytes()), Some(secret.as_bytes()))
                    .await
            }
        };

        assert!(matches!(
            outcome(&by_first).await,
            AuthOutcome::Authenticated(_)
        ));
        let after_miss = lookups();
        assert!(matches!(
            outcome(&forged).await,
            AuthOutcome::RejectedDerivation
        ));
        assert!(matches!(
            outcome(&by_second).await,
            AuthOutcome::Authenticated(_)
        ));
        assert!(matches!(
            outcome(&by_first).await,
            AuthOutcome::Authenticated(_)
        ));
        assert_eq!(lookups(), after_miss, "served from the cache");

        auth.replace_keys(ring(&[second]));
        assert!(matches!(
            outcome(&by_first).await,
            AuthOutcome::RejectedDerivation
        ));
        assert!(matches!(
            outcome(&by_second).await,
            AuthOutcome::Authenticated(_)
        ));
        assert_eq!(
            lookups(),
            after_miss + 1,
            "looked up again after the keys changed"
        );
    }

    /// A hit served from this thread's copy is dropped with the shared entry: after a
    /// revocation here or one from the change feed, the next request is looked up again.
    #[tokio::test]
    async fn a_thread_copy_is_not_trusted_after_an_invalidation() {
        let (store, auth) = held(1);
        let key = ApiKey::generate();
        let secret = deriver().secret_for(&key).expose();
        let lookups = || store.lookups.load(Ordering::SeqCst);
        let outcome = || auth.authenticate(Some(key.as_str().as_bytes()), Some(secret.as_bytes()));
        let copied = || {
            let epoch = auth.inner.epoch.load(Ordering::Acquire);
            local::get(
                auth.inner.id,
                epoch,
                key.as_str().as_bytes(),
                monotonic_ms(),
            )
            .is_some()
        };
        // A miss, then two hits of the shared cache: the second makes this thread's copy.
        for _ in 0..3 {
            assert!(matches!(outcome().await, AuthOutcome::Authenticated(_)));
        }
        assert!(copied(), "the second hit makes a copy");
        let cached = lookups();
        assert!(matches!(outcome().await, AuthOutcome::Authenticated(_)));
        assert_eq!(lookups(), cached, "served from the copy");

        // Revoked by this instance.
        *store.state.lock().expect("state") = false;
        auth.forget(&key).await;
        assert!(!copied());
        assert!(matches!(outcome().await, AuthOutcome::RejectedRevoked));
        assert_eq!(lookups(), cached + 1, "looked up again");

        // Active again (a store double can do that), copied again, then changed elsewhere:
        // the change feed drops the copy too.
        *store.state.lock().expect("state") = true;
        auth.forget(&key).await;
        for _ in 0..3 {
            assert!(matches!(outcome().await, AuthOutcome::Authenticated(_)));
        }
        assert!(copied());
        *store.state.lock().expect("state") = false;
        let before = auth.inner.epoch.load(Ordering::Acquire);
        store
            .changes
            .send(Change::Key(key.as_str().to_owned()))
            .expect("a subscriber");
        tokio::time::timeout(Duration::from_secs(5), async {
            while auth.inner.epoch.load(Ordering::Acquire) < before + 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the change was not applied");
        assert!(!copied());
        assert!(matches!(outcome().await, AuthOutcome::RejectedRevoked));
    }

    #[tokio::test]
    async fn a_lookup_racing_forget_does_not_cache_its_answer() {
        let race = Race::start().await;
        race.auth.forget_revoked(&race.key).await;
        race.finish().await;
    }

    #[tokio::test]
    async fn a_lookup_racing_a_change_on_the_feed_does_not_cache_its_answer() {
        let race = Race::start().await;
        let epoch = || race.auth.inner.epoch.load(Ordering::Acquire);
        let before = epoch();
        race.store
            .changes
            .send(Change::Key(race.key.as_str().to_owned()))
            .expect("a subscriber");
        // The authenticator's follower task applies the change.
        tokio::time::timeout(Duration::from_secs(5), async {
            while epoch() == before {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the change was not applied");
        race.finish().await;
    }

    #[tokio::test]
    async fn the_revoking_instance_skips_the_echo_of_its_own_revocation() {
        // Past the first lookup: nothing is held.
        let (store, auth) = held(1);
        let epoch = || auth.inner.epoch.load(Ordering::Acquire);
        let (revoked, other) = (ApiKey::generate(), ApiKey::generate());
        auth.forget_revoked(&revoked).await;
        let after_forget = epoch();
        // The echo, then a change made elsewhere: the feed is ordered, so once the second is
        // applied the first has been seen, and skipped.
        for key in [&revoked, &other] {
            store
                .changes
                .send(Change::Key(key.as_str().to_owned()))
                .expect("a subscriber");
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while epoch() == after_forget {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the feed was not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Each applied change moves the epoch twice (before and after the entry goes).
        assert_eq!(epoch(), after_forget + 2, "the echo was applied as well");
        // A second echo of the same key is a change made elsewhere again: applied.
        store
            .changes
            .send(Change::Key(revoked.as_str().to_owned()))
            .expect("a subscriber");
        tokio::time::timeout(Duration::from_secs(5), async {
            while epoch() == after_forget + 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a later change was skipped");
    }
}
