//! Microbenchmarks of the authentication path: parse + derive + constant-time verify; a
//! cache hit end to end through the `Authenticator`, from one thread and from two at once; a
//! forged secret, of a cached key and of a key never seen; a cache miss against SQLite
//! holding 1 000 000 credentials.
//!
//! `cargo bench --bench auth`

#[path = "support/seed.rs"]
mod seed;

use std::sync::Arc;
use std::time::Duration;

use credgate::auth::{AuthOutcome, Authenticator, CacheSettings};
use credgate::credential::{ApiKey, ApiSecret, MasterKey, SecretDeriver};
use credgate::store::CredentialStore;
use credgate::store::sqlite::{SqliteOptions, SqliteStore};
use credgate::telemetry::Metrics;
use criterion::{Criterion, criterion_group, criterion_main};

const ROWS: u64 = 1_000_000;

fn deriver() -> SecretDeriver {
    SecretDeriver::new(&MasterKey::from_bytes([7; 32]))
}

/// A pair as the two header values.
fn presented(deriver: &SecretDeriver, key: &ApiKey) -> (String, String) {
    (key.as_str().to_owned(), deriver.secret_for(key).expose())
}

/// Authenticates `pair`, which must be accepted.
async fn accepted(auth: &Authenticator, pair: &(String, String)) {
    let outcome = auth
        .authenticate(Some(pair.0.as_bytes()), Some(pair.1.as_bytes()))
        .await;
    assert!(
        matches!(outcome, AuthOutcome::Authenticated(_)),
        "{outcome:?}"
    );
}

/// Authenticates `pair`, whose secret is forged.
async fn rejected(auth: &Authenticator, pair: &(String, String)) {
    let outcome = auth
        .authenticate(Some(pair.0.as_bytes()), Some(pair.1.as_bytes()))
        .await;
    assert!(
        matches!(outcome, AuthOutcome::RejectedDerivation),
        "{outcome:?}"
    );
}

fn derivation(c: &mut Criterion) {
    let d = deriver();
    let key = ApiKey::generate();
    let secret = d.secret_for(&key).expose();
    let key = key.into_string();
    c.bench_function("parse + derive + verify", |b| {
        b.iter(|| {
            let k = ApiKey::parse(std::hint::black_box(&key)).unwrap();
            let s = ApiSecret::parse(std::hint::black_box(&secret)).unwrap();
            assert!(d.verify(&k, &s));
        })
    });
}

fn authentication(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let seeded = rt
        .block_on(seed::seed_sqlite(&path, ROWS, deriver().key_id()))
        .unwrap();
    eprintln!("seeded {ROWS} credentials in {:.2} s", seeded.as_secs_f64());
    let store: Arc<dyn CredentialStore> = Arc::new(
        rt.block_on(SqliteStore::open(
            &path,
            SqliteOptions::default(),
            Metrics::new().unwrap(),
        ))
        .unwrap(),
    );
    let d = deriver();

    let cached = Authenticator::new(
        d.clone(),
        store.clone(),
        CacheSettings {
            ttl: Duration::from_secs(300),
            capacity: 100_000,
            last_used_interval: Duration::from_secs(60),
        },
        Metrics::new().unwrap(),
    );
    let hot = presented(&d, &seed::bench_key(42));
    rt.block_on(accepted(&cached, &hot));
    c.bench_function("authenticate: cache hit", |b| {
        b.to_async(&rt).iter(|| accepted(&cached, &hot))
    });

    // The same hit from two threads at once, as a busy instance's two workers serve it: what
    // one thread writes that the other also writes (a shared counter, a lock, a reference
    // count) moves its cache line between cores on every call. Time per call on each thread.
    c.bench_function("authenticate: cache hit, two threads at once", |b| {
        b.iter_custom(|iters| {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        rt.block_on(async {
                            for _ in 0..iters {
                                accepted(&cached, &hot).await;
                            }
                        })
                    });
                }
            });
            start.elapsed()
        })
    });

    // Forged secrets: of the cached key (checked against its cached derivation, then by HMAC
    // in case another master key derived it) and of keys never seen (HMAC only). Both must be
    // rejected without a database query.
    let forger = SecretDeriver::new(&MasterKey::from_bytes([9; 32]));
    let forged_hot = (
        hot.0.clone(),
        forger.secret_for(&seed::bench_key(42)).expose(),
    );
    c.bench_function("authenticate: forged secret, cached key", |b| {
        b.to_async(&rt).iter(|| rejected(&cached, &forged_hot))
    });
    let forged_cold = presented(&forger, &ApiKey::generate());
    c.bench_function("authenticate: forged secret, unknown key", |b| {
        b.to_async(&rt).iter(|| rejected(&cached, &forged_cold))
    });

    // No cache: every call is a lookup among a million rows.
    let uncached = Authenticator::new(
        d.clone(),
        store.clone(),
        CacheSettings {
            ttl: Duration::ZERO,
            capacity: 0,
            last_used_interval: Duration::ZERO,
        },
        Metrics::new().unwrap(),
    );
    let many: Vec<(String, String)> = (0..10_000)
        .map(|i| presented(&d, &seed::bench_key(i * 97)))
        .collect();
    let mut i = 0;
    c.bench_function("authenticate: cache miss, SQLite with 1M rows", |b| {
        b.to_async(&rt).iter(|| {
            i = (i + 1) % many.len();
            let h = &many[i];
            let a = &uncached;
            accepted(a, h)
        })
    });
}

criterion_group!(benches, derivation, authentication);
criterion_main!(benches);
