//! Route handlers. Each parses its input into credential types, calls the store or the
//! authenticator, and answers; errors are `ApiError`s, never hand-built JSON.

use std::cell::RefCell;
use std::fmt;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value, json};

use axum::http::HeaderName;
use chrono::{DateTime, Utc};

use super::Caller;
use super::openapi::{
    CredentialPage, ErrorBody, EventPage, IssueBody, KeyPath, Limit, RegisterBody, Registered,
    RequestId, Revoked, RollBody, Status, UpdateBody, WithSecret,
};
use super::origin::RequestOrigin;
use super::{ApiError, AppState};
use crate::attributes::{self, Scopes, State as CredentialState, scope};
use crate::audit::EventQuery;
use crate::config::VerifyStatus;
use crate::credential::{ApiKey, ApiSecret};
use crate::store::{
    CredentialRecord, ListQuery, NewCredential, Registration, Revocation, Rolled, Update, Updated,
};

/// Liveness: answers without touching the database, for load balancers.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process serves requests", body = Status)))]
pub(super) async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: `ready` when the database answers.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "The database answers", body = Status),
        (status = 503, description = "`NOT_READY`: the database does not answer", body = ErrorBody),
    ))]
pub(super) async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    match state.store.ping().await {
        Ok(()) => Ok(Json(json!({ "status": "ready" }))),
        Err(e) => {
            tracing::warn!(error = %e.report(), "not ready");
            Err(ApiError::NotReady)
        }
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics (SPEC §5)", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String)))]
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
/// forged pair learns nothing about which keys exist. Open to anyone unless
/// `--open-registration false`; `owner`, `meta` and `scopes` need `credentials:write`, and
/// nobody grants a scope they lack (SPEC §7.3).
#[utoipa::path(post, path = "/credentials", tag = "credentials",
    summary = "Register a credential pair minted with the master key",
    params(RequestId),
    request_body(content = RegisterBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered", body = Registered),
        (status = 400, description = "`INVALID_FIELD`: the body or a field is malformed; the message names the field", body = ErrorBody),
        (status = 401, description = "`UNAUTHORIZED`: credential headers were sent and are not valid, or registration is closed and none were sent", body = ErrorBody),
        (status = 403, description = "`INVALID_CREDENTIAL`: `api_secret` is not the derivation of `api_key`; or `INSUFFICIENT_SCOPE`: an attribute or a scope the caller may not grant", body = ErrorBody),
        (status = 409, description = "`DUPLICATE_API_KEY`: the key is registered already, active or revoked", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
pub(super) async fn register(
    State(state): State<AppState>,
    caller: Option<Extension<Caller>>,
    RequestOrigin(origin): RequestOrigin,
    declared: DeclaredJson,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let caller = caller.map(|Extension(caller)| caller);
    let policy = &state.policy;
    if caller.is_none() && !policy.open_registration {
        return Err(ApiError::Unauthorized);
    }
    let fields = json_object(declared, body)?;
    let (key, secret) = parse_pair(&fields)?;
    let attributes = Attributes::parse(&fields, Utc::now(), Fields::Registration)?;
    let writes = caller
        .as_ref()
        .is_some_and(|c| c.holds(scope::CREDENTIALS_WRITE));
    if (!policy.open_registration || attributes.needs_write()) && !writes {
        return Err(ApiError::scope(scope::CREDENTIALS_WRITE));
    }
    let scopes = match &attributes.scopes {
        Some(scopes) => scopes.clone(),
        None => policy.registration_scopes.clone(),
    };
    // Defaults that anyone could get without headers are no grant; anything else is.
    if let Some(caller) = &caller
        && (attributes.scopes.is_some() || !policy.open_registration)
        && let Some(missing) = scopes.first_missing(caller.profile.scopes())
    {
        return Err(ApiError::scope(missing));
    }
    let keys = state.auth.keys();
    let deriver = keys
        .verify(&key, &secret)
        .ok_or(ApiError::InvalidCredential)?;
    let new = NewCredential {
        api_key: key.clone(),
        name: attributes.name.flatten(),
        owner: attributes.owner.flatten(),
        meta: attributes.meta.unwrap_or_default(),
        scopes,
        expires_at: attributes.expires_at.flatten(),
        master_key_id: Some(deriver.key_id().to_owned()),
        issued: false,
    };
    match state.store.register(&new, &origin).await? {
        Registration::Created => {
            state.metrics.registered();
            // Open registration is the high-volume write: one line each is a request line,
            // at `debug` like those (the audit log records every registration).
            tracing::debug!(api_key = %key, "credential registered");
            Ok((StatusCode::CREATED, Json(Registered { api_key: key })))
        }
        Registration::Duplicate => Err(ApiError::DuplicateApiKey),
    }
}

/// `PATCH /credentials/{api_key}` (`credentials:write`): each given field replaces the stored
/// one; a change of scopes, expiry or owner reaches every cache like a revocation.
#[utoipa::path(patch, path = "/credentials/{api_key}", tag = "credentials",
    summary = "Change a credential's attributes",
    params(KeyPath, RequestId),
    request_body(content = UpdateBody, content_type = "application/json"),
    responses(
        (status = 200, description = "The credential as changed", body = CredentialRecord),
        (status = 400, description = "`INVALID_FIELD`: the body or a field is malformed; the message names the field", body = ErrorBody),
        (status = 404, description = "`CREDENTIAL_NOT_FOUND`: no such credential", body = ErrorBody),
        (status = 409, description = "`CREDENTIAL_REVOKED`: a revoked credential cannot change", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(caller = %caller.key))]
pub(super) async fn update(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RequestOrigin(origin): RequestOrigin,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    declared: DeclaredJson,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let key = path_key(path)?;
    let fields = json_object(declared, body)?;
    let attributes = Attributes::parse(&fields, Utc::now(), Fields::Update)?;
    if let Some(missing) = attributes
        .scopes
        .as_ref()
        .and_then(|s| s.first_missing(caller.profile.scopes()))
    {
        return Err(ApiError::scope(missing));
    }
    let update = Update {
        name: attributes.name,
        owner: attributes.owner,
        meta: attributes.meta,
        scopes: attributes.scopes,
        expires_at: attributes.expires_at,
    };
    match state.store.update(&key, &update, &origin).await? {
        Updated::Changed(record) => {
            if update.touches_authentication() {
                state.auth.forget(&key).await;
            }
            tracing::info!(api_key = %key, "credential updated");
            Ok(Json(json!(record)))
        }
        Updated::NotFound => Err(ApiError::CredentialNotFound),
        Updated::Revoked => Err(ApiError::CredentialRevoked),
    }
}

/// `POST /credentials/issue` (`credentials:write`): mints a pair with the master key, like
/// `credgate issue`, and registers it. Its scopes default to none; the caller grants only what
/// it holds. The one response besides a roll's that carries a secret.
#[utoipa::path(post, path = "/credentials/issue", tag = "credentials",
    summary = "Mint and register a new credential; its secret is shown this once",
    params(RequestId),
    request_body(content = Option<IssueBody>, content_type = "application/json"),
    responses(
        (status = 201, description = "The credential and its secret", body = WithSecret,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, description = "`INVALID_FIELD`: the body or a field is malformed; the message names the field", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(caller = %caller.key))]
pub(super) async fn issue(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RequestOrigin(origin): RequestOrigin,
    declared: DeclaredJson,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let fields = optional_object(declared, body)?;
    let attributes = Attributes::parse(&fields, Utc::now(), Fields::Issue)?;
    let scopes = attributes.scopes.unwrap_or_default();
    if let Some(missing) = scopes.first_missing(caller.profile.scopes()) {
        return Err(ApiError::scope(missing));
    }
    let keys = state.auth.keys();
    let deriver = keys.minting();
    let mut new = NewCredential {
        api_key: ApiKey::generate(),
        name: attributes.name.flatten(),
        owner: attributes.owner.flatten(),
        meta: attributes.meta.unwrap_or_default(),
        scopes,
        expires_at: attributes.expires_at.flatten(),
        master_key_id: Some(deriver.key_id().to_owned()),
        issued: true,
    };
    // A fresh key has more than 190 random bits: a collision is a broken random source.
    if state.store.register(&new, &origin).await? == Registration::Duplicate {
        new.api_key = ApiKey::generate();
        if state.store.register(&new, &origin).await? == Registration::Duplicate {
            tracing::error!("two freshly minted keys were both registered already");
            return Err(ApiError::Internal);
        }
    }
    state.metrics.registered();
    let record = state
        .store
        .get(&new.api_key)
        .await?
        .ok_or(ApiError::Internal)?;
    tracing::info!(api_key = %new.api_key, "credential issued");
    Ok(with_secret(
        &record,
        &deriver.secret_for(&new.api_key),
        None,
    ))
}

/// Most seconds a rolled credential keeps working (30 days), and the default (one day).
const MAX_GRACE_SECONDS: i64 = 2_592_000;
const DEFAULT_GRACE_SECONDS: i64 = 86_400;

/// `POST /credentials/{api_key}/roll` (`credentials:write`, or the credential itself): a new
/// pair with the same attributes; the old one works for `grace_seconds` more at most.
#[utoipa::path(post, path = "/credentials/{api_key}/roll", tag = "credentials",
    summary = "Replace a credential by a new pair; the old one works for a grace period",
    params(KeyPath, RequestId),
    request_body(content = Option<RollBody>, content_type = "application/json"),
    responses(
        (status = 201, description = "The new credential, its secret, and the key it replaces", body = WithSecret,
            headers(("Cache-Control" = String, description = "`no-store`"))),
        (status = 400, description = "`INVALID_FIELD`: the body or `grace_seconds` is malformed", body = ErrorBody),
        (status = 404, description = "`CREDENTIAL_NOT_FOUND`: no such credential", body = ErrorBody),
        (status = 409, description = "`CREDENTIAL_REVOKED` or `CREDENTIAL_EXPIRED`", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(caller = %caller.key))]
pub(super) async fn roll(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RequestOrigin(origin): RequestOrigin,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    declared: DeclaredJson,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let old = path_key(path)?;
    let fields = optional_object(declared, body)?;
    if let Some(unknown) = fields.keys().find(|k| k.as_str() != "grace_seconds") {
        return Err(ApiError::field(
            unknown,
            "is not a field of a roll (grace_seconds)",
        ));
    }
    let grace = match fields.get("grace_seconds") {
        None => DEFAULT_GRACE_SECONDS,
        // `60.0` is the number 60, as JSON Schema's `integer` says.
        Some(value) => value
            .as_i64()
            .or_else(|| {
                value
                    .as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_GRACE_SECONDS as f64)
                    .map(|f| f as i64)
            })
            .filter(|n| (0..=MAX_GRACE_SECONDS).contains(n))
            .ok_or_else(|| {
                ApiError::field("grace_seconds", "must be a whole number from 0 to 2592000")
            })?,
    };
    let until = Utc::now() + chrono::Duration::seconds(grace);
    let keys = state.auth.keys();
    let deriver = keys.minting();
    let mut rolled = None;
    // Like issuing: a second fresh key only if the first was taken.
    for _ in 0..2 {
        let new = ApiKey::generate();
        match state
            .store
            .roll(&old, &new, deriver.key_id(), until, &origin)
            .await?
        {
            Rolled::Rolled(record) => {
                rolled = Some((new, record));
                break;
            }
            Rolled::NotFound => return Err(ApiError::CredentialNotFound),
            Rolled::Revoked => return Err(ApiError::CredentialRevoked),
            Rolled::Expired => return Err(ApiError::CredentialExpired),
            Rolled::Duplicate => continue,
        }
    }
    let Some((new, record)) = rolled else {
        tracing::error!("two freshly minted keys were both registered already");
        return Err(ApiError::Internal);
    };
    // The old key's expiry moved: no cache may keep the one it had.
    state.auth.forget(&old).await;
    state.metrics.registered();
    tracing::info!(api_key = %new, rolled_from = %old, grace_seconds = grace, "credential rolled");
    Ok(with_secret(&record, &deriver.secret_for(&new), Some(&old)))
}

/// A `201` carrying a credential and its secret, never to be stored by any cache.
fn with_secret(
    record: &crate::store::CredentialRecord,
    secret: &ApiSecret,
    rolled_from: Option<&ApiKey>,
) -> Response {
    let mut body = json!(record);
    body["api_secret"] = Value::String(secret.expose());
    if let Some(old) = rolled_from {
        body["rolled_from"] = Value::String(old.as_str().to_owned());
    }
    (
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    )
        .into_response()
}

/// Whether a request declares its body as JSON (`Content-Type: application/json`, with or
/// without parameters). An extractor of its own so a handler that reads a body does not
/// take a copy of every header to look at one.
pub(super) struct DeclaredJson(bool);

impl<S: Send + Sync> FromRequestParts<S> for DeclaredJson {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|content_type| {
                let essence = content_type.split(';').next().unwrap_or("").trim();
                essence.eq_ignore_ascii_case("application/json")
            });
        Ok(Self(json))
    }
}

