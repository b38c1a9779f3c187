//! The HTTP API (SPEC §2): the route table, the middleware stack, and the handlers.
//!
//! Every request passes, outermost first: metrics and request logging → panic catcher →
//! per-request timeout → the authentication guard → routing → the route. The guard runs
//! before routing, so unknown routes and wrong methods answer an anonymous caller with the
//! same 401 as everything else, without an `Allow` header. Which routes are open is decided
//! where each route is declared, in `table()`; every other request needs a credential.
//! Forward-auth requests (`/auth/verify`) are the exception to routing: authenticating them
//! is all they ask, so the guard answers them itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;

use crate::attributes::scope::{
    AUDIT_READ, CREDENTIALS_READ, CREDENTIALS_REVOKE, CREDENTIALS_WRITE,
};
use crate::auth::Authenticator;
use crate::config::Policy;
use crate::store::CredentialStore;
use crate::telemetry::Metrics;

mod console;
mod error;
pub(crate) mod guard;
mod handlers;
mod openapi;
mod origin;

pub use crate::auth::Caller;
pub use error::ApiError;
pub use guard::{KEY_HEADER, SECRET_HEADER};
use guard::{Need, Open};
pub(crate) use origin::PEER;

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
    /// Who may register, and what `/auth/verify` answers.
    pub policy: Arc<Policy>,
}

/// Every route, declared once, with who may call it and the scope it needs (SPEC §7.2). The
/// OpenAPI document is built from the same declarations ([`openapi`]).
fn table() -> Routes {
    Routes::default()
        .public(Method::GET, "/health", handlers::health)
        .public(Method::GET, "/ready", handlers::ready)
        .public(Method::GET, "/metrics", handlers::metrics)
        .public(Method::GET, "/openapi.json", openapi::serve)
        .public(Method::GET, "/console", console::page)
        .public(Method::GET, "/console/console.js", console::script)
        .public(Method::GET, "/console/console.css", console::style)
        .open(Method::POST, "/credentials", handlers::register)
        .protected(
            Method::GET,
            "/credentials",
            Need::Scope(CREDENTIALS_READ),
            handlers::list,
        )
        .protected(
            Method::POST,
            "/credentials/issue",
            Need::Scope(CREDENTIALS_WRITE),
            handlers::issue,
        )
        .protected(
            Method::GET,
            "/credentials/{api_key}",
            Need::ScopeOrSelf(CREDENTIALS_READ),
            handlers::get_one,
        )
        .protected(
            Method::DELETE,
            "/credentials/{api_key}",
            Need::ScopeOrSelf(CREDENTIALS_REVOKE),
            handlers::revoke,
        )
        .protected(
            Method::PATCH,
            "/credentials/{api_key}",
            Need::Scope(CREDENTIALS_WRITE),
            handlers::update,
        )
        .protected(
            Method::POST,
            "/credentials/{api_key}/roll",
            Need::ScopeOrSelf(CREDENTIALS_WRITE),
            handlers::roll,
        )
        .protected(
            Method::GET,
            "/audit",
            Need::Scope(AUDIT_READ),
            handlers::audit,
        )
        // Every method on every path under it: proxies forward the original method and
        // append the original path (SPEC §7.4). It checks the scopes a request asks for.
        .forward_auth(FORWARD_AUTH_ROUTES)
}

/// The forward-auth routes: the path, the path with a trailing slash, and every path under it
/// (the original request's, appended by a proxy), as documented and labelled in metrics.
const FORWARD_AUTH_ROUTES: [&str; 3] = ["/auth/verify", "/auth/verify/", "/auth/verify/{*path}"];

