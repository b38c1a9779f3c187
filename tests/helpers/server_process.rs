//! The real `credgate` binary running `serve` as a child process, its stderr collected. It
//! logs JSON, and the address it listens on is read from the `addr` field of its listening
//! event, never from the wording of a log sentence. `start_with_text_logs` runs one that logs
//! human-readable text instead: it listens on a port reserved for it beforehand.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::Client;

/// The `credgate` binary of this build.
pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_credgate"))
}

/// A running `credgate serve`; it dereferences to a [`Client`] of itself, and is killed
/// when dropped.
pub struct ServerProcess {
    child: Child,
    client: Client,
    logs: Arc<Mutex<String>>,
}

impl std::ops::Deref for ServerProcess {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogFormat {
    Json,
    Text,
}

impl ServerProcess {
    /// Starts `credgate serve --listen 127.0.0.1:0 --log-format json <args>` and waits until
    /// it listens.
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(args, LogFormat::Json, |_| {})
    }

    /// Like `start`, with a last say on the command (environment, resource limits).
    pub fn start_with(args: &[&str], customize: impl FnOnce(&mut Command)) -> Self {
        Self::spawn(args, LogFormat::Json, customize)
    }

    /// Like `start`, logging human-readable text, for a test of that format. The text names
    /// no address a test should parse, so the server listens on a free port picked here (the
    /// one thing that can go wrong is another process taking it in between; the server then
    /// fails to start and the test says so).
    pub fn start_with_text_logs(args: &[&str]) -> Self {
        Self::spawn(args, LogFormat::Text, |_| {})
    }

    fn spawn(args: &[&str], format: LogFormat, customize: impl FnOnce(&mut Command)) -> Self {
        let listen: SocketAddr = match format {
            LogFormat::Json => "127.0.0.1:0".parse().expect("addr"),
            LogFormat::Text => TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("reserve a port"),
        };
        let mut command = binary();
        command
            .arg("serve")
            .args(["--listen", &listen.to_string()])
            .args([
                "--log-format",
                match format {
                    LogFormat::Json => "json",
                    LogFormat::Text => "text",
                },
            ])
            .args(args)
            .env_remove("CREDGATE_MASTER_KEY_FILE")
            .env_remove("CREDGATE_LOG_FORMAT")
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
            let mut tx = (format == LogFormat::Json).then_some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = tx.as_ref().and_then(|_| listening_addr(&line))
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
                let mut logs = sink.lock().expect("logs");
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let addr = match format {
            LogFormat::Json => rx.recv_timeout(Duration::from_secs(30)).ok(),
            LogFormat::Text => accepting(&mut child, listen).then_some(listen),
        };
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not start: {}", logs.lock().expect("logs"));
        };
        Self {
            child,
            client: Client::new(addr),
            logs,
        }
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().expect("logs").clone()
    }

    /// Every event logged so far, one JSON object each (for a server started in JSON).
    pub fn events(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON log line: {line}"))
            })
            .collect()
    }

    /// The message of every event logged so far.
    pub fn messages(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter_map(|e| e["fields"]["message"].as_str().map(str::to_owned))
            .collect()
    }

    /// Sends a signal to the server.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Sends a signal and waits (bounded) for the process to exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        self.signal(signal);
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

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address a JSON log line announces, when it is the listening event: the start-up
/// event (`credgate::startup`) that carries an `addr` field.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let event: Value = serde_json::from_str(line).ok()?;
    if event["target"] != "credgate::startup" {
        return None;
    }
    event["fields"]["addr"].as_str()?.parse().ok()
}

/// Waits (bounded) until `addr` accepts connections; false when `child` exits first.
fn accepting(child: &mut Child, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return true;
        }
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