impl DeclaredJson {
    /// `415 UNSUPPORTED_MEDIA_TYPE` unless the body was declared as JSON.
    fn require(self) -> Result<(), ApiError> {
        if self.0 {
            Ok(())
        } else {
            Err(ApiError::UnsupportedMediaType)
        }
    }
}

/// A body that must be a JSON object declared as JSON.
fn json_object(
    declared: DeclaredJson,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    declared.require()?;
    parse_object(&read_body(body)?)
}

/// A body that may be absent (then `{}`); when present, a JSON object declared as JSON.
fn optional_object(
    declared: DeclaredJson,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Value>, ApiError> {
    let body = read_body(body)?;
    if body.is_empty() {
        return Ok(Map::new());
    }
    declared.require()?;
    parse_object(&body)
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::InvalidField("request body could not be read".into()),
    })
}

/// Which body an [`Attributes`] is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fields {
    /// `POST /credentials`: other fields (the pair, anything unknown) are ignored, as they
    /// always were; `null` is the same as absent.
    Registration,
    /// `POST /credentials/issue`: only attributes, maybe none; `null` is the same as absent.
    Issue,
    /// `PATCH`: only attributes, at least one; `null` clears `name`, `owner`, `expires_at`.
    Update,
}

/// The attributes a body gives (SPEC §7.1), each checked; `Some(None)` is an explicit null.
#[derive(Debug, Default, PartialEq)]
struct Attributes {
    name: Option<Option<String>>,
    owner: Option<Option<String>>,
    meta: Option<Map<String, Value>>,
    scopes: Option<Scopes>,
    expires_at: Option<Option<DateTime<Utc>>>,
}

