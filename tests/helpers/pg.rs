//! A throwaway PostgreSQL server for tests: `initdb` into a temp dir owned by the `postgres`
//! OS user, `postgres` as our direct child on a free loopback port, one fresh database per
//! caller, stopped (SIGINT, then waited on) and deleted when the test process exits.
//!
//! Needs the PostgreSQL server binaries (`/usr/lib/postgresql/*/bin`). When running as root
//! the server runs as the `postgres` user, as initdb/postgres refuse to run as root.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A running test server.
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    ids: Option<(u32, u32)>,
    child: Mutex<Option<Child>>,
}

static SERVER: OnceLock<PgServer> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// The server shared by every test in this process, started on first use.
pub fn server() -> &'static PgServer {
    SERVER.get_or_init(|| {
        let server =
            PgServer::start().unwrap_or_else(|e| panic!("cannot start PostgreSQL for tests: {e}"));
        // Test binaries end with exit(), which runs atexit handlers but no destructors.
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(stop_at_exit);
        }
        server
    })
}

extern "C" fn stop_at_exit() {
    if let Some(server) = SERVER.get() {
        server.stop();
        let _ = std::fs::remove_dir_all(&server.dir);
    }
}

fn find_bin() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("no /usr/lib/postgresql: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    candidates.sort();
    candidates
        .pop()
        .ok_or_else(|| "no PostgreSQL server binaries found".into())
}

/// uid and gid of the `postgres` user when we are root (postgres refuses to run as root).
fn run_as() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .ok_or("running as root and there is no `postgres` user")?;
    let fields: Vec<&str> = line.split(':').collect();
    let uid = fields
        .get(2)
        .and_then(|v| v.parse().ok())
        .ok_or("bad passwd line")?;
    let gid = fields
        .get(3)
        .and_then(|v| v.parse().ok())
        .ok_or("bad passwd line")?;
    Ok(Some((uid, gid)))
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl PgServer {
    fn command(&self, program: &str) -> Command {
        command(&self.bin, program, self.ids)
    }

    fn start() -> Result<Self, String> {
        let bin = find_bin()?;
        let ids = run_as()?;
        let dir = std::env::temp_dir().join(format!(
            "credgate-pg-{}-{}",
            std::process::id(),
            free_port()?
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        }
        let out = command(&bin, "initdb", ids)
            .args(["-D"])
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "-N",
            ])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let server = Self {
            bin,
            dir,
            port: free_port()?,
            ids,
            child: Mutex::new(None),
        };
        server.launch()?;
        Ok(server)
    }

    /// Starts the server process (again, after `stop`) and waits until it accepts connections.
    pub fn launch(&self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.join("server.log")).map_err(|e| e.to_string())?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .args(["-c", "max_connections=300"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("postgres: {e}"))?;
        *self.child.lock().map_err(|e| e.to_string())? = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ok = self
                .command("pg_isready")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-q",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "postgres did not become ready; see {}",
            self.dir.join("server.log").display()
        ))
    }

    /// Stops the server (fast shutdown) and waits for it to exit.
    pub fn stop(&self) {
        let Ok(mut guard) = self.child.lock() else {
            return;
        };
        if let Some(mut child) = guard.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            let _ = child.wait();
        }
    }

    /// URL of the `postgres` maintenance database.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new empty database and returns its URL.
    pub async fn fresh_database(&self) -> String {
        use sqlx::Connection;
        let name = format!("credgate_test_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
        let mut conn = sqlx::PgConnection::connect(&self.admin_url())
            .await
            .expect("connect admin");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create database");
        conn.close().await.expect("close");
        self.url(&name)
    }
}

fn command(bin: &Path, program: &str, ids: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(bin.join(program));
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    cmd
}
