//! Shared test helpers: `spawn_app()` runs the same `Application` that `main` runs, on a
//! random port with a fresh SQLite file and master key; `ServerProcess` runs the real binary.
//! Set `TEST_LOG=1` to see the service's logs.
#![allow(dead_code, unreachable_pub)]

pub mod pg;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credgate::credential::{ApiKey, MasterKey, SecretDeriver};
use credgate::store::DatabaseTarget;
use credgate::{Application, Config};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use sqlx::Connection;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The master key of every test deployment (the SPEC §1 test vector key).
pub const MASTER_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A key/secret pair as a client holds it.
#[derive(Debug, Clone)]
pub struct Pair {
    pub key: String,
    pub secret: String,
}

pub fn deriver() -> SecretDeriver {
    SecretDeriver::new(&MasterKey::from_hex(MASTER_HEX).expect("test key"))
}

/// Mints a valid pair for the test master key.
pub fn mint() -> Pair {
    let key = ApiKey::generate();
    let secret = deriver().secret_for(&key).expose();
    Pair {
        key: key.into_string(),
        secret,
    }
}

/// A valid key with a secret derived from another master key.
pub fn forged() -> Pair {
    let key = ApiKey::generate();
    let other = SecretDeriver::new(&MasterKey::from_bytes([42; 32]));
    let secret = other.secret_for(&key).expose();
    Pair {
        key: key.into_string(),
        secret,
    }
}

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

/// Generates one `#[tokio::test]` per backend for each named `async fn(Backend)`, in modules
/// `sqlite` and `postgres`: the contract is written once and run against every store.
#[macro_export]
macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// The database behind a test app.
#[derive(Debug, Clone)]
pub enum TestDb {
    Sqlite(PathBuf),
    Postgres(String),
}

/// A running in-process application.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub dir: TempDir,
    pub db: TestDb,
    /// A connection holding a lock, while `break_database` is in force (PostgreSQL).
    blocker: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
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
pub async fn fresh_database(backend: Backend) -> Option<DatabaseTarget> {
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
        addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        dir,
        db,
        blocker: tokio::sync::Mutex::new(None),
        shutdown: Some(tx),
        task: Some(task),
    };
    // On PostgreSQL the instance is ready once its invalidation listener is up.
    let ready = eventually(Duration::from_secs(10), || async {
        app.send(Method::GET, "/ready", None).await.status() == StatusCode::OK
    })
    .await;
    assert!(ready, "application did not become ready");
    app
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request, authenticated with `auth` when given.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        auth: Option<&Pair>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, self.url(path));
        if let Some(p) = auth {
            req = req
                .header("X-Api-Key", &p.key)
                .header("X-Api-Secret", &p.secret);
        }
        req
    }

    pub async fn send(&self, method: Method, path: &str, auth: Option<&Pair>) -> reqwest::Response {
        self.request(method, path, auth).send().await.expect("send")
    }

    /// POST /credentials with a JSON body.
    pub async fn register_json(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url("/credentials"))
            .json(body)
            .send()
            .await
            .expect("send")
    }

    pub async fn register(&self, pair: &Pair) -> reqwest::Response {
        self.register_json(&serde_json::json!({ "api_key": pair.key, "api_secret": pair.secret }))
            .await
    }

    /// Mints and registers a pair, asserting 201.
    pub async fn registered(&self) -> Pair {
        let pair = mint();
        let resp = self.register(&pair).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        pair
    }

    pub async fn revoke(&self, target: &str, by: &Pair) -> reqwest::Response {
        self.send(Method::DELETE, &format!("/credentials/{target}"), Some(by))
            .await
    }

    /// GET /credentials/{key} as `by`, parsed.
    pub async fn record(&self, key: &str, by: &Pair) -> Value {
        self.send(Method::GET, &format!("/credentials/{key}"), Some(by))
            .await
            .json()
            .await
            .expect("record json")
    }

    /// Status of GET /auth/verify with `pair`.
    pub async fn verify(&self, pair: &Pair) -> StatusCode {
        self.send(Method::GET, "/auth/verify", Some(pair))
            .await
            .status()
    }

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

    /// Makes the credential table unusable for the application's queries until
    /// `heal_database`: renamed away on SQLite; locked by an open transaction on PostgreSQL
    /// (queries then fail on the statement timeout, so use a short `store.timeout`).
    pub async fn break_database(&self) {
        match &self.db {
            TestDb::Sqlite(_) => {
                self.sql("ALTER TABLE api_credential RENAME TO api_credential_away")
                    .await
            }
            TestDb::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
                sqlx::raw_sql("BEGIN; LOCK TABLE api_credential IN ACCESS EXCLUSIVE MODE")
                    .execute(&mut conn)
                    .await
                    .expect("lock");
                *self.blocker.lock().await = Some(conn);
            }
        }
    }

    pub async fn heal_database(&self) {
        match &self.db {
            TestDb::Sqlite(_) => {
                self.sql("ALTER TABLE api_credential_away RENAME TO api_credential")
                    .await
            }
            TestDb::Postgres(_) => {
                if let Some(mut conn) = self.blocker.lock().await.take() {
                    sqlx::raw_sql("ROLLBACK")
                        .execute(&mut conn)
                        .await
                        .expect("unlock");
                    conn.close().await.expect("close");
                }
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

    /// The value of one metric line (exact series text before the value).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .send(Method::GET, "/metrics", None)
            .await
            .text()
            .await
            .expect("body");
        metric_value(&text, series)
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

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().expect("metric value"))
        .unwrap_or_else(|| panic!("series {series} not in metrics:\n{text}"))
}

pub async fn sql_on(db: &Path, statement: &str) {
    let url = format!("sqlite://{}", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("connect");
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned()))
        .execute(&mut conn)
        .await
        .expect("sql");
    conn.close().await.expect("close");
}

