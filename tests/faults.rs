//! What a faulty world does to the service, with real faults: a full disk, database files
//! that turn unwritable or disappear under a running server, an unwritable database at
//! start-up, a PostgreSQL server that restarts mid-burst. Every test keeps a ledger of each
//! write answered 2xx and checks that each is still true after a restart.
//!
//! The SQLite faults need root (tmpfs mounts, `chattr`); without it they are skipped with a
//! message saying so. The PostgreSQL test stops this test binary's own server, so no other
//! PostgreSQL test belongs in this file.

// A test crate has no public API: its helpers are `pub` only to be shared between modules.
#![allow(unreachable_pub)]

/// The shared helpers this binary uses. It calls only part of `app`, `client`, `credentials`
/// and `server_process`, hence the allowances; the `api` binary includes every helper module
/// without them, so a helper that no test uses is still reported there.
#[path = "helpers"]
mod helpers {
    #[allow(dead_code)]
    pub mod app;
    #[allow(dead_code)]
    pub mod client;
    #[allow(dead_code)]
    pub mod credentials;
    pub mod pg;
    #[allow(dead_code)]
    pub mod server_process;
    pub mod wait;
}

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use sqlx::Connection;

use helpers::app::{Backend, TestDb, spawn_app_with};
use helpers::credentials::{MASTER_HEX, Pair, mint};
use helpers::pg;
use helpers::server_process::{ServerProcess, binary};
use helpers::wait::eventually;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a system command, true when it succeeded.
fn sh(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes files immutable (even for root) until dropped.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: &[PathBuf]) -> Option<Self> {
        for path in paths {
            if !sh("chattr", &["+i", path.to_str()?]) {
                return None;
            }
        }
        Some(Self(paths.to_vec()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in &self.0 {
            if let Some(p) = path.to_str() {
                sh("chattr", &["-i", p]);
            }
        }
    }
}

/// A small tmpfs, unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).ok()?;
        let opts = format!("size={size}");
        sh(
            "mount",
            &["-t", "tmpfs", "-o", &opts, "tmpfs", at.to_str()?],
        )
        .then(|| Self(at.into()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let Some(p) = self.0.to_str() {
            sh("umount", &["-l", p]);
        }
    }
}

/// Every write the service acknowledged.
#[derive(Default)]
struct Ledger {
    registered: Vec<Pair>,
    /// Revoked, or rolled with no grace: refused from then on.
    revoked: Vec<Pair>,
    /// Acknowledged renames: each key renamed once, to this name.
    renamed: Vec<(Pair, String)>,
    /// The next registered pair (after the first, the caller) not yet renamed, rolled or
    /// revoked: each change has a target of its own.
    next_target: usize,
}

impl Ledger {
    /// Revokes the `target`-th acknowledged registration as the first one; asserts 200 and
    /// records it. Returns the revoked pair.
    async fn revoke(&mut self, server: &ServerProcess, target: usize) -> Pair {
        let (admin, target) = (self.registered[0].clone(), self.registered[target].clone());
        assert_eq!(
            server.revoke(&target.key, &admin).await.status(),
            StatusCode::OK
        );
        self.revoked.push(target.clone());
        target
    }

    /// The next pair no change has touched yet.
    fn fresh_target(&mut self) -> Option<Pair> {
        let used = |p: &Pair, ledger: &Self| {
            ledger.revoked.iter().any(|r| r.key == p.key)
                || ledger.renamed.iter().any(|(r, _)| r.key == p.key)
        };
        self.next_target = self.next_target.max(1);
        while let Some(pair) = self.registered.get(self.next_target).cloned() {
            self.next_target += 1;
            if !used(&pair, self) {
                return Some(pair);
            }
        }
        None
    }

    /// Renames a fresh pair as the first one; records it when the answer is 200.
    async fn rename(&mut self, server: &ServerProcess) -> Option<StatusCode> {
        let target = self.fresh_target()?;
        let name = format!("renamed {}", self.renamed.len());
        let resp = server
            .update(
                &target.key,
                &serde_json::json!({ "name": name }),
                &self.registered[0],
            )
            .await;
        let status = resp.status();
        if status.is_success() {
            assert_eq!(status, StatusCode::OK);
            self.renamed.push((target, name));
        }
        Some(status)
    }

    /// Rolls a fresh pair with no grace, as the first one. On 201 the new pair is registered
    /// and the old one refused; on any failure the old one must still work as it did (a
    /// failed roll writes nothing), which `check` verifies since it stays registered.
    async fn roll(&mut self, server: &ServerProcess) -> Option<StatusCode> {
        let target = self.fresh_target()?;
        let resp = server
            .request(
                reqwest::Method::POST,
                &format!("/credentials/{}/roll", target.key),
                Some(&self.registered[0]),
            )
            .json(&serde_json::json!({ "grace_seconds": 0 }))
            .send()
            .await
            .expect("send");
        let status = resp.status();
        if status.is_success() {
            assert_eq!(status, StatusCode::CREATED);
            let body: serde_json::Value = resp.json().await.expect("json");
            self.registered.push(Pair {
                key: body["api_key"].as_str().expect("api_key").to_owned(),
                secret: body["api_secret"].as_str().expect("api_secret").to_owned(),
            });
            self.revoked.push(target);
        }
        Some(status)
    }

    /// Kills the server (no graceful anything), starts it again on the same files and checks
    /// every acknowledged write against it.
    async fn check_after_kill(&self, mut server: ServerProcess, data: &Path, key: &Path) {
        assert!(!server.signal_and_wait(libc::SIGKILL).success());
        let server = serve(data, key);
        self.check(&server).await;
    }

    /// Registers a fresh pair; records it when the answer is 201.
    async fn register(&mut self, server: &ServerProcess) -> StatusCode {
        let pair = mint();
        let status = server.register(&pair).await.status();
        if status.is_success() {
            assert_eq!(status, StatusCode::CREATED);
            self.registered.push(pair);
        }
        status
    }

    /// Checks every acknowledged write against a (restarted) server: registered keys exist
    /// (409 on a second registration) and work unless revoked; revoked keys are refused.
    async fn check(&self, server: &ServerProcess) {
        for pair in &self.registered {
            assert_eq!(
                server.register(pair).await.status(),
                StatusCode::CONFLICT,
                "an acknowledged registration was lost: {}",
                pair.key
            );
            let revoked = self.revoked.iter().any(|r| r.key == pair.key);
            let expected = if revoked {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::NO_CONTENT
            };
            assert_eq!(server.verify(pair).await, expected, "{}", pair.key);
        }
        let admin = &self.registered[0];
        for (pair, name) in &self.renamed {
            let record = server.record(&pair.key, admin).await;
            assert_eq!(
                record["name"],
                name.as_str(),
                "an acknowledged rename was lost"
            );
        }
        self.check_audit(server).await;
    }

    /// Every acknowledged change has its event, and no event tells of a change that was not
    /// made: the registered keys with an event are exactly the stored keys.
    async fn check_audit(&self, server: &ServerProcess) {
        let admin = &self.registered[0];
        let events = all_pages(server, "/audit", "events", admin).await;
        let has = |kinds: &[&str], key: &str| {
            events
                .iter()
                .any(|e| e["api_key"] == key && kinds.iter().any(|k| e["event"] == *k))
        };
        for pair in &self.registered {
            assert!(
                has(&["registered", "issued"], &pair.key),
                "an acknowledged registration has no event: {}",
                pair.key
            );
        }
        for pair in &self.revoked {
            assert!(
                has(&["revoked", "rolled"], &pair.key),
                "an acknowledged revocation or roll has no event: {}",
                pair.key
            );
        }
        for (pair, name) in &self.renamed {
            assert!(
                events.iter().any(|e| e["api_key"] == pair.key.as_str()
                    && e["event"] == "updated"
                    && e["detail"]["changed"]["name"] == name.as_str()),
                "an acknowledged rename has no event: {}",
                pair.key
            );
        }
        let mut with_event: Vec<&str> = events
            .iter()
            .filter(|e| e["event"] == "registered" || e["event"] == "issued")
            .map(|e| e["api_key"].as_str().expect("api_key"))
            .collect();
        let credentials = all_pages(server, "/credentials", "credentials", admin).await;
        let mut stored: Vec<&str> = credentials
            .iter()
            .map(|c| c["api_key"].as_str().expect("api_key"))
            .collect();
        with_event.sort_unstable();
        stored.sort_unstable();
        assert_eq!(
            with_event, stored,
            "registration events and credentials differ"
        );
    }
}

/// Every item of a paged collection (`GET path?limit=1000&after=…`).
async fn all_pages(
    server: &ServerProcess,
    path: &str,
    field: &str,
    by: &Pair,
) -> Vec<serde_json::Value> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = match &after {
            Some(after) => format!("{path}?limit=1000&after={after}"),
            None => format!("{path}?limit=1000"),
        };
        let resp = server.send(reqwest::Method::GET, &query, Some(by)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{query}");
        let page: serde_json::Value = resp.json().await.expect("json");
        items.extend(page[field].as_array().expect("items").iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return items,
        }
    }
}

fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("master.hex");
    std::fs::write(&path, format!("{MASTER_HEX}\n")).expect("write key");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod key");
    path
}

/// A fresh directory with the test master key and a data dir path: (dir, key file, data dir).
fn deployment() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = key_file(dir.path());
    let data = dir.path().join("data");
    (dir, key, data)
}

fn serve(data: &Path, key: &Path) -> ServerProcess {
    ServerProcess::start(&[
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--master-key-file",
        key.to_str().expect("utf-8 path"),
    ])
}

async fn becomes_ready(server: &ServerProcess, status: StatusCode) -> bool {
    eventually(Duration::from_secs(10), || async {
        server.ready().await == status
    })
    .await
}

/// How many events `server` logged whose message starts with `message`.
fn count_events(server: &ServerProcess, message: &str) -> usize {
    server
        .messages()
        .iter()
        .filter(|m| m.starts_with(message))
        .count()
}

/// Whether `server` logged an event whose `error` field mentions `word`.
fn logged_error(server: &ServerProcess, word: &str) -> bool {
    server.events().iter().any(|e| {
        e["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains(word))
    })
}

/// The message of the one event the service logs when writes start failing.
const WRITES_FAILING: &str = "SQLite writes are failing";

/// The message of the event the service logs when writes commit again.
const WRITES_RECOVERED: &str = "SQLite writes commit again";

/// Writes failed for a while: the log says so once, not per write or per probe.
fn assert_one_failure_line(server: &ServerProcess) {
    assert_eq!(count_events(server, WRITES_FAILING), 1, "{}", server.logs());
}

/// Writes failed and recovered, perhaps more than once (a nearly full disk takes one more
/// commit, after a checkpoint lets the WAL start over, and refuses the next): one line when
/// they start failing and one when they commit again, each time, never one per failed
/// write or per probe. Ends with writes committing.
fn assert_one_line_per_failure_episode(server: &ServerProcess) {
    let transitions: Vec<bool> = server
        .messages()
        .iter()
        .filter_map(|m| {
            if m.starts_with(WRITES_FAILING) {
                Some(true)
            } else if m.starts_with(WRITES_RECOVERED) {
                Some(false)
            } else {
                None
            }
        })
        .collect();
    let alternating = !transitions.is_empty()
        && transitions.len().is_multiple_of(2)
        && transitions
            .iter()
            .enumerate()
            .all(|(i, &failing)| failing == i.is_multiple_of(2));
    assert!(alternating, "{transitions:?}\n{}", server.logs());
}

#[tokio::test]
async fn a_full_disk_loses_no_acknowledged_write_and_writes_recover_with_space() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), "2M") else {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    };
    let key = key_file(dir.path());
    let data = disk.0.join("data");
    let server = serve(&data, &key);
    let mut ledger = Ledger::default();
    // The caller, and credentials for renames and rolls while the disk is full.
    for _ in 0..31 {
        assert_eq!(ledger.register(&server).await, StatusCode::CREATED);
    }

    // Fill the disk, then leave a little room so some writes still fit.
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(48 * 1024)).unwrap();
    }
    let mut failed = 0;
    for _ in 0..5000 {
        if ledger.register(&server).await == StatusCode::INTERNAL_SERVER_ERROR {
            failed += 1;
            break;
        }
    }
    assert_eq!(failed, 1, "the disk never filled up");
    assert_eq!(server.ready().await, StatusCode::SERVICE_UNAVAILABLE);
    // Still full: whatever is answered 2xx now must be true as well, and a failed roll must
    // leave its credential as it was.
    for _ in 0..10 {
        ledger.register(&server).await;
        ledger.rename(&server).await;
        ledger.roll(&server).await;
    }

    std::fs::remove_file(&filler).unwrap();
    assert!(
        becomes_ready(&server, StatusCode::OK).await,
        "/ready did not recover once the disk had space"
    );
    for _ in 0..20 {
        assert_eq!(ledger.register(&server).await, StatusCode::CREATED);
    }
    for _ in 0..5 {
        assert_eq!(ledger.rename(&server).await, Some(StatusCode::OK));
        assert_eq!(ledger.roll(&server).await, Some(StatusCode::CREATED));
    }
    let target = ledger.revoke(&server, ledger.registered.len() - 1).await;
    assert_eq!(server.verify(&target).await, StatusCode::UNAUTHORIZED);
    assert_one_line_per_failure_episode(&server);
    ledger.check_after_kill(server, &data, &key).await;
    drop(disk);
}