const ATTRIBUTE_FIELDS: [&str; 5] = ["name", "owner", "meta", "scopes", "expires_at"];

impl Attributes {
    fn parse(
        fields: &Map<String, Value>,
        now: DateTime<Utc>,
        kind: Fields,
    ) -> Result<Self, ApiError> {
        if kind != Fields::Registration
            && let Some(unknown) = fields
                .keys()
                .find(|k| !ATTRIBUTE_FIELDS.contains(&k.as_str()))
        {
            return Err(ApiError::field(
                unknown,
                "is not an attribute (name, owner, meta, scopes, expires_at)",
            ));
        }
        if kind == Fields::Update && fields.is_empty() {
            return Err(ApiError::InvalidField(
                "request body must give at least one of name, owner, meta, scopes, expires_at"
                    .into(),
            ));
        }
        // On registration, null is absent; on update, it clears (where that is allowed).
        let given = |name: &str| -> Option<&Value> {
            match fields.get(name) {
                Some(Value::Null) if kind != Fields::Update => None,
                other => other,
            }
        };
        let text = |name: &str, parse: fn(&str) -> Result<String, String>| {
            given(name)
                .map(|v| match v {
                    Value::Null => Ok(None),
                    Value::String(s) => parse(s).map(Some).map_err(|e| ApiError::field(name, e)),
                    _ => Err(ApiError::field(name, "must be a string or null")),
                })
                .transpose()
        };
        let meta = given("meta")
            .map(|v| attributes::parse_meta(v).map_err(|e| ApiError::field("meta", e)))
            .transpose()?;
        let scopes = given("scopes")
            .map(|v| match v {
                Value::Array(items) => {
                    let items: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
                    let items = items
                        .ok_or_else(|| ApiError::field("scopes", "must be an array of strings"))?;
                    Scopes::new(items).map_err(|e| ApiError::field("scopes", e))
                }
                _ => Err(ApiError::field("scopes", "must be an array of strings")),
            })
            .transpose()?;
        let expires_at = given("expires_at")
            .map(|v| match v {
                Value::Null => Ok(None),
                Value::String(s) => attributes::parse_expiry(s, now)
                    .map(Some)
                    .map_err(|e| ApiError::field("expires_at", e)),
                _ => Err(ApiError::field("expires_at", "must be a string or null")),
            })
            .transpose()?;
        Ok(Self {
            name: text("name", attributes::parse_name)?,
            owner: text("owner", attributes::parse_owner)?,
            meta,
            scopes,
            expires_at,
        })
    }

