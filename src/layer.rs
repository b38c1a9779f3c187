//! credgate as a library: a [`tower::Layer`] that authenticates the requests of any axum or
//! tower service in-process, with the same derivation check, cache and store as the
//! credgate service, and hands the service the [`Caller`] as a request extension.
//!
//! ```no_run
//! use axum::{Extension, Router, routing::get};
//! use credgate::{Config, auth::Caller, layer::Authenticate};
//!
//! # async fn run() -> anyhow::Result<()> {
//! let credgate = credgate::startup::open(&Config::new("./credgate-data")).await?;
//! let authenticate = Authenticate::new(credgate.auth.clone());
//! let app: Router = Router::new()
//!     .route("/orders", get(|Extension(caller): Extension<Caller>| async move {
//!         format!("orders of {}", caller.profile.owner().unwrap_or("nobody"))
//!     }))
//!     // This route also needs a scope; the layer below has authenticated already.
//!     .route_layer(authenticate.clone().require("orders:read"))
//!     .layer(authenticate);
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::Request;
use axum::response::{IntoResponse, Response};

use crate::auth::{Authenticator, Caller};
use crate::http::ApiError;
use crate::http::SECRET_HEADER;
use crate::http::guard;

/// Authenticates every request from its `X-Api-Key` and `X-Api-Secret` headers, and, when
/// built with [`Authenticate::require`], checks the credential holds a scope.
///
/// An admitted request reaches the inner service with its [`Caller`] in the request
/// extensions and **without** its `X-Api-Secret` header, so the service cannot log or forward
/// it by mistake. Every other request is answered here, with credgate's own answers: `401
/// UNAUTHORIZED` (the same for a missing, malformed, forged, unknown, revoked or expired
/// credential), `403 INSUFFICIENT_SCOPE` naming the scope, or `500 INTERNAL_ERROR` when the
/// database fails (never a 401). A request an outer `Authenticate` admitted already is not
/// authenticated twice: only the scope is checked.
#[derive(Clone)]
pub struct Authenticate {
    auth: Authenticator,
    scope: Option<Arc<str>>,
}

impl Authenticate {
    /// Authenticates with `auth`: the authenticator of [`crate::startup::open`] (or of a
    /// running [`crate::Application`]'s state), so the cache and its revocations are shared.
    pub fn new(auth: Authenticator) -> Self {
        Self { auth, scope: None }
    }

    /// The same layer, also requiring `scope` (or `*`) of the credential: for one route, as a
    /// `route_layer`.
    pub fn require(self, scope: impl Into<Arc<str>>) -> Self {
        Self {
            scope: Some(scope.into()),
            ..self
        }
    }
}

impl<S> tower::Layer<S> for Authenticate {
    type Service = AuthenticateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthenticateService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`Authenticate`] wraps around another.
#[derive(Clone)]
pub struct AuthenticateService<S> {
    inner: S,
    layer: Authenticate,
}

impl<S, B> tower::Service<Request<B>> for AuthenticateService<S>
where
    S: tower::Service<Request<B>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The clone that was driven to readiness serves this request (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let caller = match req.extensions().get::<Caller>() {
                Some(caller) => caller.clone(),
                None => match guard::authenticate(&layer.auth, req.headers()).await {
                    Ok(caller) => caller,
                    Err(e) => return Ok(e.into_response()),
                },
            };
            if let Some(scope) = &layer.scope
                && !caller.holds(scope)
            {
                return Ok(ApiError::scope(scope).into_response());
            }
            req.headers_mut().remove(&SECRET_HEADER);
            req.extensions_mut().insert(caller);
            inner.call(req).await
        })
    }
}
