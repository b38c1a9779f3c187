//! The authentication cache (TTL, local and direct-SQL invalidation), database faults,
//! the schema's triggers, what the file holds, and the connection timeouts.

use std::time::Duration;

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::app::{Backend, spawn_app, spawn_app_with, spawn_config, test_config};
use crate::helpers::client::assert_error;
use crate::helpers::credentials::{MASTER_HEX, Pair, deriver, forged, mint};
use crate::helpers::wait::eventually;

const HITS: &str = "credgate_auth_cache_hits_total";
const MISSES: &str = "credgate_auth_cache_misses_total";
const LOOKUPS: &str = "credgate_db_query_duration_seconds_count{op=\"state\"}";

async fn cached_entries_expire_after_the_ttl(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.cache_ttl = Duration::from_secs(1)).await;
    let pair = app.registered().await;
    assert_eq!(app.verify(&pair).await, StatusCode::NO_CONTENT);
    assert_eq!(app.metric(MISSES).await, 1.0);
    assert_eq!(app.metric(LOOKUPS).await, 1.0);
    assert_eq!(app.verify(&pair).await, StatusCode::NO_CONTENT);
    assert_eq!(app.metric(HITS).await, 1.0);
    assert_eq!(
        app.metric(LOOKUPS).await,
        1.0,
        "a hit must not touch the database"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.verify(&pair).await, StatusCode::NO_CONTENT);
    assert_eq!(
        app.metric(MISSES).await,
        2.0,
        "expired entry must be looked up again"
    );
    assert_eq!(app.metric(LOOKUPS).await, 2.0);
}

