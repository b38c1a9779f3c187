//! Logs and metrics: the tracing subscriber (text or JSON) and the Prometheus registry with
//! every series SPEC §5 lists. No secret ever reaches either.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogFormat {
    /// [`DEFAULT_LOG_FORMAT`](crate::config::DEFAULT_LOG_FORMAT): human-readable lines.
    fn default() -> Self {
        crate::config::DEFAULT_LOG_FORMAT
    }
}

/// Installs the global subscriber, writing to stderr. `level` is an `EnvFilter` directive
/// such as `info` or `credgate=debug,sqlx=warn`. Safe to call more than once.
pub fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| anyhow::anyhow!("invalid log level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // Already installed (tests build several applications in one process): keep the first.
    let _ = result;
    Ok(())
}

/// Displays an error with its whole `source()` chain, `outer: inner: …`, for one log line.
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            // Many errors (sqlx's among them) repeat their source in their own message.
            let text = e.to_string();
            if !shown.contains(&text) {
                write!(f, ": {text}")?;
            }
            shown = text;
            cause = e.source();
        }
        Ok(())
    }
}

/// The service's metrics. Cheap to clone: every clone feeds the same registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    auth: IntCounterVec,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    cache_entries: IntGauge,
    registrations: IntCounter,
    revocations: IntCounter,
    db_seconds: HistogramVec,
    listener_connected: IntGauge,
    listener_reconnects: IntCounter,
    connections_open: IntGauge,
    connections_max: IntGauge,
    connections_closed_idle: IntCounter,
    accept_errors: IntCounter,
}

/// Database operations timed in `credgate_db_query_duration_seconds`.
const DB_OPS: [&str; 6] = ["state", "get", "list", "write_batch", "register", "revoke"];

fn build() -> Result<Inner, prometheus::Error> {
    let registry = Registry::new();
    let requests = IntCounterVec::new(
        Opts::new(
            "credgate_http_requests_total",
            "HTTP requests by route and status",
        ),
        &["route", "status"],
    )?;
    let request_seconds = HistogramVec::new(
        HistogramOpts::new(
            "credgate_http_request_duration_seconds",
            "HTTP request latency by route and status",
        )
        .buckets(vec![
            0.000025, 0.00005, 0.000075, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005, 0.001, 0.0025,
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]),
        &["route", "status"],
    )?;
    let auth_vec = IntCounterVec::new(
        Opts::new(
            "credgate_auth_results_total",
            "Authentication outcomes by result",
        ),
        &["result"],
    )?;
    let cache_hits = IntCounter::new(
        "credgate_auth_cache_hits_total",
        "Authentication cache hits",
    )?;
    let cache_misses = IntCounter::new(
        "credgate_auth_cache_misses_total",
        "Authentication cache misses",
    )?;
    let cache_entries = IntGauge::new(
        "credgate_auth_cache_entries",
        "Credentials in the authentication cache",
    )?;
    let registrations = IntCounter::new("credgate_registrations_total", "Credentials registered")?;
    let revocations = IntCounter::new("credgate_revocations_total", "Credentials revoked")?;
    let db_seconds = HistogramVec::new(
        HistogramOpts::new(
            "credgate_db_query_duration_seconds",
            "Database query latency by operation",
        )
        .buckets(vec![
            0.00001, 0.000025, 0.00005, 0.000075, 0.0001, 0.00015, 0.00025, 0.0005, 0.001, 0.0025,
            0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
        ]),
        &["op"],
    )?;
    let listener_connected = IntGauge::new(
        "credgate_invalidation_listener_connected",
        "1 while the PostgreSQL LISTEN connection for cache invalidation is up",
    )?;
    let listener_reconnects = IntCounter::new(
        "credgate_invalidation_listener_reconnects_total",
        "Times the invalidation listener lost its connection (each clears the cache)",
    )?;
    let connections_open = IntGauge::new(
        "credgate_http_connections_open",
        "HTTP connections open now",
    )?;
    let connections_max = IntGauge::new(
        "credgate_http_connections_max",
        "Most HTTP connections open at once (--max-connections); beyond it new ones wait in the backlog",
    )?;
    let connections_closed_idle = IntCounter::new(
        "credgate_http_connections_closed_idle_total",
        "Idle keep-alive connections closed to make room for new ones",
    )?;
    let accept_errors = IntCounter::new(
        "credgate_http_accept_errors_total",
        "Failed accepts that were not about one connection (e.g. out of file descriptors)",
    )?;
    // Present from the start, so "zero database queries" is visible as 0.
    for op in DB_OPS {
        db_seconds.with_label_values(&[op]);
    }
    registry.register(Box::new(requests.clone()))?;
    registry.register(Box::new(request_seconds.clone()))?;
    registry.register(Box::new(auth_vec.clone()))?;
    registry.register(Box::new(cache_hits.clone()))?;
    registry.register(Box::new(cache_misses.clone()))?;
    registry.register(Box::new(cache_entries.clone()))?;
    registry.register(Box::new(registrations.clone()))?;
    registry.register(Box::new(revocations.clone()))?;
    registry.register(Box::new(db_seconds.clone()))?;
    registry.register(Box::new(listener_connected.clone()))?;
    registry.register(Box::new(listener_reconnects.clone()))?;
    registry.register(Box::new(connections_open.clone()))?;
    registry.register(Box::new(connections_max.clone()))?;
    registry.register(Box::new(connections_closed_idle.clone()))?;
    registry.register(Box::new(accept_errors.clone()))?;
    Ok(Inner {
        registry,
        requests,
        request_seconds,
        auth: auth_vec,
        cache_hits,
        cache_misses,
        cache_entries,
        registrations,
        revocations,
        db_seconds,
        listener_connected,
        listener_reconnects,
        connections_open,
        connections_max,
        connections_closed_idle,
        accept_errors,
    })
}

