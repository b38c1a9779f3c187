//! Benchmark helper: bulk-registers credentials straight into an SQLite file, in one
//! transaction of multi-row INSERTs — the fast way to a database with a million rows.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::time::{Duration, Instant};

use credgate::credential::ApiKey;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{Connection, QueryBuilder, Sqlite};

/// The scopes of every seeded credential (space-separated, as stored).
pub const BENCH_SCOPES: &str = "orders:read orders:write";
/// The expiry of every seeded credential.
pub const BENCH_EXPIRY: &str = "2099-01-01T00:00:00.000Z";

/// The i-th benchmark key: `ak_bench` + 24 digits.
pub fn bench_key(i: u64) -> ApiKey {
    match ApiKey::parse(format!("ak_bench{i:024}")) {
        Ok(key) => key,
        Err(e) => unreachable!("bench keys are well formed: {e}"),
    }
}

/// Creates (migrating) the database at `path` and registers keys `0..count` (derived with the
/// master key `master_key_id`), each with the attributes a customer's key has: its own owner (`customer-<i>`, the worst case for the
/// cache's memory), two scopes and an expiry (far ahead, so every check runs and passes).
/// Returns the time spent inserting.
pub async fn seed_sqlite(path: &Path, count: u64, master_key_id: &str) -> anyhow::Result<Duration> {
    credgate::store::sqlite::SqliteStore::migrate(path).await?;
    let options = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal);
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await?;
    let started = Instant::now();
    let mut tx = conn.begin().await?;
    let mut next = 0;
    while next < count {
        let end = (next + 1000).min(count);
        let mut insert: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO api_credential (api_key, owner, scopes, expires_at, master_key_id) ",
        );
        insert.push_values(next..end, |mut row, i| {
            row.push_bind(bench_key(i).into_string())
                .push_bind(format!("customer-{i}"))
                .push_bind(BENCH_SCOPES)
                .push_bind(BENCH_EXPIRY)
                .push_bind(master_key_id.to_owned());
        });
        insert.build().execute(&mut *tx).await?;
        next = end;
    }
    tx.commit().await?;
    let elapsed = started.elapsed();
    conn.close().await?;
    Ok(elapsed)
}