    /// Whether setting these needs `credentials:write` on registration.
    fn needs_write(&self) -> bool {
        self.owner.is_some() || self.meta.is_some() || self.scopes.is_some()
    }
}

/// Parses a request body: one JSON object, no key repeated at any depth. serde_json alone
/// keeps the last of repeated keys; a proxy or firewall in front may keep the first and so
/// judge another request than the one served here.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
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
                match name.join(".") {
                    empty if empty.is_empty() => ApiError::field("\"\"", "appears more than once"),
                    name => ApiError::field(&name, "appears more than once"),
                }
            }
        })?;
    match value {
        Value::Object(fields) => Ok(fields),
        _ => Err(ApiError::InvalidField(
            "request body must be a JSON object".into(),
        )),
    }
}

/// The pair of a register body, both fields well formed.
fn parse_pair(fields: &Map<String, Value>) -> Result<(ApiKey, ApiSecret), ApiError> {
    let key = ApiKey::parse(string_field(fields, "api_key")?)
        .map_err(|e| ApiError::field("api_key", e))?;
    let secret = ApiSecret::parse(string_field(fields, "api_secret")?)
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
#[utoipa::path(delete, path = "/credentials/{api_key}", tag = "credentials",
    summary = "Revoke a credential, for good",
    params(KeyPath, RequestId),
    responses(
        (status = 200, description = "Revoked", body = Revoked),
        (status = 404, description = "`CREDENTIAL_NOT_FOUND`: unknown, malformed or already revoked", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all, fields(caller = %caller.key))]
pub(super) async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    RequestOrigin(origin): RequestOrigin,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let key = path_key(path)?;
    match state.store.revoke(&key, &origin).await? {
        Revocation::Revoked => {
            state.auth.forget_revoked(&key).await;
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

/// Header naming the scopes a forward-auth request requires (SPEC §7.4).
static REQUIRED_SCOPES: HeaderName = HeaderName::from_static("x-required-scopes");
static CREDENTIAL_KEY: HeaderName = HeaderName::from_static("x-credential-key");
static CREDENTIAL_OWNER: HeaderName = HeaderName::from_static("x-credential-owner");
static CREDENTIAL_SCOPES: HeaderName = HeaderName::from_static("x-credential-scopes");

/// The headers of `/auth/verify` answers, prebuilt: one map for each combination of present
/// identity headers (bit [`OWNER`], bit [`SCOPES`]), their names with empty values, in the
/// order key, owner, scopes, then `Content-Length: 0` (the answer has no body). An answer
/// clones one and fills in its values ([`identity_headers`]) rather than inserting: an insert
/// hashes the header's name byte by byte (three custom names, 53 bytes), which cost more than
/// the rest of the answer, where a clone copies the names. With `Content-Length` the map is
/// complete: a clone has no room to spare, and the router would otherwise insert it and grow
/// the map.
static IDENTITY_TEMPLATES: std::sync::LazyLock<[HeaderMap; 4]> = std::sync::LazyLock::new(|| {
    std::array::from_fn(|index| {
        let mut map = HeaderMap::with_capacity(4);
        let empty = HeaderValue::from_static("");
        map.insert(&CREDENTIAL_KEY, empty.clone());
        if index & OWNER != 0 {
            map.insert(&CREDENTIAL_OWNER, empty.clone());
        }
        if index & SCOPES != 0 {
            map.insert(&CREDENTIAL_SCOPES, empty);
        }
        map.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        map
    })
});
const OWNER: usize = 1;
const SCOPES: usize = 2;

/// The headers for a caller: its key, and its owner and scopes when it has them.
fn identity_headers(
    key: HeaderValue,
    owner: Option<HeaderValue>,
    scopes: Option<HeaderValue>,
) -> HeaderMap {
    let index = if owner.is_some() { OWNER } else { 0 } | if scopes.is_some() { SCOPES } else { 0 };
    let mut headers = IDENTITY_TEMPLATES[index].clone();
    // The template's first values are for exactly the headers present, in this order.
    let mut slots = headers.values_mut();
    let mut put = |value| {
        if let Some(slot) = slots.next() {
            *slot = value;
        }
    };
    put(key);
    if let Some(owner) = owner {
        put(owner);
    }
    if let Some(scopes) = scopes {
        put(scopes);
    }
    headers
}

/// `/auth/verify` and everything under it, any method: a forward-auth target. Not routed: the
/// guard answers with this once it authenticated the caller. Checks the scopes the request
/// asks for (`?scope=` and `X-Required-Scopes`; every other query parameter and the body are
/// ignored) and answers with the caller's identity.
#[utoipa::path(method(get, put, post, delete, options, head, patch, trace), path = "/auth/verify/{path}", tag = "forward auth",
    summary = "Forward-auth target: authenticates the request's credential and answers with its identity",
    params(
        ("path" = String, Path, description = "The original request's path, appended by the proxy; ignored"),
        ("scope" = Option<Vec<String>>, Query, explode, pattern = r"^[ \t\n\f\r]*((\*|[a-z0-9][a-z0-9:._-]{0,63})([ \t\n\f\r]+(\*|[a-z0-9][a-z0-9:._-]{0,63}))*)?[ \t\n\f\r]*$",
            description = "Scopes the credential must hold, each value a space-separated list; every other query parameter is ignored"),
        ("X-Required-Scopes" = Option<String>, Header, pattern = r"^[ \t]*((\*|[a-z0-9][a-z0-9:._-]{0,63})([ \t]+(\*|[a-z0-9][a-z0-9:._-]{0,63}))*)?[ \t]*$",
            description = "Scopes the credential must hold, space-separated"),
    ),
    responses(
        (status = 200, description = "Allowed (with `--verify-ok-status 200`, for Envoy)", headers(
            ("X-Credential-Key" = String, description = "The credential's key"),
            ("X-Credential-Owner" = String, description = "Its owner, when it has one"),
            ("X-Credential-Scopes" = String, description = "Its scopes, space-separated, when it has any"))),
        (status = 204, description = "Allowed", headers(
            ("X-Credential-Key" = String, description = "The credential's key"),
            ("X-Credential-Owner" = String, description = "Its owner, when it has one"),
            ("X-Credential-Scopes" = String, description = "Its scopes, space-separated, when it has any"))),
        (status = 400, description = "`INVALID_FIELD`: a required scope is malformed", body = ErrorBody),
        (status = 403, description = "`INSUFFICIENT_SCOPE`: the credential lacks a required scope", body = ErrorBody),
    ))]
pub(super) fn verify(caller: &Caller, req: &axum::extract::Request, ok: VerifyStatus) -> Response {
    // The request is read in place: its headers and URI are borrowed, never cloned.
    match identity(caller, req, ok) {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// The answer of `/auth/verify` to an authenticated request: its required scopes checked,
/// then the caller's identity headers.
fn identity(
    caller: &Caller,
    req: &axum::extract::Request,
    ok: VerifyStatus,
) -> Result<Response, ApiError> {
    check_required_scopes(caller, req.uri().query())?;
    // One walk over the headers finds the key and the required scopes (see `each_named`).
    let (mut key, mut required) = (None, Ok(()));
    super::guard::each_named(
        req.headers(),
        [&super::KEY_HEADER, &REQUIRED_SCOPES],
        |which, value| {
            if which == 0 {
                key.get_or_insert(value);
            } else if required.is_ok() {
                required = value
                    .to_str()
                    .map_err(|_| ApiError::field("X-Required-Scopes", "must be visible ASCII"))
                    .and_then(|list| check_scope_list(caller, list));
            }
        },
    );
    required?;
    // The key header as it arrived (the guard read exactly this value): sharing its bytes
    // costs no copy. A parsed key is ASCII alphanumerics and '_', always a valid header value.
    let key = match key {
        Some(sent) => sent.clone(),
        None => HeaderValue::from_str(caller.key.as_str()).map_err(|_| ApiError::Internal)?,
    };
    let owner = match caller.profile.owner_bytes() {
        Some(owner) => Some(HeaderValue::from_bytes(owner).map_err(|_| {
            // Only an owner written by hand in the database can be no header value.
            tracing::error!(api_key = %caller.key, "the credential's owner cannot be sent as a header");
            ApiError::Internal
        })?),
        None => None,
    };
    let scopes = caller.profile.scopes();
    let scopes = match scopes.header() {
        Some(joined) => Some(joined.clone()),
        None if scopes.is_empty() => None,
        None => {
            tracing::error!(api_key = %caller.key, "the credential's scopes cannot be sent as a header");
            return Err(ApiError::Internal);
        }
    };
    let identity = identity_headers(key, owner, scopes);
    let status = match ok {
        VerifyStatus::Ok => StatusCode::OK,
        VerifyStatus::NoContent => StatusCode::NO_CONTENT,
    };
    let mut response = status.into_response();
    *response.headers_mut() = identity;
    Ok(response)
}

/// Checks the scopes a forward-auth request requires in its query: each `scope` parameter, a
/// space-separated list (the `X-Required-Scopes` headers are checked after these). A malformed
/// one is a 400, a missing one a 403. Allocates nothing unless a value is percent-encoded.
fn check_required_scopes(caller: &Caller, query: Option<&str>) -> Result<(), ApiError> {
    for pair in query.into_iter().flat_map(|query| query.split('&')) {
        if pair.bytes().any(|b| b == b'%' || b == b'+') {
            for (name, value) in form_urlencoded::parse(pair.as_bytes()) {
                if name == "scope" {
                    check_scope_list(caller, &value)?;
                }
            }
        } else if let Some(value) = pair.strip_prefix("scope=") {
            // Nothing to decode: read in place (the common `?scope=a:b`), without the
            // decoder's copies and UTF-8 repair.
            check_scope_list(caller, value)?;
        }
    }
    Ok(())
}

/// Checks a space-separated list of scopes a request requires of `caller`.
fn check_scope_list(caller: &Caller, list: &str) -> Result<(), ApiError> {
    // The common list of one scope, without splitting (no scope holds whitespace).
    if attributes::is_scope(list) {
        return if caller.holds(list) {
            Ok(())
        } else {
            Err(ApiError::scope(list))
        };
    }
    for scope in list.split_ascii_whitespace() {
        if !attributes::is_scope(scope) {
            return Err(ApiError::field(
                "scope",
                format_args!("{scope:?} is not a scope"),
            ));
        }
        if !caller.holds(scope) {
            return Err(ApiError::scope(scope));
        }
    }
    Ok(())
}

#[utoipa::path(get, path = "/credentials/{api_key}", tag = "credentials",
    summary = "One credential, revoked or not",
    params(KeyPath),
    responses(
        (status = 200, description = "The credential", body = CredentialRecord),
        (status = 404, description = "`CREDENTIAL_NOT_FOUND`: never registered, or malformed", body = ErrorBody),
    ))]
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
    owner: Option<String>,
    state: Option<String>,
    master_key_id: Option<String>,
}

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[utoipa::path(get, path = "/credentials", tag = "credentials",
    summary = "List credentials, a page at a time",
    params(
        Limit,
        ("after" = Option<String>, Query, pattern = r"^ak_[A-Za-z0-9]{16,64}$", description = "The `next` of the previous page"),
        ("active" = Option<bool>, Query, description = "Only active (true) or revoked (false) credentials"),
        ("owner" = Option<String>, Query, pattern = r"^[A-Za-z0-9._:@/-]{1,200}$", description = "Only this owner's credentials"),
        ("state" = Option<CredentialState>, Query, description = "Only credentials in this state"),
        ("master_key_id" = Option<String>, Query, pattern = r"^[0-9a-f]{16}$", description = "Only credentials derived under this master key"),
    ),
    responses(
        (status = 200, description = "A page", body = CredentialPage),
        (status = 400, description = "`INVALID_FIELD`: a malformed parameter; the message names it", body = ErrorBody),
    ))]