#[tokio::test]
async fn unwritable_database_files_lose_no_acknowledged_write_and_writes_recover() {
    if !is_root() {
        eprintln!("skipped: chattr +i needs root");
        return;
    }
    let (_dir, key, data) = deployment();
    let server = serve(&data, &key);
    let mut ledger = Ledger::default();
    for _ in 0..10 {
        assert_eq!(ledger.register(&server).await, StatusCode::CREATED);
    }
    let db = data.join("credgate.db");
    let wal = data.join("credgate.db-wal");
    let Some(lock) = Immutable::set(&[db.clone(), wal.clone()]) else {
        eprintln!("skipped: chattr +i is not supported on this file system");
        return;
    };
    let mut refused = 0;
    for _ in 0..10 {
        let status = ledger.register(&server).await;
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            refused += 1;
        }
    }
    assert_eq!(refused, 10, "writes into immutable files were acknowledged");
    assert_eq!(server.ready().await, StatusCode::SERVICE_UNAVAILABLE);
    // The writer holds no lock while it cannot write: the break-glass CLI is not blocked by
    // it (it fails on the immutable file itself, not on `database is locked`).
    let out = binary()
        .args(["revoke", &ledger.registered[1].key, "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    drop(lock);
    assert!(
        becomes_ready(&server, StatusCode::OK).await,
        "/ready did not recover once the files were writable"
    );
    for _ in 0..20 {
        assert_eq!(ledger.register(&server).await, StatusCode::CREATED);
    }
    ledger.revoke(&server, 2).await;
    assert_one_failure_line(&server);
    ledger.check_after_kill(server, &data, &key).await;
}

#[tokio::test]
async fn a_database_file_deleted_under_the_server_gets_no_acknowledged_write() {
    let (_dir, key, data) = deployment();
    let server = serve(&data, &key);
    let mut ledger = Ledger::default();
    for _ in 0..5 {
        assert_eq!(ledger.register(&server).await, StatusCode::CREATED);
    }
    let admin = ledger.registered[0].clone();
    std::fs::remove_file(data.join("credgate.db")).unwrap();
    assert!(
        becomes_ready(&server, StatusCode::SERVICE_UNAVAILABLE).await,
        "/ready stayed 200 with the database file deleted"
    );
    let before = ledger.registered.len();
    for _ in 0..10 {
        let status = ledger.register(&server).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let target = ledger.registered[1].clone();
    assert_eq!(
        server.revoke(&target.key, &admin).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(ledger.registered.len(), before);
    // The file was not recreated behind the operator's back.
    assert!(!data.join("credgate.db").exists());
    assert_one_failure_line(&server);
    assert!(logged_error(&server, "deleted"), "{}", server.logs());
}

#[tokio::test]
async fn a_database_file_replaced_under_the_server_gets_no_acknowledged_write() {
    let (_dir, key, data) = deployment();
    let server = serve(&data, &key);
    let mut ledger = Ledger::default();
    assert_eq!(ledger.register(&server).await, StatusCode::CREATED);
    // A restore from a copy, done the usual way: copy, then rename over the original.
    let db = data.join("credgate.db");
    std::fs::copy(&db, data.join("copy.db")).unwrap();
    std::fs::rename(data.join("copy.db"), &db).unwrap();
    assert!(
        becomes_ready(&server, StatusCode::SERVICE_UNAVAILABLE).await,
        "/ready stayed 200 with the database file replaced"
    );
    assert_eq!(
        ledger.register(&server).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert!(logged_error(&server, "replaced"), "{}", server.logs());
}

/// `credgate serve` with these arguments fails at start: exit 2, one line on stderr.
fn assert_start_fails(data: &Path, key: &Path, mentions: &str) {
    let mut child = binary()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .arg("--master-key-file")
        .arg(key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "serve started on an unwritable database"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(mentions), "{stderr}");
}

#[tokio::test]
async fn an_unwritable_database_stops_serve_at_start() {
    if !is_root() {
        eprintln!("skipped: chattr +i needs root");
        return;
    }
    let (_dir, key, data) = deployment();
    let out = binary()
        .args(["migrate", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!data.join("credgate.db-wal").exists());
    {
        // The directory: SQLite cannot create its WAL next to the database.
        let Some(_lock) = Immutable::set(std::slice::from_ref(&data)) else {
            eprintln!("skipped: chattr +i is not supported on this file system");
            return;
        };
        assert_start_fails(&data, &key, "credgate.db");
    }
    {
        let _lock = Immutable::set(&[data.join("credgate.db")]).unwrap();
        assert_start_fails(&data, &key, "credgate.db");
    }
    // Writable again: it starts.
    let server = serve(&data, &key);
    assert_eq!(server.ready().await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarting_mid_burst_loses_no_acknowledged_write() {
    // This test binary's PostgreSQL server is its own: stopping it disturbs no other test.
    let app = spawn_app_with(Backend::Postgres, |c| {
        c.store.timeout = Duration::from_secs(2);
    })
    .await;
    let TestDb::Postgres(url) = app.db.clone() else {
        unreachable!("a PostgreSQL app")
    };
    let app = Arc::new(app);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (app, stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut acked, mut failed) = (Vec::new(), 0usize);
                while !stop.load(Ordering::Relaxed) {
                    let pair = mint();
                    match app.register(&pair).await.status() {
                        StatusCode::CREATED => acked.push(pair),
                        s if s.is_success() => panic!("unexpected {s}"),
                        _ => failed += 1,
                    }
                }
                (acked, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server = pg::server();
    tokio::task::block_in_place(|| server.stop());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    tokio::task::block_in_place(|| server.launch()).expect("restart postgres");
    // Writes come back by themselves once the server is up.
    let recovered = eventually(Duration::from_secs(15), || async {
        app.register(&mint()).await.status() == StatusCode::CREATED
    })
    .await;
    assert!(
        recovered,
        "registrations did not recover after PostgreSQL restarted"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut failed = 0;
    for worker in workers {
        let (a, f) = worker.await.unwrap();
        acked.extend(a);
        failed += f;
    }
    assert!(failed > 0, "the outage did not fail a single write");
    assert!(!acked.is_empty());
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let keys: Vec<String> = acked.iter().map(|p| p.key.clone()).collect();
    let found: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM api_credential WHERE active AND api_key = ANY($1)",
    )
    .bind(&keys)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        found as usize,
        keys.len(),
        "acknowledged registrations lost"
    );
    // Each with its event, and no event without its credential.
    let logged: i64 = sqlx::query_scalar(
        "SELECT COUNT(DISTINCT api_key) FROM api_credential_event \
         WHERE event = 'registered' AND source = 'api' AND api_key = ANY($1)",
    )
    .bind(&keys)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        logged as usize,
        keys.len(),
        "acknowledged registrations without their event"
    );
    let orphans: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM api_credential_event e \
         WHERE NOT EXISTS (SELECT 1 FROM api_credential c WHERE c.api_key = e.api_key)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "events of registrations that were not made");
    assert_eq!(app.ready().await, StatusCode::OK);
}
