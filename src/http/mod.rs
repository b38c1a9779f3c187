//! The HTTP API (SPEC §2): the router, the middleware stack, and the handlers.
//!
//! Every request passes, outermost first: metrics and request logging → panic catcher →
//! per-request timeout → the authentication guard (skipped for the public routes) → routing
//! → the route. The guard runs before routing, so unknown routes and wrong methods answer an
//! anonymous caller with the same 401 as everything else, without an `Allow` header.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

use crate::auth::{self, Authenticator};
use crate::store::CredentialStore;
use crate::telemetry::Metrics;
use std::sync::Arc;

mod error;
mod handlers;

pub use error::ApiError;

/// Largest accepted request body (SPEC §2).
pub const BODY_LIMIT: usize = 64 * 1024;

/// What handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Checks credentials; its cache is what revocations invalidate.
    pub auth: Authenticator,
    /// Where credentials live.
    pub store: Arc<dyn CredentialStore>,
    /// Series for `/metrics`.
    pub metrics: Metrics,
}

/// Builds the whole API: routes, error fallbacks and middleware.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let routes = Router::new()
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .route("/credentials", get(handlers::list).post(handlers::register))
        .route(
            "/credentials/{api_key}",
            get(handlers::get_one).delete(handlers::revoke),
        )
        .route("/auth/verify", get(handlers::verify))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state.clone());
    // The middleware wraps the routes from outside rather than through `Router::layer`, which
    // would put it inside each route's method router: that router adds `Allow` to whatever
    // its method-not-allowed fallback answers — the guard's 401 included — and so told an
    // anonymous caller which routes exist and their methods.
    let stack = ServiceBuilder::new()
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            observe,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("a request handler panicked");
            ApiError::Internal.into_response()
        }))
        .layer(middleware::from_fn_with_state(request_timeout, timeout))
        .layer(middleware::from_fn_with_state(state.auth, guard))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .service(routes);
    Router::new().fallback_service(stack)
}

/// Route label for metrics, and whether the route is open to anyone.
fn classify(method: &Method, path: &str) -> (&'static str, bool) {
    match path {
        // Entirely public paths: even a wrong method is answered (405) without credentials.
        "/health" => ("/health", true),
        "/ready" => ("/ready", true),
        "/metrics" => ("/metrics", true),
        "/credentials" => ("/credentials", method == Method::POST),
        "/auth/verify" => ("/auth/verify", false),
        _ => match path.strip_prefix("/credentials/") {
            Some(rest) if !rest.is_empty() && !rest.contains('/') => {
                ("/credentials/{api_key}", false)
            }
            _ => ("unmatched", false),
        },
    }
}

async fn guard(State(auth): State<Authenticator>, req: Request, next: Next) -> Response {
    if classify(req.method(), req.uri().path()).1 {
        return next.run(req).await;
    }
    auth::require_credential(State(auth), req, next).await
}

async fn timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

async fn observe(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let (route, _) = classify(&method, req.uri().path());
    let response = next.run(req).await;
    let status = response.status();
    metrics.observe_request(route, status.as_u16(), started);
    // Paths carry only public keys; headers (which carry secrets) are never logged.
    tracing::debug!(%method, route, status = status.as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::warn!(%method, route, "request answered 500");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(&Method::GET, "/health"), ("/health", true));
        assert_eq!(classify(&Method::DELETE, "/metrics"), ("/metrics", true));
        assert_eq!(
            classify(&Method::POST, "/credentials"),
            ("/credentials", true)
        );
        assert_eq!(
            classify(&Method::GET, "/credentials"),
            ("/credentials", false)
        );
        assert_eq!(
            classify(&Method::DELETE, "/credentials/ak_x"),
            ("/credentials/{api_key}", false)
        );
        assert_eq!(
            classify(&Method::GET, "/credentials/"),
            ("unmatched", false)
        );
        assert_eq!(
            classify(&Method::GET, "/credentials/a/b"),
            ("unmatched", false)
        );
        assert_eq!(classify(&Method::GET, "/health/"), ("unmatched", false));
    }
}