/// `GET /credentials`: keyset pagination; `next` is the last key of a full page.
pub(super) async fn list(
    State(state): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let ListRequest { limit, mut query } = list_request(params)?;
    query.limit = limit + 1;
    let found = state.store.list(&query).await?;
    let (page, next) = page(found, limit, |r| r.api_key.clone());
    Ok(Json(json!({ "credentials": page, "next": next })))
}

/// A page of at most `limit` items out of `found`, read with one more than `limit` asked
/// for: the cursor of its last item when there are more, else none.
fn page<T>(
    mut found: Vec<T>,
    limit: u32,
    cursor: impl Fn(&T) -> String,
) -> (Vec<T>, Option<String>) {
    let more = found.len() > limit as usize;
    found.truncate(limit as usize);
    let next = if more { found.last().map(cursor) } else { None };
    (found, next)
}

/// A query string, parsed; one that cannot be read at all is `400 INVALID_FIELD`.
fn query<T>(params: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    params
        .map(|Query(params)| params)
        .map_err(|_| ApiError::InvalidField("query string is malformed".into()))
}

#[derive(Debug, Deserialize)]
pub(super) struct AuditParams {
    api_key: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

#[utoipa::path(get, path = "/audit", tag = "audit",
    summary = "The audit log, oldest first, a page at a time",
    params(
        ("api_key" = Option<String>, Query, pattern = r"^ak_[A-Za-z0-9]{16,64}$", description = "Only this credential's events"),
        ("after" = Option<i64>, Query, minimum = 0, description = "The `next` of the previous page"),
        Limit,
    ),
    responses(
        (status = 200, description = "A page", body = EventPage),
        (status = 400, description = "`INVALID_FIELD`: a malformed parameter; the message names it", body = ErrorBody),
    ))]