async fn forged_secrets_never_reach_cache_or_database(backend: Backend) {
    let app = spawn_app(backend).await;
    let real = app.registered().await;
    let forged = Pair {
        key: real.key.clone(),
        secret: forged().secret,
    };
    for _ in 0..20 {
        assert_eq!(app.verify(&forged).await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(app.metric(LOOKUPS).await, 0.0);
    assert_eq!(app.metric(HITS).await + app.metric(MISSES).await, 0.0);
    assert_eq!(
        app.metric("credgate_auth_results_total{result=\"rejected_derivation\"}")
            .await,
        20.0
    );
}

async fn concurrent_misses_on_one_key_make_one_lookup(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = app.registered().await;
    let results = futures_util::future::join_all((0..32).map(|_| app.verify(&pair))).await;
    assert!(results.iter().all(|s| *s == StatusCode::NO_CONTENT));
    assert_eq!(app.metric(LOOKUPS).await, 1.0);
}

async fn revocation_through_the_api_takes_effect_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let target = app.registered().await;
    assert_eq!(app.verify(&target).await, StatusCode::NO_CONTENT);
    assert_eq!(app.verify(&target).await, StatusCode::NO_CONTENT);
    assert!(
        app.metric(HITS).await >= 1.0,
        "target must be served from the cache"
    );
    assert_eq!(
        app.revoke(&target.key, &admin).await.status(),
        StatusCode::OK
    );
    // No waiting: the very next request is refused.
    assert_eq!(app.verify(&target).await, StatusCode::UNAUTHORIZED);
}

async fn direct_sql_revocation_is_honoured_long_before_the_ttl(backend: Backend) {
    let app = spawn_app(backend).await; // TTL 300 s
    let admin = app.registered().await;
    let target = app.registered().await;
    assert_eq!(app.verify(&target).await, StatusCode::NO_CONTENT);
    assert_eq!(app.verify(&target).await, StatusCode::NO_CONTENT);
    assert!(app.metric(HITS).await >= 1.0);
    app.sql(&format!(
        "UPDATE api_credential SET active = false WHERE api_key = '{}'",
        target.key
    ))
    .await;
    let refused = eventually(Duration::from_secs(3), || async {
        app.verify(&target).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(refused, "direct-SQL revocation not honoured within 3 s");
    // The trigger recorded when; nobody is recorded as the revoker.
    let record = app.record(&target.key, &admin).await;
    assert_eq!(record["active"], false);
    assert!(record["revoked_at"].is_string());
    assert_eq!(record["revoked_by"], Value::Null);
    assert_eq!(app.verify(&admin).await, StatusCode::NO_CONTENT);
}

async fn database_error_during_auth_is_500_and_not_cached(backend: Backend) {
    let app = spawn_app(backend).await;
    let cached = app.registered().await;
    let uncached = app.registered().await;
    assert_eq!(app.verify(&cached).await, StatusCode::NO_CONTENT);

    app.sql("ALTER TABLE api_credential RENAME TO api_credential_away")
        .await;
    let resp = app.send(Method::GET, "/auth/verify", Some(&uncached)).await;
    assert_error(resp, StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR").await;
    let resp = app.send(Method::GET, "/ready", None).await;
    assert_error(resp, StatusCode::SERVICE_UNAVAILABLE, "NOT_READY").await;
    // Cached credentials keep working while the database is away.
    assert_eq!(app.verify(&cached).await, StatusCode::NO_CONTENT);
    assert_eq!(
        app.metric("credgate_auth_results_total{result=\"error\"}")
            .await,
        1.0
    );

    app.sql("ALTER TABLE api_credential_away RENAME TO api_credential")
        .await;
    // The failure was not remembered: the same pair now authenticates.
    assert_eq!(app.verify(&uncached).await, StatusCode::NO_CONTENT);
    assert_eq!(
        app.send(Method::GET, "/ready", None).await.status(),
        StatusCode::OK
    );
}

async fn the_database_refuses_reactivation_and_keeps_revoked_rows(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let target = app.registered().await;
    assert_eq!(
        app.revoke(&target.key, &admin).await.status(),
        StatusCode::OK
    );
    for statement in [
        format!(
            "UPDATE api_credential SET active = true WHERE api_key = '{}'",
            target.key
        ),
        format!(
            "DELETE FROM api_credential WHERE api_key = '{}'",
            target.key
        ),
        format!(
            "UPDATE api_credential SET api_key = 'ak_renamedrenamedrenamed' WHERE api_key = '{}'",
            admin.key
        ),
    ] {
        assert!(
            app.try_sql(&statement).await.is_err(),
            "{statement} must be refused"
        );
    }
    let record = app.record(&target.key, &admin).await;
    assert_eq!(record["active"], false);
    assert_eq!(record["revoked_by"], admin.key);
    assert_eq!(app.verify(&target).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify(&admin).await, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn sqlite_runs_in_wal_mode() {
    let app = spawn_app(Backend::Sqlite).await;
    app.registered().await;
    let url = format!("sqlite://{}", app.db_path().display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn no_secret_is_stored_anywhere_in_the_database_files() {
    let app = spawn_app(Backend::Sqlite).await;
    let mut pairs = Vec::new();
    for _ in 0..5 {
        pairs.push(app.registered().await);
    }
    assert_eq!(
        app.revoke(&pairs[0].key, &pairs[1]).await.status(),
        StatusCode::OK
    );
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(app.db_path().parent().unwrap()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("credgate.db")
        {
            bytes.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(!bytes.is_empty());
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    // The keys are there (the files are what we think)...
    assert!(contains(pairs[2].key.as_bytes()));
    for pair in &pairs {
        // ...but no secret: neither its text, nor its body, nor its raw bytes.
        assert!(!contains(pair.secret.as_bytes()));
        assert!(!contains(&pair.secret.as_bytes()[3..]));
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&pair.secret[3..])
            .unwrap();
        assert!(!contains(&raw));
    }
    assert!(!contains(MASTER_HEX.as_bytes()));
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let app = spawn_app_with(Backend::Sqlite, |c| {
        c.header_read_timeout = Duration::from_secs(1)
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection still open after 5 s with a 1 s header timeout"
    );
}

#[tokio::test]
async fn a_request_that_takes_too_long_gets_408() {
    let app = spawn_app_with(Backend::Sqlite, |c| {
        c.request_timeout = Duration::from_secs(1)
    })
    .await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            b"POST /credentials HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"api_key\"",
        )
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("no answer within 5 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("REQUEST_TIMEOUT"), "{text}");
}

#[tokio::test]
async fn shutdown_stops_accepting_but_finishes_in_flight_requests() {
    let app = spawn_app(Backend::Sqlite).await;
    let addr = app.addr;
    let pair = mint();
    let body = serde_json::json!({ "api_key": pair.key, "api_secret": pair.secret }).to_string();
    let (head, tail) = body.split_at(10);
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /credentials HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{head}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let db_path = app.db_path();
    let stopping = tokio::spawn(app.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopping.is_finished(), "stopped with a request in flight");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting connections while shutting down"
    );

    stream.write_all(tail.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("in-flight request not answered")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    let _dir = tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("shutdown did not complete")
        .unwrap();
    // The answered registration is in the file.
    let url = format!("sqlite://{}", db_path.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_credential WHERE api_key = ?")
        .bind(&pair.key)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

contract_tests!(
    cached_entries_expire_after_the_ttl,
    forged_secrets_never_reach_cache_or_database,
    concurrent_misses_on_one_key_make_one_lookup,
    revocation_through_the_api_takes_effect_at_once,
    direct_sql_revocation_is_honoured_long_before_the_ttl,
    database_error_during_auth_is_500_and_not_cached,
    the_database_refuses_reactivation_and_keeps_revoked_rows,
);

/// An expiry an operator writes with SQLite's own date functions (`YYYY-MM-DD HH:MM:SS`, not
/// RFC 3339) is read by the authentication path like one credgate wrote.
#[tokio::test]
async fn an_expiry_written_by_hand_in_sqlite_format_is_honoured() {
    let app = spawn_app(Backend::Sqlite).await;
    let past = app.registered().await;
    let future = app.registered().await;
    app.sql(&format!(
        "UPDATE api_credential SET expires_at = datetime('now', '-1 minute') WHERE api_key = '{}'",
        past.key
    ))
    .await;
    app.sql(&format!(
        "UPDATE api_credential SET expires_at = datetime('now', '+1 day') WHERE api_key = '{}'",
        future.key
    ))
    .await;
    assert_eq!(app.verify(&past).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.metric("credgate_auth_results_total{result=\"rejected_expired\"}")
            .await,
        1.0
    );
    assert_eq!(app.verify(&future).await, StatusCode::NO_CONTENT);
    // Text that is no time is a database fault (500), never a pass or a silent 401.
    app.sql(&format!(
        "UPDATE api_credential SET expires_at = 'tomorrow' WHERE api_key = '{}'",
        past.key
    ))
    .await;
    let resp = app.send(Method::GET, "/auth/verify", Some(&past)).await;
    assert_error(resp, StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR").await;
}

// ---- Group commit (SQLite) -------------------------------------------------------------

fn pair_for(key: &str) -> Pair {
    let key = credgate::credential::ApiKey::parse(key).unwrap();
    Pair {
        secret: deriver().secret_for(&key).expose(),
        key: key.into_string(),
    }
}

#[tokio::test]
async fn group_commit_batches_writes_and_answers_each_on_its_own() {
    let app = spawn_app(Backend::Sqlite).await;
    // 100 keys, each registered twice at the same time: duplicates land in the same batches.
    let pairs: Vec<Pair> = (0..100).map(|_| mint()).collect();
    let requests = pairs.iter().chain(pairs.iter()).map(|p| app.register(p));
    let statuses: Vec<StatusCode> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| r.status())
        .collect();
    let (first, second) = statuses.split_at(100);
    for (a, b) in first.iter().zip(second) {
        let mut pair = [*a, *b];
        pair.sort();
        assert_eq!(
            pair,
            [StatusCode::CREATED, StatusCode::CONFLICT],
            "{statuses:?}"
        );
    }
    let batches = app
        .metric("credgate_db_query_duration_seconds_count{op=\"write_batch\"}")
        .await;
    assert!(
        batches < 200.0,
        "200 concurrent writes took {batches} transactions: no batching"
    );
    for pair in &pairs {
        assert_eq!(app.verify(pair).await, StatusCode::NO_CONTENT);
    }
}

#[tokio::test]
async fn a_failing_write_fails_alone_not_its_batch() {
    let app = spawn_app(Backend::Sqlite).await;
    // An operator's trigger that refuses some keys makes those inserts fail.
    app.sql(
        "CREATE TRIGGER refuse_some BEFORE INSERT ON api_credential \
         WHEN NEW.api_key LIKE 'ak_FAIL%' BEGIN SELECT RAISE(ABORT, 'refused'); END",
    )
    .await;
    let good: Vec<Pair> = (0..40).map(|_| mint()).collect();
    let bad: Vec<Pair> = (0..10)
        .map(|i| pair_for(&format!("ak_FAIL{i:02}{}", &mint().key[3..20])))
        .collect();
    let requests = good.iter().chain(bad.iter()).map(|p| app.register(p));
    let statuses: Vec<StatusCode> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(|r| r.status())
        .collect();
    let (good_status, bad_status) = statuses.split_at(40);
    assert!(
        good_status.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    assert!(
        bad_status
            .iter()
            .all(|s| *s == StatusCode::INTERNAL_SERVER_ERROR),
        "{statuses:?}"
    );
    for pair in &good {
        assert_eq!(app.verify(pair).await, StatusCode::NO_CONTENT);
    }
    for pair in &bad {
        assert_eq!(app.verify(pair).await, StatusCode::UNAUTHORIZED);
    }
    // Revocations share the writer and the same isolation.
    let admin = &good[0];
    let revokes = good[1..11].iter().map(|p| app.revoke(&p.key, admin));
    let statuses: Vec<StatusCode> = futures_util::future::join_all(revokes)
        .await
        .into_iter()
        .map(|r| r.status())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn the_sqlite_change_log_forgets_changes_older_than_a_day() {
    let app = spawn_app(Backend::Sqlite).await;
    let pair = app.registered().await;
    let db = app.db_path();
    let dir = app.stop().await;
    // One change from long ago, one from now (a revocation by SQL while nothing runs).
    let url = format!("sqlite://{}", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO api_credential_change (api_key, changed_at) \
         VALUES ('ak_oldoldoldoldoldold', '2000-01-01T00:00:00.000Z'); \
         UPDATE api_credential SET active = false WHERE api_key = '{}'",
        pair.key
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let count = "SELECT COUNT(*) FROM api_credential_change";
    let before: i64 = sqlx::query_scalar(count)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(before, 2);

    let config = test_config(dir.path());
    let app = spawn_config(config, dir).await;
    let pruned = eventually(Duration::from_secs(3), || async {
        app.sql_text("SELECT CAST(COUNT(*) AS TEXT) FROM api_credential_change")
            .await
            .as_deref()
            == Some("1")
    });
    assert!(pruned.await, "the old change was not pruned");
    let left: String = sqlx::query_scalar("SELECT api_key FROM api_credential_change")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, pair.key);
    assert_eq!(app.verify(&pair).await, StatusCode::UNAUTHORIZED);
}

// ---- Transient failures (PostgreSQL) ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_serialization_failures_are_run_again_not_answered_500() {
    let app = spawn_app(Backend::Postgres).await;
    // Every other write attempt is aborted with serialization_failure (a sequence is not
    // rolled back with the aborted transaction, so the retry sees the next number).
    app.sql(
        "CREATE SEQUENCE flaky; \
         CREATE FUNCTION flaky() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF nextval('flaky') % 2 = 1 THEN \
           RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001'; \
         END IF; RETURN NEW; END $$; \
         CREATE TRIGGER flaky BEFORE INSERT OR UPDATE ON api_credential \
         FOR EACH ROW EXECUTE FUNCTION flaky()",
    )
    .await;
    let pair = mint();
    assert_eq!(app.register(&pair).await.status(), StatusCode::CREATED);
    let other = mint();
    assert_eq!(app.register(&other).await.status(), StatusCode::CREATED);
    assert_eq!(app.revoke(&other.key, &pair).await.status(), StatusCode::OK);
    assert_eq!(app.verify(&other).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify(&pair).await, StatusCode::NO_CONTENT);
}
