//! Authentication of a request from its two headers, in the order SPEC §2 fixes:
//! form → derivation (CPU only) → cache → database. A forged pair never reaches the cache or
//! the database; only positive answers are cached, for at most the TTL; a revocation seen
//! by this instance (its own, or reported by the store's change watcher) drops the entry.
//! Each of the two headers must be sent exactly once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use moka::future::Cache;
use tokio::sync::broadcast;

use crate::credential::{ApiKey, ApiSecret, SecretDeriver};
use crate::store::{AbortOnDrop, Change, CredentialStore, KeyState, StoreError};
use crate::telemetry::{AuthResult, Metrics};

/// Header carrying the api_key. (A `HeaderName`, not a `&str`: looking it up then needs no
/// parsing on every request.)
pub static KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");
/// Header carrying the api_secret.
pub static SECRET_HEADER: HeaderName = HeaderName::from_static("x-api-secret");

/// The authenticated caller, put into request extensions by [`require_credential`].
#[derive(Debug, Clone)]
pub struct Caller(pub ApiKey);

/// Why a request was not authenticated.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// Any credential problem. Deliberately one variant: callers learn nothing about which
    /// part was wrong.
    #[error("missing or invalid credentials")]
    Rejected,
    /// The database failed; the request is neither accepted nor rejected.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Cache settings.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// How long a positive answer is trusted; zero disables the cache.
    pub ttl: Duration,
    /// Most cached credentials.
    pub capacity: u64,
}

/// Authenticates requests. Cheap to clone: clones share the cache.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    deriver: SecretDeriver,
    store: Arc<dyn CredentialStore>,
    /// Keys known active; `None` when caching is disabled. Hashed with foldhash rather than
    /// SipHash: only keys whose secret passed the HMAC check get here, so nobody without the
    /// master key can choose colliding keys.
    cache: Option<Cache<ApiKey, (), foldhash::fast::RandomState>>,
    /// Bumped on every invalidation, so a lookup that raced a revocation does not cache
    /// what it read before the revocation committed.
    epoch: AtomicU64,
    metrics: Metrics,
    /// Drains the store's change feed into the cache; stopped with the authenticator.
    _follower: Option<AbortOnDrop>,
}

impl Authenticator {
    /// Builds an authenticator over a store.
    pub fn new(
        deriver: SecretDeriver,
        store: Arc<dyn CredentialStore>,
        cache: CacheSettings,
        metrics: Metrics,
    ) -> Self {
        let cache = (!cache.ttl.is_zero() && cache.capacity > 0).then(|| {
            Cache::builder()
                .max_capacity(cache.capacity)
                .time_to_live(cache.ttl)
                .build_with_hasher(foldhash::fast::RandomState::default())
        });
        let changes = store.subscribe();
        let inner = Arc::new_cyclic(|me: &Weak<Inner>| Inner {
            deriver,
            store,
            cache,
            epoch: AtomicU64::new(0),
            metrics,
            // Outside a runtime (a synchronous benchmark, say) there is no feed to follow.
            _follower: tokio::runtime::Handle::try_current()
                .ok()
                .map(|rt| AbortOnDrop(rt.spawn(follow(me.clone(), changes)))),
        });
        Self { inner }
    }

