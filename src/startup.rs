//! Building and running the service: [`Application::build`] turns a [`Config`] into a bound
//! listener plus the router and its background tasks; `main` and every test use it, so tests
//! run exactly what ships.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::auth::{Authenticator, CacheSettings};
use crate::config::{self, Config, KeySource};
use crate::connections::{self, AcceptFailures, Admitted, Connections};
use crate::http::{self, AppState};
use crate::store::{self, DatabaseTarget};
use crate::telemetry::Metrics;

/// A built service, bound and ready to run.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    header_read_timeout: Duration,
    shutdown_timeout: Duration,
    connections: Connections,
}

impl Application {
    /// Loads the master key, opens and migrates the database, and binds the listener.
    /// Any failure here is a configuration problem and stops start-up.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let (state, loaded) = open_quietly(&config).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        // Logged only now, so a failed start-up prints nothing but its one error line.
        loaded.log();
        let max_connections = config.max_connections();
        let database_descriptors =
            connections::database_descriptors(&config.database_target(), &config.store);
        warn_if_descriptors_fall_short(max_connections, database_descriptors);
        Ok(Self {
            connections: Connections::new(max_connections, state.metrics.clone()),
            router: http::router(state.clone(), config.request_timeout),
            state,
            listener,
            header_read_timeout: config.header_read_timeout,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The shared state (store, authenticator, metrics), for embedding and tests.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// for at most the shutdown timeout, and returns.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            listener,
            router,
            header_read_timeout,
            shutdown_timeout,
            connections,
            state,
        } = self;
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        let addr = listener.local_addr()?;
        tracing::info!(%addr, max_connections = connections.limit(), "credgate listening on {addr}");
        let mut failures = AcceptFailures::new(state.metrics.clone());
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            // Room first, then accept: beyond the limit newcomers wait in the kernel's backlog
            // rather than being accepted only to be dropped.
            let reservation = tokio::select! {
                reservation = connections.reserve(&listener) => reservation,
                () = &mut shutdown => break,
            };
            let quiet = failures.quiet_deadline();
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tokio::time::sleep_until(quiet.map_or_else(tokio::time::Instant::now, Into::into)),
                    if quiet.is_some() => {
                    failures.end_episode();
                    continue;
                }
                () = &mut shutdown => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => {
                    failures.succeeded();
                    stream
                }
                Err(e) if connections::is_per_connection(&e) => {
                    tracing::debug!(error = %e, "a connection failed before it was accepted");
                    continue;
                }
                Err(e) => {
                    drop(reservation);
                    // tokio reports the listener still readable after a failed accept, so
                    // retrying at once would spin. Out of descriptors, idle connections are
                    // the ones to give back.
                    let pause = failures.failed(&e, connections.open_count());
                    connections.close_idle();
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        () = &mut shutdown => break,
                    }
                }
            };
            spawn_connection(&http, &router, connections.admit(reservation), stream);
        }
        drop(listener);
        tracing::info!("shutting down: finishing in-flight requests");
        connections.close_all();
        if tokio::time::timeout(shutdown_timeout, connections.all_closed())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish in time; closing them");
        }
        // What authentication learnt this interval (last uses), so a clean stop loses none.
        state.auth.write_learnt().await;
        // The store's own tasks: the SQLite writer commits what it accepted, then stops.
        state.store.close().await;
        drop(state);
        tracing::info!("stopped");
        Ok(())
    }
}

/// Loads the master keys, opens and migrates the database, and builds the authenticator: all
/// a service needs to authenticate requests, without listening anywhere. [`Application::build`]
/// uses it; so does a service that embeds credgate ([`crate::layer::Authenticate`]). Any
/// failure is a configuration problem.
pub async fn open(config: &Config) -> anyhow::Result<AppState> {
    let (state, loaded) = open_quietly(config).await?;
    loaded.log();
    Ok(state)
}

/// Which master keys were loaded, from where: logged once start-up cannot fail any more.
struct Loaded {
    source: KeySource,
    ids: Vec<String>,
}

impl Loaded {
    fn log(self) {
        let Self { source, ids } = self;
        match &source {
            KeySource::DataDir(path, true) => {
                tracing::info!(path = %path.display(), master_key_ids = ?ids, "generated a new master key")
            }
            source => tracing::info!(?source, master_key_ids = ?ids, "master keys loaded"),
        }
    }
}