/// Builds the whole API: the route table, error fallbacks and middleware.
pub fn router(state: AppState, request_timeout: Duration) -> Router {
    let Routes { router, access, .. } = table();
    let routes = router
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        // Only matched routes get a label; everything else is `unmatched` in metrics.
        .route_layer(middleware::from_fn(label))
        .with_state(state.clone());
    // The middleware wraps the routes from outside rather than through `Router::layer`, which
    // would put it inside each route's method router: that router adds `Allow` to whatever
    // its method-not-allowed fallback answers — the guard's 401 included — and so would tell
    // an anonymous caller which routes exist and their methods.
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
        .layer(middleware::from_fn_with_state(
            guard::Guard::new(state.auth, access, state.policy.verify_ok_status),
            guard::require_credential,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .service(routes);
    Router::new().fallback_service(stack)
}

/// The route table as it is declared: the routes, which of them are open, and each route's
/// declaration for the OpenAPI document.
#[derive(Default)]
struct Routes {
    router: Router<AppState>,
    access: Access,
    declared: Vec<Declared>,
}

/// One route as declared: its methods, its path (axum's syntax), and who may call it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Declared {
    pub(crate) methods: Vec<Method>,
    pub(crate) path: &'static str,
    pub(crate) caller: Admits,
}

/// Who a declared route admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admits {
    /// Anyone; credential headers are ignored.
    Anyone,
    /// Anyone without credential headers, or a valid credential.
    AnyoneOrCredential,
    /// Any valid credential.
    Credential,
    /// A valid credential holding what the route needs.
    Holding(Need),
}

