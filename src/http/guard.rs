//! The authentication guard: reads the two credential headers, asks the authenticator, and
//! either admits the request with its [`Caller`] in request extensions or answers for it.
//! Requests the route table declares open pass without a credential.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Access, ApiError};
use crate::auth::{AuthOutcome, Authenticator};
use crate::credential::ApiKey;

/// Header carrying the api_key. (A `HeaderName`, not a `&str`: looking it up then needs no
/// parsing on every request.)
pub static KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");
/// Header carrying the api_secret.
pub static SECRET_HEADER: HeaderName = HeaderName::from_static("x-api-secret");

/// The authenticated caller, put into request extensions by the guard.
#[derive(Debug, Clone)]
pub struct Caller(pub ApiKey);

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
    if guard.access.is_open(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let headers = req.headers();
    let outcome = guard
        .auth
        .authenticate(
            single_header(headers, &KEY_HEADER),
            single_header(headers, &SECRET_HEADER),
        )
        .await;
    match outcome {
        AuthOutcome::Authenticated(key) => {
            req.extensions_mut().insert(Caller(key));
            next.run(req).await
        }
        AuthOutcome::Failed(e) => ApiError::from(e).into_response(),
        // One answer for every rejection: the caller learns nothing about which part failed.
        _ => ApiError::Unauthorized.into_response(),
    }
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