    /// Authenticates the pair in `headers`.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<ApiKey, AuthError> {
        let result = self.check(headers).await;
        self.inner.metrics.auth(match &result {
            Ok(_) => AuthResult::Ok,
            Err(Failure::Form) => AuthResult::RejectedForm,
            Err(Failure::Derivation) => AuthResult::RejectedDerivation,
            Err(Failure::Unknown) => AuthResult::RejectedUnknown,
            Err(Failure::Revoked) => AuthResult::RejectedRevoked,
            Err(Failure::Store(_)) => AuthResult::Error,
        });
        result.map_err(|f| match f {
            Failure::Store(e) => AuthError::Store(e),
            _ => AuthError::Rejected,
        })
    }

    async fn check(&self, headers: &HeaderMap) -> Result<ApiKey, Failure> {
        let key = single_header(headers, &KEY_HEADER)
            .and_then(|v| ApiKey::parse(v).ok())
            .ok_or(Failure::Form)?;
        let secret = single_header(headers, &SECRET_HEADER)
            .and_then(|v| ApiSecret::parse(v).ok())
            .ok_or(Failure::Form)?;
        if !self.inner.deriver.verify(&key, &secret) {
            return Err(Failure::Derivation);
        }
        let Some(cache) = &self.inner.cache else {
            self.inner.metrics.cache_miss();
            return self.load(&key).await.map(|()| key);
        };
        if cache.get(&key).await.is_some() {
            self.inner.metrics.cache_hit();
            return Ok(key);
        }
        self.inner.metrics.cache_miss();
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        // Concurrent misses on one key share this one lookup; errors are not cached.
        let entry = cache
            .entry(key.clone())
            .or_try_insert_with(self.load(&key))
            .await
            .map_err(|e| (*e).clone())?;
        if entry.is_fresh() && self.inner.epoch.load(Ordering::Acquire) != epoch {
            // A revocation landed while we were reading: the answer may predate it.
            cache.invalidate(&key).await;
        }
        Ok(key)
    }

    async fn load(&self, key: &ApiKey) -> Result<(), Failure> {
        match self.inner.store.state(key).await {
            Ok(KeyState::Active) => Ok(()),
            Ok(KeyState::Revoked) => Err(Failure::Revoked),
            Ok(KeyState::Unknown) => Err(Failure::Unknown),
            Err(e) => {
                tracing::error!(error = %e, api_key = %key, "credential lookup failed");
                Err(Failure::Store(e))
            }
        }
    }

    /// Drops `key` from the cache at once (after this instance revoked it).
    pub async fn forget(&self, key: &ApiKey) {
        self.inner.apply(Change::Key(key.as_str().to_owned())).await;
    }

    /// The number of cached credentials (approximate, for metrics).
    pub fn cached(&self) -> u64 {
        self.inner.cache.as_ref().map_or(0, |c| c.entry_count())
    }

    /// The deriver this authenticator checks secrets with.
    pub fn deriver(&self) -> &SecretDeriver {
        &self.inner.deriver
    }
}

impl Inner {
    /// Forgets what `change` names, and makes lookups in flight not cache what they read.
    async fn apply(&self, change: Change) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let Some(cache) = &self.cache else { return };
        match change {
            Change::Key(key) => {
                if let Ok(key) = ApiKey::parse(&key) {
                    cache.invalidate(&key).await;
                }
            }
            Change::All => cache.invalidate_all(),
        }
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
            inner.apply(change).await;
        }
    }
}

#[derive(Debug, Clone)]
enum Failure {
    Form,
    Derivation,
    Unknown,
    Revoked,
    Store(StoreError),
}

/// The value of a header sent exactly once. A repeated header is refused even when its copies
/// agree: proxies differ on which copy they read, and one that reads the last would act for
/// another key than the one authenticated here.
fn single_header<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()
}

/// Middleware that admits only authenticated requests and puts the [`Caller`] into request
/// extensions. Mount it with `axum::middleware::from_fn_with_state(authenticator, …)` on the
/// routes to protect.
pub async fn require_credential(
    State(auth): State<Authenticator>,
    mut req: Request,
    next: Next,
) -> Response {
    match auth.authenticate(req.headers()).await {
        Ok(key) => {
            req.extensions_mut().insert(Caller(key));
            next.run(req).await
        }
        Err(e) => crate::http::ApiError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_header_counts_only_when_sent_exactly_once() {
        let mut headers = HeaderMap::new();
        assert_eq!(single_header(&headers, &KEY_HEADER), None);
        headers.append(&KEY_HEADER, HeaderValue::from_static("ak_a"));
        assert_eq!(single_header(&headers, &KEY_HEADER), Some("ak_a"));
        headers.append(&KEY_HEADER, HeaderValue::from_static("ak_a"));
        assert_eq!(single_header(&headers, &KEY_HEADER), None);
        let mut headers = HeaderMap::new();
        headers.append(&SECRET_HEADER, HeaderValue::from_static("sk_a"));
        headers.append(&SECRET_HEADER, HeaderValue::from_static(""));
        assert_eq!(single_header(&headers, &SECRET_HEADER), None);
        assert_eq!(single_header(&headers, &KEY_HEADER), None);
        // Not visible ASCII: refused, never lossily converted.
        let mut headers = HeaderMap::new();
        headers.append(&KEY_HEADER, HeaderValue::from_bytes(b"ak_\xff").unwrap());
        assert_eq!(single_header(&headers, &KEY_HEADER), None);
    }
}