/// Asserts an error response: status, JSON content type, and the `{"error":{code,message}}`
/// shape with the given code. Returns the body.
pub async fn assert_error(resp: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(resp.status(), status, "status");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let body: Value = resp.json().await.expect("json body");
    assert_eq!(body["error"]["code"], code, "body {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "message in {body}"
    );
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only `error` in {body}"
    );
    body
}

/// Polls `check` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real `credgate` binary running `serve`, its stderr collected.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub base: String,
    pub logs: Arc<Mutex<String>>,
}

pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_credgate"))
}

impl ServerProcess {
    /// Starts `credgate serve --listen 127.0.0.1:0 <args>` and waits until it listens.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(args, |_| {})
    }

    /// Like `start`, with a last say on the command (environment, resource limits).
    pub fn start_with(args: &[&str], customize: impl FnOnce(&mut Command)) -> Self {
        let mut command = binary();
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("CREDGATE_MASTER_KEY_FILE")
            .env_remove("DATABASE_URL")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        customize(&mut command);
        let mut child = command.spawn().expect("spawn credgate");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("listening on ").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let addr: String = addr
                        .chars()
                        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
                        .collect();
                    let _ = tx.send(addr);
                }
                let mut logs = sink.lock().expect("logs");
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let addr: SocketAddr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start: {}", logs.lock().expect("logs"));
            }
        };
        Self {
            child,
            base: format!("http://{addr}"),
            addr,
            logs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("logs").clone()
    }

    /// POST /credentials with `pair`; the status.
    pub async fn register(&self, client: &reqwest::Client, pair: &Pair) -> StatusCode {
        client
            .post(self.url("/credentials"))
            .json(&serde_json::json!({ "api_key": pair.key, "api_secret": pair.secret }))
            .send()
            .await
            .expect("send")
            .status()
    }

    /// GET /auth/verify with `pair`; the status.
    pub async fn verify(&self, client: &reqwest::Client, pair: &Pair) -> StatusCode {
        client
            .get(self.url("/auth/verify"))
            .header("X-Api-Key", &pair.key)
            .header("X-Api-Secret", &pair.secret)
            .send()
            .await
            .expect("send")
            .status()
    }

    /// DELETE /credentials/{key} as `by`; the status.
    pub async fn revoke(&self, client: &reqwest::Client, key: &str, by: &Pair) -> StatusCode {
        client
            .delete(self.url(&format!("/credentials/{key}")))
            .header("X-Api-Key", &by.key)
            .header("X-Api-Secret", &by.secret)
            .send()
            .await
            .expect("send")
            .status()
    }

    /// GET /ready; the status.
    pub async fn ready(&self, client: &reqwest::Client) -> StatusCode {
        client
            .get(self.url("/ready"))
            .send()
            .await
            .expect("send")
            .status()
    }

    /// Sends a signal and waits (bounded) for the process to exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Makes `command`'s process start with at most `limit` open file descriptors (soft and
/// hard `RLIMIT_NOFILE`), as `ulimit -n` would.
pub fn limit_open_files(command: &mut Command, limit: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits; the
    // closure allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let rlim = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A bare HTTP/1.1 keep-alive connection, for tests that need to control exactly what is on
/// the wire and when (reqwest pools and retries behind our back).
pub struct RawConnection {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
}

/// What became of a request sent on a [`RawConnection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawOutcome {
    /// A response: its status and body.
    Answered(u16, String),
    /// The server closed the connection (or reset it) without answering.
    Closed,
}

impl RawConnection {
    /// Connects (the kernel completes the handshake even while the server is not accepting).
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        Self {
            stream: tokio::io::BufReader::new(stream),
        }
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.get_mut().write_all(bytes).await
    }

    /// Sends `GET path` (keep-alive).
    pub async fn get(&mut self, path: &str) -> std::io::Result<()> {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: credgate\r\n\r\n").as_bytes())
            .await
    }

    /// Reads one response (its body by `Content-Length`), or notes that the server closed.
    pub async fn response(&mut self) -> RawOutcome {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let mut status_line = String::new();
        match self.stream.read_line(&mut status_line).await {
            Ok(0) | Err(_) => return RawOutcome::Closed,
            Ok(_) => {}
        }
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"));
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            match self.stream.read_line(&mut line).await {
                Ok(0) | Err(_) => return RawOutcome::Closed,
                Ok(_) => {}
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("content-length");
            }
        }
        let mut body = vec![0u8; length];
        if self.stream.read_exact(&mut body).await.is_err() {
            return RawOutcome::Closed;
        }
        RawOutcome::Answered(status, String::from_utf8_lossy(&body).into_owned())
    }

    /// `response` bounded by `within`; `None` when nothing came in time.
    pub async fn response_within(&mut self, within: Duration) -> Option<RawOutcome> {
        tokio::time::timeout(within, self.response()).await.ok()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