impl Metrics {
    /// A fresh registry with every series registered.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self(Arc::new(build().map_err(|e| {
            anyhow::anyhow!("cannot build metrics registry: {e}")
        })?)))
    }

    /// Counts one finished HTTP request.
    pub fn observe_request(&self, route: &str, status: u16, started: Instant) {
        let buf = itoa_status(status);
        let status = std::str::from_utf8(&buf).unwrap_or("0");
        self.0.requests.with_label_values(&[route, status]).inc();
        self.0
            .request_seconds
            .with_label_values(&[route, status])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The counter of one authentication outcome (`credgate_auth_results_total{result}`),
    /// resolved once by the authenticator so the auth path does no label lookup.
    pub fn auth_counter(&self, result: &str) -> IntCounter {
        self.0.auth.with_label_values(&[result])
    }

    /// Counts a cache hit.
    pub fn cache_hit(&self) {
        self.0.cache_hits.inc();
    }

    /// Counts a cache miss.
    pub fn cache_miss(&self) {
        self.0.cache_misses.inc();
    }

    /// Sets the cache size gauge.
    pub fn set_cache_entries(&self, n: u64) {
        self.0
            .cache_entries
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a registration.
    pub fn registered(&self) {
        self.0.registrations.inc();
    }

    /// Counts a revocation.
    pub fn revoked(&self) {
        self.0.revocations.inc();
    }

    /// The latency histogram of one database operation, resolved once by a caller on a hot
    /// path (the cache-miss lookup) so it does no label lookup per operation.
    pub fn db_histogram(&self, op: &str) -> Histogram {
        self.0.db_seconds.with_label_values(&[op])
    }

    /// Records the latency of one database operation.
    pub fn observe_db(&self, op: &str, started: Instant) {
        self.db_histogram(op)
            .observe(started.elapsed().as_secs_f64());
    }

    /// Sets whether the invalidation listener is connected.
    pub fn set_listener_connected(&self, up: bool) {
        self.0.listener_connected.set(i64::from(up));
    }

    /// Counts one lost listener connection.
    pub fn listener_reconnected(&self) {
        self.0.listener_reconnects.inc();
    }

    /// Counts an accepted connection.
    pub fn connection_opened(&self) {
        self.0.connections_open.inc();
    }

    /// Counts a closed connection.
    pub fn connection_closed(&self) {
        self.0.connections_open.dec();
    }

    /// Sets the connection limit gauge.
    pub fn set_connection_limit(&self, limit: u32) {
        self.0.connections_max.set(i64::from(limit));
    }

    /// Counts idle connections asked to close to make room.
    pub fn closed_idle(&self, n: u64) {
        self.0.connections_closed_idle.inc_by(n);
    }

    /// Counts a failed accept.
    pub fn accept_error(&self) {
        self.0.accept_errors.inc();
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.0.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn itoa_status(status: u16) -> [u8; 3] {
    let s = status.min(999);
    [
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series() {
        let m = Metrics::new().unwrap();
        m.observe_request("/health", 200, Instant::now());
        m.auth_counter("rejected_revoked").inc();
        m.auth_counter("ok");
        m.observe_db("state", Instant::now());
        let text = m.render();
        for series in [
            "credgate_http_requests_total{route=\"/health\",status=\"200\"} 1",
            "credgate_http_request_duration_seconds_bucket",
            "credgate_auth_results_total{result=\"rejected_revoked\"} 1",
            "credgate_auth_results_total{result=\"ok\"} 0",
            "credgate_auth_cache_hits_total 0",
            "credgate_auth_cache_misses_total 0",
            "credgate_auth_cache_entries 0",
            "credgate_registrations_total 0",
            "credgate_revocations_total 0",
            "credgate_db_query_duration_seconds_count{op=\"state\"} 1",
            "credgate_http_connections_open 0",
            "credgate_http_connections_max 0",
            "credgate_http_connections_closed_idle_total 0",
            "credgate_http_accept_errors_total 0",
        ] {
            assert!(text.contains(series), "missing {series} in\n{text}");
        }
    }
}
