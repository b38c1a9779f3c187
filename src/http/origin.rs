//! Who makes a change through the API, for its audit event (SPEC §8.5): the authenticated
//! credential, the client's address and a request id (the client's `X-Request-Id` when it
//! sent a usable one, else a fresh one).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::HeaderName;
use axum::http::request::Parts;

use crate::audit::Origin;
use crate::auth::Caller;

tokio::task_local! {
    /// The peer address of the connection the current task serves, as its audit events
    /// write it. The server formats and sets it once per connection: a request then pays
    /// nothing for it, and only audited writes read it.
    pub(crate) static PEER: Option<Arc<str>>;
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id taken from a client.
const MAX_REQUEST_ID: usize = 128;

/// The origin of the change a request makes; extracted only by handlers that write.
pub(super) struct RequestOrigin(pub(super) Origin);

impl<S: Send + Sync> FromRequestParts<S> for RequestOrigin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let actor = parts.extensions.get::<Caller>().map(|c| c.key.clone());
        let client = PEER.try_with(Clone::clone).ok().flatten();
        let request_id = parts
            .headers
            .get(&REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|id| usable_request_id(id))
            .map_or_else(fresh_request_id, str::to_owned);
        Ok(Self(Origin::api(actor, client, request_id)))
    }
}

/// A client's request id is kept when it is short and printable: it lands in the audit log
/// and in logs, where it must not be able to forge a line.
fn usable_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

/// 32 random hex digits. (Written digit by digit: `format!` and `hex::encode` each cost
/// more than the rest of building an event's origin.)
fn fresh_request_id() -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for byte in rand::random::<[u8; 16]>() {
        id.push(char::from(DIGITS[usize::from(byte >> 4)]));
        id.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_clients_are_short_and_printable() {
        assert!(usable_request_id("b7ad6b7169203331"));
        assert!(usable_request_id("req-1/a:b"));
        assert!(!usable_request_id(""));
        assert!(!usable_request_id("two words"));
        assert!(!usable_request_id("line\nbreak"));
        assert!(!usable_request_id(&"x".repeat(129)));
        let fresh = fresh_request_id();
        assert_eq!(fresh.len(), 32);
        assert!(usable_request_id(&fresh));
        assert_ne!(fresh, fresh_request_id());
    }
}
