//! A bare HTTP/1.1 connection, for tests that control exactly what is on the wire.

use std::net::SocketAddr;
use std::time::Duration;

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
