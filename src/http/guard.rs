//! The authentication guard: reads the two credential headers, asks the authenticator, and
//! either admits the request with its [`Caller`] in request extensions or answers for it.
//! Public routes pass as they are; open ones pass without credential headers, and are
//! authenticated like any other when they carry them. Forward-auth requests never reach
//! routing: once authenticated, the guard answers them with the caller's identity. Scope
//! checks per route ([`Need`]) run after routing, where the route is known.

use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{Access, ApiError, RouteLabel};
use crate::auth::{AuthOutcome, Authenticator, Caller};
use crate::config::VerifyStatus;

/// Header carrying the api_key. (A `HeaderName`, not a `&str`: looking it up then needs no
/// parsing on every request.)
pub static KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");
/// Header carrying the api_secret.
pub static SECRET_HEADER: HeaderName = HeaderName::from_static("x-api-secret");

/// What the guard needs: who authenticates, what is open, and what a forward-auth request
/// is answered with.
#[derive(Clone)]
pub(crate) struct Guard {
    auth: Authenticator,
    access: std::sync::Arc<Access>,
    verified: VerifyStatus,
}

impl Guard {
    pub(crate) fn new(auth: Authenticator, access: Access, verified: VerifyStatus) -> Self {
        Self {
            auth,
            access: std::sync::Arc::new(access),
            verified,
        }
    }
}

/// Admits open requests as they are, and every other one only with a valid credential.
pub(crate) async fn require_credential(
    State(guard): State<Guard>,
    mut req: Request,
    next: Next,
) -> Response {
    let open = guard.access.of(req.method(), req.uri().path());
    if open == Open::Public {
        return next.run(req).await;
    }
    let sent = Credential::sent(req.headers());
    if open == Open::WithoutCredential && sent.is_none() {
        return next.run(req).await;
    }
    match sent.authenticate(&guard.auth).await {
        Ok(caller) => match open {
            // Answered here rather than routed to a handler that would only read back the
            // caller: routing, the caller's extension and the route's layer were a fifth of
            // a cached forward-auth request's instructions (see BENCHMARKS.md).
            Open::ForwardAuth(route) => {
                let mut response = super::handlers::verify(&caller, &req, guard.verified);
                response.extensions_mut().insert(RouteLabel::Guard(route));
                response
            }
            _ => {
                req.extensions_mut().insert(caller);
                next.run(req).await
            }
        },
        Err(e) => e.into_response(),
    }
}

/// Authenticates a request's credential headers: the caller, or the error to answer with.
pub(crate) async fn authenticate(
    auth: &Authenticator,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    Credential::sent(headers).authenticate(auth).await
}

/// The credential headers of a request, as sent.
#[derive(Debug, Default, PartialEq)]
struct Credential<'h> {
    key: Sent<'h>,
    secret: Sent<'h>,
}

/// How a header was sent.
#[derive(Debug, Default, PartialEq)]
enum Sent<'h> {
    #[default]
    Absent,
    Once(&'h [u8]),
    /// Repeated: refused even when the copies agree. Proxies differ on which copy they read,
    /// and one that reads the last would act for another key than the one authenticated here.
    Repeated,
}

impl<'h> Sent<'h> {
    fn add(&mut self, value: &'h HeaderValue) {
        *self = match self {
            Self::Absent => Self::Once(value.as_bytes()),
            Self::Once(_) | Self::Repeated => Self::Repeated,
        };
    }

    /// The value of a header sent exactly once, as sent: the authenticator checks its form,
    /// so it is not checked for text here first.
    fn once(&self) -> Option<&'h [u8]> {
        match self {
            Self::Once(value) => Some(value),
            Self::Absent | Self::Repeated => None,
        }
    }
}

impl<'h> Credential<'h> {
    fn sent(headers: &'h HeaderMap) -> Self {
        let mut sent = Self::default();
        each_named(headers, [&KEY_HEADER, &SECRET_HEADER], |which, value| {
            if which == 0 {
                sent.key.add(value);
            } else {
                sent.secret.add(value);
            }
        });
        sent
    }

    /// Whether neither header was sent.
    fn is_none(&self) -> bool {
        self.key == Sent::Absent && self.secret == Sent::Absent
    }

    /// Every rejection is the same 401, so a caller learns nothing about which part failed; a
    /// database failure is a 500, never a 401.
    async fn authenticate(&self, auth: &Authenticator) -> Result<Caller, ApiError> {
        match auth.authenticate(self.key.once(), self.secret.once()).await {
            AuthOutcome::Authenticated(caller) => Ok(caller),
            AuthOutcome::Failed(e) => Err(ApiError::from(e)),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// Calls `each` with every value of the headers named in `names` (and the name's index
/// there), in the order sent, in one walk over the request's headers. Cheaper than a lookup
/// per name: a lookup hashes the name byte by byte, where walking compares the few headers
/// a request has (hyper accepts at most 100), most of them standard ones told apart at once.
pub(crate) fn each_named<'h, const N: usize>(
    headers: &'h HeaderMap,
    names: [&HeaderName; N],
    mut each: impl FnMut(usize, &'h HeaderValue),
) {
    for (name, value) in headers {
        if let Some(which) = names.iter().position(|n| *n == name) {
            each(which, value);
        }
    }
}

/// Whether a request may go without a credential (and, for forward-auth, who answers it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    /// Anyone, with or without credential headers (which are then ignored).
    Public,
    /// Anyone without credential headers; headers that are sent must be valid.
    WithoutCredential,
    /// Only with a valid credential.
    No,
    /// Only with a valid credential, and answered by the guard: a forward-auth request, on
    /// this route (as labelled in metrics).
    ForwardAuth(&'static str),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_counts_only_when_sent_exactly_once() {
        let sent = |pairs: &[(&HeaderName, &'static [u8])]| {
            let mut headers = HeaderMap::new();
            headers.append(axum::http::header::HOST, HeaderValue::from_static("x"));
            for (name, value) in pairs {
                headers.append(*name, HeaderValue::from_bytes(value).unwrap());
            }
            let sent = Credential::sent(&headers);
            let once = |value: &Sent| value.once().map(<[u8]>::to_vec);
            (once(&sent.key), once(&sent.secret), sent.is_none())
        };
        let value = |v: &[u8]| Some(v.to_vec());
        assert_eq!(sent(&[]), (None, None, true));
        let key = [(&KEY_HEADER, &b"ak_a"[..])];
        assert_eq!(sent(&key), (value(b"ak_a"), None, false));
        let repeated = [(&KEY_HEADER, &b"ak_a"[..]), (&KEY_HEADER, b"ak_a")];
        assert_eq!(sent(&repeated), (None, None, false));
        let both = [(&SECRET_HEADER, &b"sk_a"[..]), (&KEY_HEADER, b"ak_b")];
        assert_eq!(sent(&both), (value(b"ak_b"), value(b"sk_a"), false));
        let secret_twice = [(&SECRET_HEADER, &b"sk_a"[..]), (&SECRET_HEADER, b"")];
        assert_eq!(sent(&secret_twice), (None, None, false));
        // Not text: passed on as sent (and refused for its form), never lossily converted.
        let not_text = [(&KEY_HEADER, &b"ak_\xff"[..])];
        assert_eq!(sent(&not_text), (value(b"ak_\xff"), None, false));
    }
}
