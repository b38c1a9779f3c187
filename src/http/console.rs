//! The admin console (SPEC §10): one page and its two assets, compiled into the binary. The
//! page holds no data and no credential: its script signs in with a pair the operator types,
//! and calls the JSON API with the usual headers, so the API's scope checks are its checks.

use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// No inline script or style, nothing from elsewhere, no framing, no referrer.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The console's headers: what a page handling credentials needs from its server.
fn with_security_headers(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 7] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, body).into_response()
}

/// `GET /console`: the page.
#[utoipa::path(get, path = "/console", tag = "console",
    responses((status = 200, description = "The admin console (SPEC §10)", content_type = "text/html; charset=utf-8", body = String)))]
pub(super) async fn page() -> Response {
    with_security_headers("text/html; charset=utf-8", PAGE)
}

/// `GET /console/console.js`: the console's script.
#[utoipa::path(get, path = "/console/console.js", tag = "console",
    responses((status = 200, description = "The console's script (a JavaScript module)", content_type = "text/javascript; charset=utf-8", body = String)))]
pub(super) async fn script() -> Response {
    with_security_headers("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /console/console.css`: the console's style sheet.
#[utoipa::path(get, path = "/console/console.css", tag = "console",
    responses((status = 200, description = "The console's style sheet", content_type = "text/css; charset=utf-8", body = String)))]
pub(super) async fn style() -> Response {
    with_security_headers("text/css; charset=utf-8", STYLE)
}
