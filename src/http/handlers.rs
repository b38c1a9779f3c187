//! Route handlers. Each parses its input into credential types, calls the store or the
//! authenticator, and answers; errors are `ApiError`s, never hand-built JSON.

use std::cell::RefCell;
use std::fmt;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value, json};

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

/// Parses a register body: one JSON object, no key repeated at any depth, with the two
/// fields well formed. serde_json alone keeps the last of repeated keys; a proxy or firewall
/// in front may keep the first and so judge another pair than the one registered here.
fn parse_pair(body: &[u8]) -> Result<(ApiKey, ApiSecret), ApiError> {
    let duplicate = RefCell::new(Vec::new());
    let mut json = serde_json::Deserializer::from_slice(body);
    let value = UniqueKeys { path: &duplicate }
        .deserialize(&mut json)
        .and_then(|value| json.end().map(|()| value))
        .map_err(|_| {
            let path = duplicate.borrow();
            if path.is_empty() {
                ApiError::InvalidField("request body is not valid JSON".into())
            } else {
                // Collected innermost first, on the way out.
                let name: Vec<&str> = path.iter().rev().map(String::as_str).collect();
                ApiError::field(&name.join("."), "appears more than once")
            }
        })?;
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

/// Deserializes any JSON value like `serde_json::Value` does, but fails on an object that
/// repeats a key. On that failure `path` holds the keys (array positions as numbers) from the
/// repeated key up to the top, so the error can name it.
struct UniqueKeys<'p> {
    path: &'p RefCell<Vec<String>>,
}

impl UniqueKeys<'_> {
    /// Records where a failure below happened, when it is a repeated key.
    fn within<E>(&self, step: impl FnOnce() -> String) -> impl FnOnce(E) -> E {
        move |e| {
            let mut path = self.path.borrow_mut();
            if !path.is_empty() {
                path.push(step());
            }
            e
        }
    }
}

impl<'de> DeserializeSeed<'de> for UniqueKeys<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text cannot spell NaN or infinity; serde_json's own Value maps them to null too.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq
            .next_element_seed(UniqueKeys { path: self.path })
            .map_err(self.within(|| items.len().to_string()))?
        {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if fields.contains_key(&key) {
                let e = de::Error::custom(format_args!("duplicate key {key:?}"));
                self.path.borrow_mut().push(key);
                return Err(e);
            }
            let value = map
                .next_value_seed(UniqueKeys { path: self.path })
                .map_err(self.within(|| key.clone()))?;
            fields.insert(key, value);
        }
        Ok(Value::Object(fields))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ak_0123456789abcdefghijklmnopqrstuv";
    const SECRET: &str = "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo";

    fn message(body: &str) -> String {
        match parse_pair(body.as_bytes()) {
            Err(ApiError::InvalidField(message)) => message,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn a_well_formed_body_parses() {
        let (key, secret) = parse_pair(
            format!(r#"{{"api_key":"{KEY}","api_secret":"{SECRET}","x":[1,{{}}]}}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(key.as_str(), KEY);
        assert_eq!(secret.expose(), SECRET);
    }

    #[test]
    fn repeated_keys_are_named_at_any_depth() {
        for (body, field) in [
            (
                format!(r#"{{"api_key":"{KEY}","api_key":"{KEY}","api_secret":"{SECRET}"}}"#),
                "api_key",
            ),
            // The same key spelled with an escape is the same key.
            (
                format!(r#"{{"api_key":"{KEY}","api_secret":"{SECRET}","api\u005fsecret":"x"}}"#),
                "api_secret",
            ),
            (r#"{"a":{"b":[0,{"c":1,"c":1}]}}"#.to_owned(), "a.b.1.c"),
            (r#"[{"x":1},{"y":1,"y":2}]"#.to_owned(), "1.y"),
            // Found before the syntax error after it.
            (r#"{"z":1,"z":2,"#.to_owned(), "z"),
        ] {
            assert_eq!(message(&body), format!("{field} appears more than once"));
        }
    }

    #[test]
    fn other_malformed_bodies_are_400() {
        assert_eq!(message(""), "request body is not valid JSON");
        assert_eq!(message("{} {}"), "request body is not valid JSON");
        assert_eq!(message(r#"{"a":1}x"#), "request body is not valid JSON");
        assert_eq!(message("[1]"), "request body must be a JSON object");
        assert_eq!(message("{}"), "api_key is missing");
        assert_eq!(
            message(&format!(r#"{{"api_key":"{KEY}","api_secret":7}}"#)),
            "api_secret must be a string"
        );
        // Nesting beyond serde_json's recursion limit fails cleanly, without a stack overflow.
        assert_eq!(
            message(&"[".repeat(100_000)),
            "request body is not valid JSON"
        );
    }
}
