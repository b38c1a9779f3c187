//! `spawn_app()` runs the same `Application` that `main` runs, in this process, on a random
//! port with a fresh database (an SQLite file, or a database on this test binary's PostgreSQL
//! server) and the test master key. Set `TEST_LOG=1` to see the service's logs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use credgate::store::DatabaseTarget;
use credgate::{Application, Config};
use reqwest::StatusCode;
use sqlx::Connection;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::client::Client;
use super::credentials::MASTER_HEX;
use super::pg;
use super::wait::eventually;

fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = credgate::telemetry::init_logging(
            credgate::telemetry::LogFormat::Text,
            "debug,sqlx=info,hyper=info",
        );
    }
}

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The database behind a test app.
#[derive(Debug, Clone)]
pub enum TestDb {
    Sqlite(PathBuf),
    Postgres(String),
}

/// A running in-process application; it dereferences to a [`Client`] of itself.
pub struct TestApp {
    client: Client,
    /// The master key and data directory, deleted with the app.
    dir: TempDir,
    pub db: TestDb,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl std::ops::Deref for TestApp {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Writes the test master key into `dir` and returns a default config for it.
pub fn test_config(dir: &Path) -> Config {
    let key_file = dir.join("master.hex");
    std::fs::write(&key_file, format!("{MASTER_HEX}\n")).expect("write key");
    let mut config = Config::new(dir.join("data"));
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.master_key_file = Some(key_file);
    config
}

/// A fresh database URL for `backend`, or `None` for the default SQLite file.
async fn fresh_database(backend: Backend) -> Option<DatabaseTarget> {
    match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(DatabaseTarget::Postgres(
            pg::server().fresh_database().await,
        )),
    }
}

pub async fn spawn_app_with(backend: Backend, customize: impl FnOnce(&mut Config)) -> TestApp {
    init_test_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path());
    config.database = fresh_database(backend).await;
    customize(&mut config);
    spawn_config(config, dir).await
}

/// Starts an application from a config whose files live in `dir`; waits until it is ready.
pub async fn spawn_config(config: Config, dir: TempDir) -> TestApp {
    let db = match config.database_target() {
        DatabaseTarget::Sqlite(path) => TestDb::Sqlite(path),
        DatabaseTarget::Postgres(url) => TestDb::Postgres(url),
    };
    let app = Application::build(config).await.expect("build app");
    let addr = app.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    let app = TestApp {
        client: Client::new(addr),
        dir,
        db,
        shutdown: Some(tx),
        task: Some(task),
    };
    // On PostgreSQL the instance is ready once its invalidation listener is up.
    let ready = eventually(Duration::from_secs(10), || async {
        app.ready().await == StatusCode::OK
    })
    .await;
    assert!(ready, "application did not become ready");
    app
}

impl TestApp {
    /// Runs SQL on the database through a connection of its own, as an operator would.
    pub async fn sql(&self, statement: &str) {
        self.try_sql(statement).await.expect("sql");
    }

    /// Like `sql`, returning the database's refusal instead of panicking.
    pub async fn try_sql(&self, statement: &str) -> Result<(), sqlx::Error> {
        let statement = sqlx::AssertSqlSafe(statement.to_owned());
        match &self.db {
            TestDb::Sqlite(path) => {
                let url = format!("sqlite://{}", path.display());
                let mut conn = sqlx::SqliteConnection::connect(&url).await?;
                let result = sqlx::raw_sql(statement)
                    .execute(&mut conn)
                    .await
                    .map(|_| ());
                conn.close().await?;
                result
            }
            TestDb::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await?;
                let result = sqlx::raw_sql(statement)
                    .execute(&mut conn)
                    .await
                    .map(|_| ());
                conn.close().await?;
                result
            }
        }
    }

    /// One text value from the database (`SELECT` returning one row and column).
    pub async fn sql_text(&self, query: &str) -> Option<String> {
        let query = sqlx::AssertSqlSafe(query.to_owned());
        match &self.db {
            TestDb::Sqlite(path) => {
                let url = format!("sqlite://{}", path.display());
                let mut conn = sqlx::SqliteConnection::connect(&url)
                    .await
                    .expect("connect");
                sqlx::query_scalar(query)
                    .fetch_one(&mut conn)
                    .await
                    .expect("query")
            }
            TestDb::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
                sqlx::query_scalar(query)
                    .fetch_one(&mut conn)
                    .await
                    .expect("query")
            }
        }
    }

    /// The SQLite file (panics on PostgreSQL).
    pub fn db_path(&self) -> PathBuf {
        match &self.db {
            TestDb::Sqlite(path) => path.clone(),
            TestDb::Postgres(_) => panic!("not an SQLite app"),
        }
    }

    /// Stops the server gracefully, waits for it, and hands back its directory (database
    /// and key) so a test can inspect or reuse it.
    pub async fn stop(mut self) -> TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("join").expect("run");
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
