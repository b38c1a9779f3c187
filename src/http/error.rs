//! The one error type of the HTTP API: a stable machine `code`, a status, and the
//! `{"error": {"code", "message"}}` body SPEC §2 fixes for every error.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::openapi::ErrorBody;
use crate::store::StoreError;

/// The body of every 401, as `ApiError::Unauthorized` would serialize it (a unit test checks).
const UNAUTHORIZED_BODY: &str =
    r#"{"error":{"code":"UNAUTHORIZED","message":"missing or invalid credentials"}}"#;

/// Every error the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a field or parameter is missing or malformed.
    #[error("{0}")]
    InvalidField(String),
    /// 401: authentication failed, for whatever reason.
    #[error("missing or invalid credentials")]
    Unauthorized,
    /// 403: a well-formed pair whose secret is not the derivation of its key.
    #[error("api_secret is not valid for api_key")]
    InvalidCredential,
    /// 403: the credential is valid but lacks the scope an action needs.
    #[error("this credential lacks the scope {0:?}")]
    InsufficientScope(String),
    /// 409: the credential is revoked and cannot change.
    #[error("the credential is revoked")]
    CredentialRevoked,
    /// 409: the credential is past its expiry and cannot be rolled.
    #[error("the credential has expired")]
    CredentialExpired,
    /// 404: the credential is unknown (or, on revoke, already revoked).
    #[error("credential not found")]
    CredentialNotFound,
    /// 404: no such route.
    #[error("no such route")]
    NotFound,
    /// 405: the route exists, the method does not.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 408: the request took longer than the per-request timeout.
    #[error("request timed out")]
    Timeout,
    /// 409: the key is registered already (active or revoked).
    #[error("api_key is already registered")]
    DuplicateApiKey,
    /// 413: the body is over the limit.
    #[error("request body is larger than 65536 bytes")]
    PayloadTooLarge,
    /// 415: the body is not declared as JSON.
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    /// 500: something failed on our side; the cause is logged, not shown.
    #[error("internal error")]
    Internal,
    /// 500: the database failed. The cause is logged once, when the answer is made.
    #[error("internal error")]
    Store(StoreError),
    /// 503: the database does not answer.
    #[error("database unavailable")]
    NotReady,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidField(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::InvalidCredential | Self::InsufficientScope(_) => StatusCode::FORBIDDEN,
            Self::CredentialRevoked | Self::CredentialExpired => StatusCode::CONFLICT,
            Self::CredentialNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::DuplicateApiKey => StatusCode::CONFLICT,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Internal | Self::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::NotReady => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine code. Never change one: clients match on them.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidField(_) => "INVALID_FIELD",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::InvalidCredential => "INVALID_CREDENTIAL",
            Self::InsufficientScope(_) => "INSUFFICIENT_SCOPE",
            Self::CredentialRevoked => "CREDENTIAL_REVOKED",
            Self::CredentialExpired => "CREDENTIAL_EXPIRED",
            Self::CredentialNotFound => "CREDENTIAL_NOT_FOUND",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::Timeout => "REQUEST_TIMEOUT",
            Self::DuplicateApiKey => "DUPLICATE_API_KEY",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::Internal | Self::Store(_) => "INTERNAL_ERROR",
            Self::NotReady => "NOT_READY",
        }
    }

    /// A 403 for a missing scope.
    pub fn scope(scope: &str) -> Self {
        Self::InsufficientScope(scope.to_owned())
    }

    /// A 400 for a named field.
    pub fn field(name: &str, problem: impl std::fmt::Display) -> Self {
        Self::InvalidField(format!("{name} {problem}"))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The one place a database failure is logged: where it becomes a 500.
        if let Self::Store(e) = &self {
            tracing::error!(error = %e.report(), "request failed on the database");
        }
        if let Self::Unauthorized = self {
            // The most frequent answer (every forged or unknown pair), and always the same:
            // written once, shared by every 401.
            return (
                StatusCode::UNAUTHORIZED,
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    ),
                    // RFC 9110 §11.6.1: a 401 names the scheme that would succeed.
                    (
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(r#"ApiKey realm="credgate""#),
                    ),
                ],
                UNAUTHORIZED_BODY,
            )
                .into_response();
        }
        let message = self.to_string();
        (self.status(), Json(ErrorBody::new(self.code(), &message))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prebuilt_401_is_what_the_error_serializes_to() {
        let e = ApiError::Unauthorized;
        let built = serde_json::to_string(&ErrorBody::new(e.code(), &e.to_string()));
        assert_eq!(built.expect("serialized"), UNAUTHORIZED_BODY);
    }
}
