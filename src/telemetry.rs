//! Logs and metrics: the tracing subscriber (text or JSON) and the Prometheus registry with
//! every series SPEC §5 lists. No secret ever reaches either.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};
use tracing_subscriber::EnvFilter;

use crate::auth::AuthOutcome;

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
    auth: Arc<AuthTally>,
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
    let auth = Arc::new(AuthTally::new()?);
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
    registry.register(Box::new(TallyCollector(auth.clone())))?;
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
        auth,
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

    /// Counts one authentication outcome (`credgate_auth_results_total{result}`).
    pub fn auth_result(&self, outcome: &AuthOutcome) {
        self.0.auth.add(outcome.index());
    }

    /// Counts a cache hit.
    pub fn cache_hit(&self) {
        self.0.auth.add(HITS);
    }

    /// Counts a cache miss.
    pub fn cache_miss(&self) {
        self.0.auth.add(MISSES);
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

/// Slots of [`AuthTally`]: one per authentication outcome, then cache hits and misses.
const HITS: usize = AuthOutcome::LABELS.len();
const MISSES: usize = HITS + 1;
const TALLY_SLOTS: usize = MISSES + 1;
/// Stripes of [`AuthTally`]: more than the threads that authenticate (the runtime's workers).
const STRIPES: usize = 16;

/// The counters every authentication bumps (its outcome, and a cache hit or miss), one set
/// per thread. A shared counter is one atomic that both cores of a busy instance write on
/// every request, so its cache line moves between them each time; the profile of a cached
/// request showed those two increments as its costliest lines. Each thread adds to its own
/// stripe; a scrape sums the stripes, so the totals stay exact.
struct AuthTally {
    stripes: [Stripe; STRIPES],
    results: Desc,
    hits: Desc,
    misses: Desc,
}

/// One thread's counters, on cache lines of their own (128 bytes: the pair of lines the
/// hardware prefetches together).
#[repr(align(128))]
#[derive(Default)]
struct Stripe([AtomicU64; TALLY_SLOTS]);

thread_local! {
    /// This thread's stripe, picked at its first authentication.
    static STRIPE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Hands out stripes to threads in turn.
static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

/// The stripe of the calling thread.
fn stripe() -> usize {
    let pick = || NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
    // A thread being torn down has no thread-locals left: it shares the first stripe.
    STRIPE
        .try_with(|own| {
            own.get().unwrap_or_else(|| {
                let picked = pick();
                own.set(Some(picked));
                picked
            })
        })
        .unwrap_or(0)
}

impl AuthTally {
    fn new() -> Result<Self, prometheus::Error> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.to_owned(),
                help.to_owned(),
                labels.iter().map(|&l| l.to_owned()).collect(),
                std::collections::HashMap::new(),
            )
        };
        Ok(Self {
            stripes: Default::default(),
            results: desc(
                "credgate_auth_results_total",
                "Authentication outcomes by result",
                &["result"],
            )?,
            hits: desc(
                "credgate_auth_cache_hits_total",
                "Authentication cache hits",
                &[],
            )?,
            misses: desc(
                "credgate_auth_cache_misses_total",
                "Authentication cache misses",
                &[],
            )?,
        })
    }

    fn add(&self, slot: usize) {
        if let Some(counter) = self.stripes[stripe()].0.get(slot) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The total of one slot over every stripe. Each stripe only grows, so successive reads
    /// never go down.
    fn total(&self, slot: usize) -> u64 {
        self.stripes
            .iter()
            .map(|stripe| stripe.0[slot].load(Ordering::Relaxed))
            .sum()
    }
}

/// Exposes an [`AuthTally`] to the registry as its three counter families.
struct TallyCollector(Arc<AuthTally>);

impl Collector for TallyCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.results, &self.0.hits, &self.0.misses]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let tally = &self.0;
        let counter = |slot: usize, labels: Vec<LabelPair>| {
            let mut value = Counter::default();
            // Exact up to 2^53, as every Prometheus counter.
            value.set_value(tally.total(slot) as f64);
            let mut metric = Metric::from_label(labels);
            metric.set_counter(value);
            metric
        };
        let family = |desc: &Desc, metrics: Vec<Metric>| {
            let mut family = MetricFamily::default();
            family.set_name(desc.fq_name.clone());
            family.set_help(desc.help.clone());
            family.set_field_type(MetricType::COUNTER);
            family.set_metric(metrics);
            family
        };
        let results = AuthOutcome::LABELS
            .iter()
            .enumerate()
            .map(|(slot, result)| {
                let mut label = LabelPair::default();
                label.set_name("result".to_owned());
                label.set_value((*result).to_owned());
                counter(slot, vec![label])
            })
            .collect();
        vec![
            family(&tally.results, results),
            family(&tally.hits, vec![counter(HITS, Vec::new())]),
            family(&tally.misses, vec![counter(MISSES, Vec::new())]),
        ]
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
        m.auth_result(&AuthOutcome::RejectedRevoked);
        m.cache_hit();
        m.cache_miss();
        m.cache_miss();
        m.observe_db("state", Instant::now());
        let text = m.render();
        for series in [
            "credgate_http_requests_total{route=\"/health\",status=\"200\"} 1",
            "credgate_http_request_duration_seconds_bucket",
            "credgate_auth_results_total{result=\"rejected_revoked\"} 1",
            "credgate_auth_results_total{result=\"ok\"} 0",
            "credgate_auth_cache_hits_total 1",
            "credgate_auth_cache_misses_total 2",
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
