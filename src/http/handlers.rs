//! Route handlers. Each parses its input into credential types, calls the store or the
//! authenticator, and answers; errors are `ApiError`s, never hand-built JSON.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::credential::{ApiKey, ApiSecret};
use crate::store::{ListQuery, Registration, Revocation};

pub(super) async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub(super) async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match state.store.ping().await {
        Ok(()) => Ok(Json(json!({ "status": "ready" }))),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            Err(ApiError::NotReady)
        }
    }
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.set_cache_entries(state.auth.cached());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// `POST /credentials`: the derivation is checked before the database is touched, so a
/// forged pair learns nothing about which keys exist.
#[tracing::instrument(skip_all)]
pub(super) async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    require_json(&headers)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::InvalidField("request body could not be read".into()),
    })?;
    let (key, secret) = parse_pair(&body)?;
    if !state.auth.deriver().verify(&key, &secret) {
        return Err(ApiError::InvalidCredential);
    }
    match state.store.register(&key).await? {
        Registration::Created => {
            state.metrics.registered();
            tracing::info!(api_key = %key, "credential registered");
            Ok((
                StatusCode::CREATED,
                Json(json!({ "api_key": key.as_str() })),
            ))
        }
        Registration::Duplicate => Err(ApiError::DuplicateApiKey),
    }
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::UnsupportedMediaType)?;
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

fn parse_pair(body: &[u8]) -> Result<(ApiKey, ApiSecret), ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| ApiError::InvalidField("request body is not valid JSON".into()))?;
    let Value::Object(fields) = value else {
        return Err(ApiError::InvalidField(
            "request body must be a JSON object".into(),
        ));
    };
    let key = ApiKey::parse(string_field(&fields, "api_key")?)
        .map_err(|e| ApiError::field("api_key", e))?;
    let secret = ApiSecret::parse(string_field(&fields, "api_secret")?)
        .map_err(|e| ApiError::field("api_secret", e))?;
    Ok((key, secret))
}

fn string_field<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    match fields.get(name) {
        None => Err(ApiError::field(name, "is missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::field(name, "must be a string")),
    }
}

/// `DELETE /credentials/{api_key}`: any valid credential may revoke any other.
#[tracing::instrument(skip_all, fields(caller = %caller.0))]
pub(super) async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let key = path_key(path)?;
    match state.store.revoke(&key, Some(&caller.0)).await? {
        Revocation::Revoked => {
            state.auth.forget(&key).await;
            state.metrics.revoked();
            tracing::info!(api_key = %key, "credential revoked");
            Ok(Json(json!({ "api_key": key.as_str(), "revoked": true })))
        }
        Revocation::NotFound => Err(ApiError::CredentialNotFound),
    }
}

/// A malformed key in a path cannot name a credential: 404, like an unknown one.
fn path_key(
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<ApiKey, ApiError> {
    let Ok(Path(raw)) = path else {
        return Err(ApiError::CredentialNotFound);
    };
    ApiKey::parse(&raw).map_err(|_| ApiError::CredentialNotFound)
}

/// `GET /auth/verify`: a forward-auth target; the guard already did the work.
pub(super) async fn verify(Extension(caller): Extension<Caller>) -> Response {
    match HeaderValue::from_str(caller.0.as_str()) {
        Ok(value) => (StatusCode::NO_CONTENT, [("x-credential-key", value)]).into_response(),
        // A parsed key is ASCII alphanumerics and '_', always a valid header value.
        Err(_) => ApiError::Internal.into_response(),
    }
}

/// `GET /credentials/{api_key}`.
pub(super) async fn get_one(
    State(state): State<AppState>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let key = path_key(path)?;
    let record = state
        .store
        .get(&key)
        .await?
        .ok_or(ApiError::CredentialNotFound)?;
    Ok(Json(json!(record)))
}

#[derive(Debug, Deserialize)]
pub(super) struct ListParams {
    limit: Option<String>,
    after: Option<String>,
    active: Option<String>,
}

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// `GET /credentials`: keyset pagination; `next` is the last key of a full page.
pub(super) async fn list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        params.map_err(|_| ApiError::InvalidField("query string is malformed".into()))?;
    let limit = match params.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| ApiError::field("limit", "must be a whole number from 1 to 1000"))?,
    };
    let after = params
        .after
        .as_deref()
        .map(ApiKey::parse)
        .transpose()
        .map_err(|_| ApiError::field("after", "must be a cursor returned as `next`"))?;
    let active = match params.active.as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(ApiError::field("active", "must be true or false")),
    };
    let page = state
        .store
        .list(&ListQuery {
            after,
            active,
            limit: limit + 1,
        })
        .await?;
    let more = page.len() > limit as usize;
    let page: Vec<_> = page.into_iter().take(limit as usize).collect();
    let next = more
        .then(|| page.last().map(|r| r.api_key.clone()))
        .flatten();
    Ok(Json(json!({ "credentials": page, "next": next })))
}