async fn open_quietly(config: &Config) -> anyhow::Result<(AppState, Loaded)> {
    let (master, source) = config::load_master_key(
        config.master_key_file.as_deref(),
        &config.data_dir,
        config::WhenMissing::Generate,
    )?;
    let target = config.database_target();
    if let DatabaseTarget::Sqlite(path) = &target
        && config.database.is_none()
    {
        config::ensure_data_dir(path.parent().unwrap_or(&config.data_dir))?;
    }
    let metrics = Metrics::new()?;
    let store = store::open(&target, &config.store, metrics.clone()).await?;
    store
        .check_writable()
        .await
        .map_err(|e| anyhow::anyhow!("the database does not accept writes: {}", e.report()))?;
    let ids: Vec<String> = master.key_ids().map(str::to_owned).collect();
    let auth = Authenticator::new(
        master,
        store.clone(),
        CacheSettings {
            ttl: config.cache_ttl,
            capacity: config.cache_capacity,
            last_used_interval: config.last_used_interval,
        },
        metrics.clone(),
    );
    let state = AppState {
        auth,
        store,
        metrics,
        policy: std::sync::Arc::new(config.policy.clone()),
    };
    Ok((state, Loaded { source, ids }))
}

/// Serves one connection on its own task. The connection's slot stays taken until its socket
/// is closed; asked to close (idle shedding or shutdown), it finishes the request in progress,
/// if any, and then closes.
fn spawn_connection(http: &http1::Builder, router: &Router, admitted: Admitted, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let busy = admitted.busy();
    // Busy from the moment hyper hands over a request until the handler has produced the
    // response; hyper finishes writing a response even after a graceful shutdown request.
    let service = ServiceExt::<Request<Incoming>>::map_future(router.clone(), move |response| {
        let busy = busy();
        async move {
            let response = response.await;
            drop(busy);
            response
        }
    });
    let peer = stream
        .peer_addr()
        .ok()
        .map(|addr| std::sync::Arc::from(addr.ip().to_string()));
    let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    // Requests are served inside this task (HTTP/1 runs the handler in the connection's
    // future), so the peer address set here is what an audited write records.
    tokio::spawn(crate::http::PEER.scope(peer, async move {
        let close_requested = admitted.close_requested();
        let result = async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => result,
                () = close_requested => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
        .await;
        drop(admitted);
        if let Err(e) = result {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }));
}

/// Warns when the connection limit plus what the database and the process need exceeds the
/// open-file limit: under load `accept` would then fail for lack of descriptors (handled, but
/// clients wait).
fn warn_if_descriptors_fall_short(max_connections: u32, database_descriptors: u64) {
    let Some(open_files) = connections::open_file_limit() else {
        return;
    };
    let needed =
        u64::from(max_connections) + database_descriptors + connections::BASE_RESERVED_DESCRIPTORS;
    if needed > open_files {
        tracing::warn!(
            open_file_limit = open_files,
            max_connections,
            needed,
            "the open-file limit is below what the connection limit and the database may need; \
             accept may run out of descriptors under load (raise `ulimit -n` or lower --max-connections)"
        );
    }
}

/// Installs the SIGINT and SIGTERM handlers now — before the service announces that it is
/// listening, so a signal can never find the default handler and kill the process — and
/// returns a future that resolves on the first of them.
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

/// Re-reads the master keys on every `SIGHUP` (SPEC §8.3), from the same source as at start
/// (`file`, else the data dir's key file). A key file that cannot be read or holds no valid
/// key changes nothing and logs an error; a good one replaces the ring at once. The handler is
/// installed when this is called, so call it before the service announces it is ready: a
/// `SIGHUP` before that would end the process.
pub fn reload_keys_on_hangup(
    auth: Authenticator,
    file: Option<std::path::PathBuf>,
    data_dir: std::path::PathBuf,
) -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    Ok(async move {
        while hangup.recv().await.is_some() {
            match config::load_master_key(file.as_deref(), &data_dir, config::WhenMissing::Fail) {
                Ok((keys, source)) => {
                    let ids: Vec<&str> = keys.key_ids().collect();
                    tracing::info!(master_key_ids = ?ids, ?source, "master keys reloaded");
                    auth.replace_keys(keys);
                }
                Err(e) => tracing::error!(
                    error = %format!("{e:#}"),
                    "master keys not reloaded; the keys in use stay in use"
                ),
            }
        }
    })
}
