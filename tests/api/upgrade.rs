//! An existing database, made by the previous release's migrations, is upgraded in place
//! (SPEC §7.1): every credential keeps working, with every scope and an empty meta.

use std::path::Path;

use credgate::store::DatabaseTarget;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::Connection;

use crate::helpers::app::{Backend, spawn_app_with};
use crate::helpers::credentials::{Pair, deriver, mint};
use crate::helpers::pg;
use crate::helpers::wait::eventually;

contract_tests!(a_database_of_the_previous_schema_is_upgraded_in_place);

/// The migrations the previous release shipped, per backend.
fn previous_migrations(backend: Backend) -> (&'static str, &'static [&'static str]) {
    match backend {
        Backend::Sqlite => (
            "migrations/sqlite",
            &["0001_api_credential.sql", "0002_write_probe.sql"],
        ),
        Backend::Postgres => ("migrations/postgres", &["0001_api_credential.sql"]),
    }
}

/// Copies the previous release's migrations into `dir`, for a migrator that knows only them.
fn previous_schema(backend: Backend, dir: &Path) {
    let (from, files) = previous_migrations(backend);
    for file in files {
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join(from).join(file);
        std::fs::copy(&from, dir.join(file)).expect("copy migration");
    }
}

async fn a_database_of_the_previous_schema_is_upgraded_in_place(backend: Backend) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let migrations = scratch.path().join("migrations");
    std::fs::create_dir(&migrations).expect("mkdir");
    previous_schema(backend, &migrations);
    let migrator = sqlx::migrate::Migrator::new(migrations.as_path())
        .await
        .expect("previous migrations");
    let (active, revoked) = (mint(), mint());
    let rows = [
        format!(
            "INSERT INTO api_credential (api_key) VALUES ('{}'), ('{}')",
            active.key, revoked.key
        ),
        format!(
            "UPDATE api_credential SET active = {} WHERE api_key = '{}'",
            match backend {
                Backend::Sqlite => "0",
                Backend::Postgres => "false",
            },
            revoked.key
        ),
    ];
    let target = match backend {
        Backend::Sqlite => {
            let path = scratch.path().join("old.db");
            let url = format!("sqlite://{}?mode=rwc", path.display());
            let mut conn = sqlx::SqliteConnection::connect(&url)
                .await
                .expect("connect");
            migrator.run(&mut conn).await.expect("previous schema");
            for row in &rows {
                sqlx::raw_sql(sqlx::AssertSqlSafe(row.clone()))
                    .execute(&mut conn)
                    .await
                    .expect("insert");
            }
            conn.close().await.expect("close");
            DatabaseTarget::Sqlite(path)
        }
        Backend::Postgres => {
            let url = pg::server().fresh_database().await;
            let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
            migrator.run(&mut conn).await.expect("previous schema");
            for row in &rows {
                sqlx::raw_sql(sqlx::AssertSqlSafe(row.clone()))
                    .execute(&mut conn)
                    .await
                    .expect("insert");
            }
            conn.close().await.expect("close");
            DatabaseTarget::Postgres(url)
        }
    };
    let app = spawn_app_with(backend, |config| {
        config.database = Some(target);
        // What authentication learns is written once per interval.
        config.last_used_interval = std::time::Duration::from_secs(1);
    })
    .await;

    // The active credential works, as an administrator (every scope).
    let resp = app.send(Method::GET, "/auth/verify", Some(&active)).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        resp.headers()
            .get("x-credential-scopes")
            .and_then(|v| v.to_str().ok()),
        Some("*")
    );
    let record = app.record(&active.key, &active).await;
    for (field, value) in [
        ("scopes", json!(["*"])),
        ("meta", json!({})),
        ("name", Value::Null),
        ("owner", Value::Null),
        ("expires_at", Value::Null),
        ("last_used_at", Value::Null),
        ("state", json!("active")),
        ("active", json!(true)),
    ] {
        assert_eq!(record[field], value, "{field} in {record}");
    }
    // Which master key derived it was unknown; its first authentication told.
    let learnt = eventually(std::time::Duration::from_secs(4), || async {
        app.record(&active.key, &active).await["master_key_id"] == deriver().key_id()
    })
    .await;
    assert!(
        learnt,
        "the master key id was not recorded at authentication"
    );
    // The revoked one stays revoked, with its revocation time.
    assert_eq!(app.verify(&revoked).await, StatusCode::UNAUTHORIZED);
    let record = app.record(&revoked.key, &active).await;
    assert_eq!(record["state"], "revoked");
    assert!(record["revoked_at"].is_string());
    assert_eq!(record["scopes"], json!(["*"]));
    let resp = app.register(&revoked).await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    // New credentials and the old one live side by side; the old triggers still hold.
    let new: Pair = app.registered().await;
    assert_eq!(app.verify(&new).await, StatusCode::NO_CONTENT);
    let reactivate = app
        .try_sql(&format!(
            "UPDATE api_credential SET active = {} WHERE api_key = '{}'",
            match backend {
                Backend::Sqlite => "1",
                Backend::Postgres => "true",
            },
            revoked.key
        ))
        .await;
    assert!(reactivate.is_err(), "a revoked credential was reactivated");
    // A revocation by SQL of an upgraded credential still reaches the cache.
    app.sql(&format!(
        "UPDATE api_credential SET active = {} WHERE api_key = '{}'",
        match backend {
            Backend::Sqlite => "0",
            Backend::Postgres => "false",
        },
        active.key
    ))
    .await;
    let dropped = eventually(std::time::Duration::from_secs(1), || async {
        app.verify(&active).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(
        dropped,
        "a revocation by SQL did not reach the cache within 1 s"
    );
    // The audit log starts at the upgrade: the old credential's revocation is its first event.
    let events = app.events(&format!("api_key={}", active.key), &new).await;
    let kinds: Vec<(&Value, &Value)> = events.iter().map(|e| (&e["event"], &e["source"])).collect();
    assert_eq!(kinds, [(&json!("revoked"), &json!("sql"))]);
    assert_eq!(
        app.events(&format!("api_key={}", new.key), &new)
            .await
            .len(),
        1
    );
}

/// The rebuild of the SQLite audit log (migration 0005) keeps every event and its id, and
/// the AUTOINCREMENT counter: an id freed by a prune is never given again. The rebuilt table
/// still refuses what the old one refused, and SQL changes are still recorded in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_audit_log_is_rebuilt_with_its_ids_and_counter() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let migrations = scratch.path().join("migrations");
    std::fs::create_dir(&migrations).expect("mkdir");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for file in [
        "0001_api_credential.sql",
        "0002_write_probe.sql",
        "0003_attributes.sql",
        "0004_audit.sql",
    ] {
        std::fs::copy(dir.join(file), migrations.join(file)).expect("copy migration");
    }
    let migrator = sqlx::migrate::Migrator::new(migrations.as_path())
        .await
        .expect("previous migrations");
    let (kept, pruned) = (mint(), mint());
    let path = scratch.path().join("v4.db");
    let mut conn =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .expect("connect");
    migrator.run(&mut conn).await.expect("schema v4");
    for statement in [
        format!(
            "INSERT INTO api_credential (api_key) VALUES ('{}')",
            kept.key
        ),
        format!(
            "INSERT INTO api_credential (api_key) VALUES ('{}')",
            pruned.key
        ),
        // The newest event pruned: the counter (2) is now past the largest id kept (1).
        "DELETE FROM api_credential_event WHERE id = 2".to_owned(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut conn)
            .await
            .expect("v4 rows");
    }
    conn.close().await.expect("close");

    let app = spawn_app_with(Backend::Sqlite, |config| {
        config.database = Some(DatabaseTarget::Sqlite(path.clone()));
    })
    .await;
    // The event kept, with its id, still found from its credential.
    let events = app.events(&format!("api_key={}", kept.key), &kept).await;
    let ids: Vec<(&Value, &Value)> = events.iter().map(|e| (&e["id"], &e["event"])).collect();
    assert_eq!(ids, [(&json!(1), &json!("registered"))]);
    // New events continue after the counter, through the service and through SQL.
    let new = app.registered().await;
    let fresh = mint();
    app.sql(&format!(
        "INSERT INTO api_credential (api_key) VALUES ('{}')",
        fresh.key
    ))
    .await;
    for (key, id, source) in [(&new.key, 3, "api"), (&fresh.key, 4, "sql")] {
        let events = app.events(&format!("api_key={key}"), &kept).await;
        assert_eq!(events.len(), 1, "{key}: {events:?}");
        assert_eq!(events[0]["id"], id, "{key}");
        assert_eq!(events[0]["event"], "registered");
        assert_eq!(events[0]["source"], source);
    }
    // What the old table refused, the new one refuses.
    for (event, source) in [("registred", "sql"), ("registered", "web")] {
        let refused = app
            .try_sql(&format!(
                "INSERT INTO api_credential_event (api_key, event, source) \
                 VALUES ('{}', '{event}', '{source}')",
                kept.key
            ))
            .await;
        assert!(refused.is_err(), "{event} from {source} was accepted");
    }
    let changed = app
        .try_sql("UPDATE api_credential_event SET actor = 'x' WHERE id = 1")
        .await;
    assert!(changed.is_err(), "an event was changed");
}
