//! Benchmark helper: bulk-registers credentials straight into an SQLite file, in one
//! transaction of multi-row INSERTs — the fast way to a database with a million rows.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::time::{Duration, Instant};

use credgate::credential::ApiKey;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{Connection, QueryBuilder, Sqlite};

/// The i-th benchmark key: `ak_bench` + 24 digits.
pub fn bench_key(i: u64) -> ApiKey {
    match ApiKey::parse(&format!("ak_bench{i:024}")) {
        Ok(key) => key,
        Err(e) => unreachable!("bench keys are well formed: {e}"),
    }
}

/// Creates (migrating) the database at `path` and registers keys `0..count`. Returns the
/// time spent inserting.
pub async fn seed_sqlite(path: &Path, count: u64) -> anyhow::Result<Duration> {
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
        let mut insert: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO api_credential (api_key) ");
        insert.push_values(next..end, |mut row, i| {
            row.push_bind(bench_key(i).into_string());
        });
        insert.build().execute(&mut *tx).await?;
        next = end;
    }
    tx.commit().await?;
    let elapsed = started.elapsed();
    conn.close().await?;
    Ok(elapsed)
}