/// Which requests need no credential; every other one does (unknown routes included).
#[derive(Debug, Default, Clone)]
pub(crate) struct Access {
    /// Paths open to anyone, whatever the method: a wrong method is 405 to anyone.
    public: Vec<&'static str>,
    /// Single methods on a path open to a caller without credential headers; the path's
    /// other methods need a credential.
    open: Vec<(Method, &'static str)>,
    /// The forward-auth routes (see [`FORWARD_AUTH_ROUTES`]): any method.
    forward_auth: Option<[&'static str; 3]>,
}

impl Access {
    /// Whether, and how, `method path` may be served without a credential.
    pub(crate) fn of(&self, method: &Method, path: &str) -> Open {
        if self.public.contains(&path) {
            Open::Public
        } else if self.open.iter().any(|(m, p)| m == method && *p == path) {
            Open::WithoutCredential
        } else if let Some(route) = self
            .forward_auth
            .and_then(|routes| forward_auth_route(routes, path))
        {
            Open::ForwardAuth(route)
        } else {
            Open::No
        }
    }
}

/// Which of the forward-auth `routes` (the path, with a trailing slash, and every path under
/// it) axum would have matched `path` with; `None` for any other path.
fn forward_auth_route(routes: [&'static str; 3], path: &str) -> Option<&'static str> {
    match path.strip_prefix(routes[0])? {
        "" => Some(routes[0]),
        "/" => Some(routes[1]),
        under if under.starts_with('/') => Some(routes[2]),
        _ => None,
    }
}

/// The methods the forward-auth path answers, as OpenAPI can name them.
const EVERY_METHOD: [Method; 8] = [
    Method::GET,
    Method::PUT,
    Method::POST,
    Method::DELETE,
    Method::OPTIONS,
    Method::HEAD,
    Method::PATCH,
    Method::TRACE,
];

impl Routes {
    fn declare<H, T>(
        mut self,
        method: Method,
        path: &'static str,
        caller: Admits,
        handler: H,
    ) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        // Runs once at startup, on the constant table above: every test runs it.
        let filter = MethodFilter::try_from(method.clone())
            .expect("the route table names only methods axum can route");
        let mut route = on(filter, handler);
        if let Admits::Holding(need) = caller {
            route = route.route_layer(middleware::from_fn_with_state(need, guard::require_scope));
        }
        self.router = self.router.route(path, route);
        self.declared.push(Declared {
            methods: vec![method],
            path,
            caller,
        });
        self
    }

    /// A route anyone may call (wrong methods on its path get 405 without credentials).
    fn public<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.access.public.push(path);
        self.declare(method, path, Admits::Anyone, handler)
    }

    /// One method a caller without credential headers may call on a path whose other methods
    /// need a credential.
    fn open<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.access.open.push((method.clone(), path));
        self.declare(method, path, Admits::AnyoneOrCredential, handler)
    }

    /// The forward-auth routes: every method on a path and on every path under it, for any
    /// valid credential. Not routed: the guard answers these requests itself
    /// ([`handlers::verify`]), since authenticating them is all they ask. Declared here all
    /// the same, for the OpenAPI document and the route table's tests.
    fn forward_auth(mut self, routes: [&'static str; 3]) -> Self {
        self.access.forward_auth = Some(routes);
        for path in routes {
            self.declared.push(Declared {
                methods: EVERY_METHOD.to_vec(),
                path,
                caller: Admits::Credential,
            });
        }
        self
    }

    /// One method on a path, for a valid credential holding what `need` says.
    fn protected<H, T>(self, method: Method, path: &'static str, need: Need, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        self.declare(method, path, Admits::Holding(need), handler)
    }
}

async fn timeout(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

/// Carries the matched route's path template out to [`observe`], which runs before routing.
#[derive(Clone)]
enum RouteLabel {
    Matched(MatchedPath),
    /// A route the guard answers itself (the forward-auth routes).
    Guard(&'static str),
}

impl RouteLabel {
    fn as_str(&self) -> &str {
        match self {
            Self::Matched(matched) => matched.as_str(),
            Self::Guard(route) => route,
        }
    }
}

async fn label(matched: MatchedPath, req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    response
        .extensions_mut()
        .insert(RouteLabel::Matched(matched));
    response
}

async fn observe(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let response = next.run(req).await;
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or("unmatched", RouteLabel::as_str);
    let status = response.status();
    metrics.observe_request(route, status.as_u16(), started);
    // Paths carry only public keys; headers (which carry secrets) are never logged.
    tracing::debug!(%method, route, status = status.as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "request");
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The requests open without a credential, exactly: a route declared `public` or `open`
    /// by mistake fails here. Everything else is protected by default, unknown paths too.
    #[test]
    fn only_the_declared_routes_are_open() {
        let Routes { access, .. } = table();
        assert_eq!(
            access.public,
            [
                "/health",
                "/ready",
                "/metrics",
                "/openapi.json",
                "/console",
                "/console/console.js",
                "/console/console.css"
            ]
        );
        assert_eq!(access.open, [(Method::POST, "/credentials")]);
        assert_eq!(access.of(&Method::DELETE, "/health"), Open::Public);
        assert_eq!(
            access.of(&Method::POST, "/credentials"),
            Open::WithoutCredential
        );
        for (method, path) in [
            (Method::GET, "/credentials"),
            (Method::PUT, "/credentials"),
            (Method::GET, "/credentials/ak_x"),
            (Method::DELETE, "/credentials/ak_x"),
            (Method::GET, "/auth/verifyx"),
            (Method::GET, "/health/"),
            (Method::GET, "/anything"),
        ] {
            assert_eq!(access.of(&method, path), Open::No, "{method} {path}");
        }
        // Labelled as the three routes axum would have matched.
        for (path, route) in [
            ("/auth/verify", "/auth/verify"),
            ("/auth/verify/", "/auth/verify/"),
            ("/auth/verify/orders/7", "/auth/verify/{*path}"),
            ("/auth/verify//", "/auth/verify/{*path}"),
        ] {
            for method in [
                Method::GET,
                Method::POST,
                Method::from_bytes(b"PURGE").unwrap(),
            ] {
                assert_eq!(
                    access.of(&method, path),
                    Open::ForwardAuth(route),
                    "{method} {path}"
                );
            }
        }
    }

    /// The scope every protected route needs (SPEC §7.2), as declared.
    #[test]
    fn every_route_needs_the_scope_the_spec_gives_it() {
        let Routes { declared, .. } = table();
        let needs: Vec<(Method, &str, Need)> = declared
            .into_iter()
            .filter_map(|d| match d.caller {
                Admits::Holding(need) => Some((d.methods[0].clone(), d.path, need)),
                _ => None,
            })
            .collect();
        assert_eq!(
            needs,
            [
                (Method::GET, "/credentials", Need::Scope(CREDENTIALS_READ)),
                (
                    Method::POST,
                    "/credentials/issue",
                    Need::Scope(CREDENTIALS_WRITE)
                ),
                (
                    Method::GET,
                    "/credentials/{api_key}",
                    Need::ScopeOrSelf(CREDENTIALS_READ)
                ),
                (
                    Method::DELETE,
                    "/credentials/{api_key}",
                    Need::ScopeOrSelf(CREDENTIALS_REVOKE)
                ),
                (
                    Method::PATCH,
                    "/credentials/{api_key}",
                    Need::Scope(CREDENTIALS_WRITE)
                ),
                (
                    Method::POST,
                    "/credentials/{api_key}/roll",
                    Need::ScopeOrSelf(CREDENTIALS_WRITE)
                ),
                (Method::GET, "/audit", Need::Scope(AUDIT_READ)),
            ]
        );
    }
}