/// `GET /audit` (`audit:read`): the audit log, oldest first, paged by event id; `next` is the
/// last id of a full page.
pub(super) async fn audit(
    State(state): State<AppState>,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let params = query(params)?;
    let limit = page_limit(params.limit.as_deref())?;
    let api_key = params
        .api_key
        .as_deref()
        .map(ApiKey::parse)
        .transpose()
        .map_err(|_| ApiError::field("api_key", "must be an api_key (ak_…)"))?;
    let after = match params.after.as_deref() {
        None => None,
        Some(raw) => Some(
            raw.parse::<i64>()
                .ok()
                .filter(|id| *id >= 0)
                .ok_or_else(|| ApiError::field("after", "must be a cursor returned as `next`"))?,
        ),
    };
    let request = EventQuery {
        api_key,
        after,
        limit: limit + 1,
    };
    let found = state.store.events(&request).await?;
    let (events, next) = page(found, limit, |e| e.id.to_string());
    Ok(Json(json!({ "events": events, "next": next })))
}

/// A page size from `?limit=`: 1..=1000, 100 when absent.
fn page_limit(raw: Option<&str>) -> Result<u32, ApiError> {
    match raw {
        None => Ok(DEFAULT_PAGE),
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| ApiError::field("limit", "must be a whole number from 1 to 1000")),
    }
}

/// A `GET /credentials` query, checked.
#[derive(Debug, PartialEq, Eq)]
struct ListRequest {
    /// Page size, 1..=1000.
    limit: u32,
    /// The filters.
    query: ListQuery,
}

