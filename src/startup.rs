//! Building and running the service: [`Application::build`] turns a [`Config`] into a bound
//! listener plus the router and its background tasks; `main` and every test use it, so tests
//! run exactly what ships.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::auth::{Authenticator, CacheSettings};
use crate::config::{self, Config, KeySource};
use crate::credential::SecretDeriver;
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
}

impl Application {
    /// Loads the master key, opens and migrates the database, and binds the listener.
    /// Any failure here is a configuration problem and stops start-up.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
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
        let auth = Authenticator::new(
            SecretDeriver::new(&master),
            store.clone(),
            CacheSettings {
                ttl: config.cache_ttl,
                capacity: config.cache_capacity,
            },
            metrics.clone(),
        );
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let state = AppState {
            auth: auth.clone(),
            store: store.clone(),
            metrics,
        };
        // Logged only now, so a failed start-up prints nothing but its one error line.
        match &source {
            KeySource::DataDir(path, true) => {
                tracing::info!(path = %path.display(), "generated a new master key")
            }
            source => tracing::info!(?source, "master key loaded"),
        }
        Ok(Self {
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
            state,
        } = self;
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        let graceful = GracefulShutdown::new();
        tracing::info!(addr = %listener.local_addr()?, "credgate listening on {}", listener.local_addr()?);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            // Typically out of file descriptors: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let service = TowerToHyperService::new(router.clone());
                    let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        tracing::info!("shutting down: finishing in-flight requests");
        if tokio::time::timeout(shutdown_timeout, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish in time; closing them");
        }
        // The store's own tasks: the SQLite writer commits what it accepted, then stops.
        state.store.close().await;
        drop(state);
        tracing::info!("stopped");
        Ok(())
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
