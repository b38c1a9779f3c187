//! The authentication guard: reads the two credential headers, asks the authenticator, and
//! either admits the request with its [`Caller`] in request extensions or answers for it.
//! Public routes pass as they are; open ones pass without credential headers, and are
//! authenticated like any other when they carry them. Scope checks per route ([`Need`])
//! run after routing, where the route is known.

use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderName};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Access, ApiError};
use crate::auth::{AuthOutcome, Authenticator, Caller};

/// Header carrying the api_key. (A `HeaderName`, not a `&str`: looking it up then needs no
/// parsing on every request.)
pub static KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");
/// Header carrying the api_secret.
pub static SECRET_HEADER: HeaderName = HeaderName::from_static("x-api-secret");

/// What the guard needs: who authenticates, and what is open.
#[derive(Clone)]
pub(crate) struct Guard {
    auth: Authenticator,
    access: std::sync::Arc<Access>,
}

impl Guard {
    pub(crate) fn new(auth: Authenticator, access: Access) -> Self {
        Self {
            auth,
            access: std::sync::Arc::new(access),
        }
    }
}

/// Admits open requests as they are, and every other one only with a valid credential.
pub(crate) async fn require_credential(
    State(guard): State<Guard>,
    mut req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    match guard.access.of(req.method(), req.uri().path()) {
        Open::Public => return next.run(req).await,
        Open::WithoutCredential
            if !headers.contains_key(&KEY_HEADER) && !headers.contains_key(&SECRET_HEADER) =>
        {
            return next.run(req).await;
        }
        Open::WithoutCredential | Open::No => {}
    }
    match authenticate(&guard.auth, headers).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// Authenticates a request's credential headers: the caller, or the error to answer with.
/// Every rejection is the same 401, so a caller learns nothing about which part failed; a
/// database failure is a 500, never a 401.
pub(crate) async fn authenticate(
    auth: &Authenticator,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    let outcome = auth
        .authenticate(
            single_header(headers, &KEY_HEADER),
            single_header(headers, &SECRET_HEADER),
        )
        .await;
    match outcome {
        AuthOutcome::Authenticated(caller) => Ok(caller),
        AuthOutcome::Failed(e) => Err(ApiError::from(e)),
        _ => Err(ApiError::Unauthorized),
    }
}

/// Whether a request may go without a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    /// Anyone, with or without credential headers (which are then ignored).
    Public,
    /// Anyone without credential headers; headers that are sent must be valid.
    WithoutCredential,
    /// Only with a valid credential.
    No,
}

/// What a route needs of an authenticated caller beyond a valid credential (SPEC §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// This scope (or `*`).
    Scope(&'static str),
    /// This scope, unless the path's `{api_key}` is the caller's own.
    ScopeOrSelf(&'static str),
}

/// Answers 403 `INSUFFICIENT_SCOPE` to a caller without what the route needs. Runs after
/// routing (as a route layer), so the route's path parameters are known.
pub(crate) async fn require_scope(State(need): State<Need>, req: Request, next: Next) -> Response {
    let Some(caller) = req.extensions().get::<Caller>() else {
        // Only a route declared protected gets here, and the guard admitted it.
        return ApiError::Unauthorized.into_response();
    };
    let (scope, self_allowed) = match need {
        Need::Scope(scope) => (scope, false),
        Need::ScopeOrSelf(scope) => (scope, true),
    };
    if caller.holds(scope) {
        return next.run(req).await;
    }
    if self_allowed {
        let own = caller.key.as_str().to_owned();
        let (mut parts, body) = req.into_parts();
        let is_self = RawPathParams::from_request_parts(&mut parts, &())
            .await
            .is_ok_and(|params| {
                params
                    .iter()
                    .any(|(name, value)| name == "api_key" && value == own)
            });
        let req = Request::from_parts(parts, body);
        if is_self {
            return next.run(req).await;
        }
    }
    ApiError::scope(scope).into_response()
}

/// The value of a header sent exactly once. A repeated header is refused even when its copies
/// agree: proxies differ on which copy they read, and one that reads the last would act for
/// another key than the one authenticated here.
fn single_header<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h str> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    value.to_str().ok()
}
#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_header_counts_only_when_sent_exactly_once() {
        let mut headers = HeaderMap::new();
        assert_eq!(single_header(&headers, &KEY_HEADER), None);
        headers.append(&KEY_HEADER, HeaderValue::from_static("ak_a"));
        assert_eq!(single_header(&headers, &KEY_HEADER), Some("ak_a"));
        headers.append(&KEY_HEADER, HeaderValue::from_static("ak_a"));
        assert_eq!(single_header(&headers, &KEY_HEADER), None);
        let mut headers = HeaderMap::new();
        headers.append(&SECRET_HEADER, HeaderValue::from_static("sk_a"));
        headers.append(&SECRET_HEADER, HeaderValue::from_static(""));
        assert_eq!(single_header(&headers, &SECRET_HEADER), None);
        assert_eq!(single_header(&headers, &KEY_HEADER), None);
        // Not visible ASCII: refused, never lossily converted.
        let mut headers = HeaderMap::new();
        headers.append(&KEY_HEADER, HeaderValue::from_bytes(b"ak_\xff").unwrap());
        assert_eq!(single_header(&headers, &KEY_HEADER), None);
    }
}