fn list_request(
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<ListRequest, ApiError> {
    let params = query(params)?;
    let limit = page_limit(params.limit.as_deref())?;
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
    let owner = params
        .owner
        .as_deref()
        .map(attributes::parse_owner)
        .transpose()
        .map_err(|e| ApiError::field("owner", e))?;
    let state = params
        .state
        .as_deref()
        .map(|s| {
            CredentialState::parse(s)
                .ok_or_else(|| ApiError::field("state", "must be active, expired or revoked"))
        })
        .transpose()?;
    let master_key_id = match params.master_key_id {
        Some(id) if !attributes::is_master_key_id(&id) => {
            return Err(ApiError::field(
                "master_key_id",
                "must be 16 lowercase hexadecimal characters",
            ));
        }
        id => id,
    };
    Ok(ListRequest {
        limit,
        query: ListQuery {
            after,
            active,
            owner,
            state,
            master_key_id,
            limit: 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ak_0123456789abcdefghijklmnopqrstuv";
    const SECRET: &str = "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo";

    #[test]
    fn identity_headers_name_each_value_given() {
        let value = HeaderValue::from_static;
        for owner in [None, Some(value("alice"))] {
            for scopes in [None, Some(value("a:b c"))] {
                let headers = identity_headers(value(KEY), owner.clone(), scopes.clone());
                assert_eq!(headers.get(&CREDENTIAL_KEY), Some(&value(KEY)));
                assert_eq!(headers.get(&CREDENTIAL_OWNER), owner.as_ref());
                assert_eq!(headers.get(&CREDENTIAL_SCOPES), scopes.as_ref());
                assert_eq!(headers.get(header::CONTENT_LENGTH), Some(&value("0")));
                let present = 2 + usize::from(owner.is_some()) + usize::from(scopes.is_some());
                assert_eq!(headers.len(), present);
            }
        }
    }

    fn pair_of(body: &[u8]) -> Result<(ApiKey, ApiSecret), ApiError> {
        parse_object(body).and_then(|fields| parse_pair(&fields))
    }

    fn message(body: &str) -> String {
        match pair_of(body.as_bytes()) {
            Err(ApiError::InvalidField(message)) => message,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn a_well_formed_body_parses() {
        let (key, secret) = pair_of(
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
            (r#"{"":1,"":2}"#.to_owned(), r#""""#),
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

    // ---- Properties ----------------------------------------------------------------------

    use crate::credential::testing::{
        CANONICAL_SECRET, KEY_FORM, any_text, key_like, secret_like, valid_key, valid_secret,
    };
    use axum::http::Uri;
    use proptest::prelude::*;

    /// What serde_json itself makes of a body, and what the duplicate-refusing reader does.
    fn both(text: &str) -> (Result<Value, String>, serde_json::Result<Value>) {
        let path = RefCell::new(Vec::new());
        let mut json = serde_json::Deserializer::from_str(text);
        let ours = UniqueKeys { path: &path }
            .deserialize(&mut json)
            .and_then(|v| json.end().map(|()| v))
            .map_err(|e| format!("{e} at {:?}", path.borrow()));
        (ours, serde_json::from_str(text))
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
            any_text().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec(("[a-z_]{0,3}|\\PC{0,8}", inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// A top-level key: how a body spells it, and the key it means.
    fn body_key() -> impl Strategy<Value = (&'static str, &'static str)> {
        proptest::sample::select(vec![
            (r#""api_key""#, "api_key"),
            (r#""api\u005fkey""#, "api_key"),
            (r#""api_secret""#, "api_secret"),
            (r#""api_secret ""#, "api_secret "),
            (r#""x""#, "x"),
            (r#""""#, ""),
        ])
    }

    fn body_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => key_like().prop_map(Value::String),
            3 => secret_like().prop_map(Value::String),
            1 => json_value(),
        ]
    }

    /// The outcome SPEC §2 gives a register body with these top-level entries: the pair, or
    /// the name the 400's message starts with.
    fn register_outcome(entries: &[(&str, &str, Value)]) -> Result<(String, String), String> {
        let mut seen = std::collections::HashSet::new();
        for (_, key, _) in entries {
            if !seen.insert(*key) {
                let name = if key.is_empty() { "\"\"" } else { key };
                return Err(format!("{name} appears more than once"));
            }
        }
        let field = |name: &str| -> Result<String, String> {
            match entries.iter().find(|(_, k, _)| *k == name) {
                Some((_, _, Value::String(s))) => Ok(s.clone()),
                Some(_) => Err(format!("{name} must be a string")),
                None => Err(format!("{name} is missing")),
            }
        };
        let key = field("api_key")?;
        if !KEY_FORM.is_match(&key) {
            return Err("api_key ".into());
        }
        let secret = field("api_secret")?;
        if !CANONICAL_SECRET.is_match(&secret) {
            return Err("api_secret ".into());
        }
        Ok((key, secret))
    }

    /// `s` percent-encoded: every byte outside the unreserved set, or every byte at all.
    fn encode(s: &str, everything: bool) -> String {
        s.bytes()
            .map(|b| {
                if !everything && (b.is_ascii_alphanumeric() || b"-._~".contains(&b)) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    }

    fn list(query: &str) -> Result<ListRequest, ApiError> {
        let uri = Uri::try_from(format!("/credentials?{query}")).unwrap();
        list_request(Query::try_from_uri(&uri))
    }

    /// The outcome SPEC §2 gives a list query of these (decoded) parameters: the request, or
    /// the start of the 400's message.
    fn list_outcome(params: &[(String, String)]) -> Result<ListRequest, String> {
        let one = |name: &str| {
            let mut values = params.iter().filter(|(n, _)| n == name).map(|(_, v)| v);
            match (values.next(), values.next()) {
                (_, Some(_)) => Err("query string is malformed".to_owned()),
                (value, None) => Ok(value),
            }
        };
        let (limit, after, active) = (one("limit")?, one("after")?, one("active")?);
        let limit = match limit {
            None => 100,
            Some(raw) => {
                // A whole number; `+` and leading zeros are tolerated, as Rust's parser does.
                let digits = raw.strip_prefix('+').unwrap_or(raw);
                let significant = digits.trim_start_matches('0');
                match significant.parse::<u32>() {
                    Ok(n)
                        if digits.bytes().all(|b| b.is_ascii_digit())
                            && (1..=1000).contains(&n) =>
                    {
                        n
                    }
                    _ => return Err("limit ".into()),
                }
            }
        };
        let after = match after {
            None => None,
            Some(raw) if KEY_FORM.is_match(raw) => ApiKey::parse(raw).ok(),
            Some(_) => return Err("after ".into()),
        };
        let active = match active.map(String::as_str) {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(_) => return Err("active ".into()),
        };
        Ok(ListRequest {
            limit,
            query: ListQuery {
                after,
                active,
                ..ListQuery::default()
            },
        })
    }

    /// A query parameter, mostly one of the three with a value near what it takes.
    fn param() -> impl Strategy<Value = (String, String)> {
        let limit = prop_oneof![
            "[+-]?0{0,3}[0-9]{0,5}",
            "[0-9]{8,25}",
            proptest::sample::select(vec!["1", "100", "1000", "1001", "0", " 5", "5 ", "5.0"])
                .prop_map(String::from),
        ];
        let active = proptest::sample::select(vec![
            "true", "false", "TRUE", "False", "1", "0", "yes", "", " true", "true ",
        ])
        .prop_map(String::from);
        let other_name = prop_oneof![
            proptest::sample::select(vec!["LIMIT", "limit ", "other", "", "after[]"])
                .prop_map(String::from),
            any_text(),
        ];
        let value = prop_oneof![limit.clone(), active.clone(), key_like(), any_text()];
        prop_oneof![
            2 => limit.prop_map(|v| ("limit".to_owned(), v)),
            2 => key_like().prop_map(|v| ("after".to_owned(), v)),
            2 => active.prop_map(|v| ("active".to_owned(), v)),
            1 => (prop_oneof![
                proptest::sample::select(vec!["limit", "after", "active"]).prop_map(String::from),
                other_name,
            ], value),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn without_repeated_keys_the_body_reads_as_serde_json_reads_it(
            value in json_value(),
            pretty in any::<bool>(),
        ) {
            let text = if pretty {
                serde_json::to_string_pretty(&value)
            } else {
                serde_json::to_string(&value)
            }
            .unwrap();
            let (ours, theirs) = both(&text);
            prop_assert_eq!(ours, Ok(theirs.unwrap()));
            if !value.is_object() {
                prop_assert_eq!(
                    pair_of(text.as_bytes()).unwrap_err().to_string(),
                    "request body must be a JSON object"
                );
            }
        }

        #[test]
        fn a_register_body_is_accepted_exactly_when_the_spec_says(
            entries in prop_oneof![
                prop::collection::vec((body_key(), body_value()), 0..6),
                // A good pair among a few other entries, in any order.
                (
                    valid_key(),
                    valid_secret(),
                    prop::collection::vec((body_key(), body_value()), 0..2),
                )
                    .prop_flat_map(|(key, secret, extra)| {
                        let mut entries = vec![
                            ((r#""api_key""#, "api_key"), Value::String(key)),
                            ((r#""api_secret""#, "api_secret"), Value::String(secret)),
                        ];
                        entries.extend(extra);
                        Just(entries).prop_shuffle()
                    }),
            ],
            space in "[ \t\r\n]{0,2}",
        ) {
            let entries: Vec<(&str, &str, Value)> =
                entries.into_iter().map(|((raw, key), v)| (raw, key, v)).collect();
            let body = format!(
                "{space}{{{}}}{space}",
                entries
                    .iter()
                    .map(|(raw, _, v)| format!("{raw}{space}:{space}{v}"))
                    .collect::<Vec<_>>()
                    .join(&format!("{space},"))
            );
            match (pair_of(body.as_bytes()), register_outcome(&entries)) {
                (Ok((key, secret)), Ok((k, s))) => {
                    prop_assert_eq!(key.as_str(), k.as_str());
                    prop_assert_eq!(secret.expose(), s);
                }
                (Err(ApiError::InvalidField(message)), Err(start)) => {
                    prop_assert!(message.starts_with(&start), "{body}: {message:?}, want {start:?}");
                }
                (got, want) => prop_assert!(false, "{body}: got {got:?}, want {want:?}"),
            }
        }

        #[test]
        fn any_bytes_are_a_pair_or_a_400(body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            "[{}\\[\\]\":, a-z_0-9\\\\]{0,60}".prop_map(String::into_bytes),
        ]) {
            match pair_of(&body) {
                Ok((key, secret)) => {
                    let value: Value = serde_json::from_slice(&body).unwrap();
                    prop_assert_eq!(value["api_key"].as_str(), Some(key.as_str()));
                    let secret = secret.expose();
                    prop_assert_eq!(value["api_secret"].as_str(), Some(secret.as_str()));
                }
                Err(ApiError::InvalidField(_)) => {}
                Err(other) => prop_assert!(false, "{other:?}"),
            }
        }

        #[test]
        fn a_list_query_is_accepted_exactly_when_the_spec_says(
            params in prop::collection::vec(param(), 0..4),
            everything in any::<bool>(),
            bare in any::<bool>(),
        ) {
            let query = params
                .iter()
                .map(|(n, v)| match (v.is_empty() && bare, encode(n, everything), encode(v, everything)) {
                    (true, n, _) => n,
                    (false, n, v) => format!("{n}={v}"),
                })
                .collect::<Vec<_>>()
                .join("&");
            // Empty names are skipped by the decoder, with their values.
            let decoded: Vec<(String, String)> =
                params.into_iter().filter(|(n, _)| !n.is_empty()).collect();
            match (list(&query), list_outcome(&decoded)) {
                (Ok(got), Ok(want)) => prop_assert_eq!(got, want),
                (Err(ApiError::InvalidField(message)), Err(start)) => {
                    prop_assert!(message.starts_with(&start), "{query}: {message:?}, want {start:?}");
                }
                (got, want) => prop_assert!(false, "{query}: got {got:?}, want {want:?}"),
            }
        }

        #[test]
        fn any_query_is_a_request_or_a_400(query in prop_oneof![
            "[a-zA-Z0-9=&%+._~-]{0,60}",
            "((limit|after|active)=[0-9a-z%+_-]{0,12}&?){0,4}",
            any_text().prop_map(|t| encode(&t, false)),
        ]) {
            match list(&query) {
                Ok(request) => prop_assert!((1..=1000).contains(&request.limit)),
                Err(ApiError::InvalidField(message)) => prop_assert!(
                    ["query string is malformed", "limit ", "after ", "active ", "owner ", "state ", "master_key_id "]
                        .iter()
                        .any(|start| message.starts_with(start)),
                    "{message}"
                ),
                Err(other) => prop_assert!(false, "{other:?}"),
            }
        }
    }
}
