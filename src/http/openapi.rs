//! The OpenAPI 3.1 document served at `GET /openapi.json` (SPEC §9). Each handler describes
//! its own parameters, body and answers (`#[utoipa::path]`); who may call a route, the scope
//! it needs and the errors that follow from that are added from the route table itself, so
//! the document cannot claim an access rule the router does not enforce.

use std::sync::OnceLock;

use axum::body::Bytes;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{OpenApi, ToSchema};

use super::guard::Need;
use super::{Admits, Declared, handlers};
use crate::attributes::State;
use crate::audit::Event;
use crate::credential::ApiKey;
use crate::store::CredentialRecord;

/// The parts of the document the handlers' annotations give.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "credgate",
        description = "Self-hosted API credential service: derived key/secret pairs, scopes, \
                       revocation, forward authentication and an audit log.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        handlers::health,
        handlers::ready,
        handlers::metrics,
        serve,
        super::console::page,
        super::console::script,
        super::console::style,
        handlers::register,
        handlers::list,
        handlers::issue,
        handlers::get_one,
        handlers::revoke,
        handlers::update,
        handlers::roll,
        handlers::audit,
        handlers::verify,
    ),
    components(schemas(ErrorBody, State, CredentialRecord, Event))
)]
struct Annotated;

/// `GET /openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)),
)]
pub(super) async fn serve() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        json_document(),
    )
        .into_response()
}

/// The document as served, built once: it depends on the code alone.
fn json_document() -> Bytes {
    static DOCUMENT: OnceLock<Bytes> = OnceLock::new();
    DOCUMENT
        .get_or_init(|| {
            let document = document(&super::table().declared);
            // Serializing a `Value` cannot fail: its keys are strings.
            Bytes::from(serde_json::to_vec(&document).unwrap_or_default())
        })
        .clone()
}

/// Names of the two security schemes, one per credential header; a credential is both.
const KEY_SCHEME: &str = "api_key";
const SECRET_SCHEME: &str = "api_secret";

/// The whole document: the annotations, completed from the route table.
pub(super) fn document(declared: &[Declared]) -> Value {
    let mut doc = serde_json::to_value(Annotated::openapi()).unwrap_or_default();
    // `/auth/verify/{*path}` is annotated; its two siblings answer the same without the path.
    // One operation per method and path, each with its own id.
    let under = doc["paths"]["/auth/verify/{path}"].take();
    for (path, suffix) in [
        ("/auth/verify", ""),
        ("/auth/verify/", "_slash"),
        ("/auth/verify/{path}", "_path"),
    ] {
        let mut item = under.clone();
        if let Value::Object(item) = &mut item {
            for (method, op) in item.iter_mut() {
                op["operationId"] = Value::String(format!("verify_{method}{suffix}"));
                if suffix != "_path"
                    && let Some(Value::Array(parameters)) = op.get_mut("parameters")
                {
                    parameters.retain(|p| p["in"] != "path");
                }
            }
        }
        doc["paths"][path] = item;
    }

    doc["components"]["securitySchemes"] = json!({
        KEY_SCHEME: {"type": "apiKey", "in": "header", "name": "X-Api-Key",
                     "description": "The credential's public key, `ak_…`."},
        SECRET_SCHEME: {"type": "apiKey", "in": "header", "name": "X-Api-Secret",
                        "description": "The credential's secret, `sk_…`: never logged, never forwarded by the proxies configured as the README shows."},
    });
    doc["components"]["responses"] = shared_responses();

    // A body the handler allows to be absent is `required: false`, never `null`.
    if let Some(Value::Object(paths)) = doc.get_mut("paths") {
        for op in paths
            .values_mut()
            .filter_map(Value::as_object_mut)
            .flat_map(|i| i.values_mut())
        {
            if let Some(body) = op.get_mut("requestBody") {
                optional_not_null(body);
            }
        }
    }
    for route in declared {
        let path = openapi_path(route.path);
        for method in &route.methods {
            let method = method.as_str().to_ascii_lowercase();
            let Some(Value::Object(op)) = doc["paths"][&path].get_mut(&method) else {
                // A route without its annotation: the unit test below names it.
                continue;
            };
            complete(op, route.caller);
        }
    }
    doc
}

/// Turns a body schema `oneOf: [X, null]` (utoipa's `Option<X>`) into `X`, not required.
fn optional_not_null(body: &mut Value) {
    let Some(Value::Object(content)) = body.get_mut("content") else {
        return;
    };
    let mut optional = false;
    for media in content.values_mut() {
        let Some(Value::Array(choices)) = media["schema"].get("oneOf").cloned() else {
            continue;
        };
        let mut rest: Vec<Value> = choices
            .into_iter()
            .filter(|c| c.get("type") != Some(&json!("null")))
            .collect();
        if rest.len() == 1 {
            media["schema"] = rest.remove(0);
            optional = true;
        }
    }
    if optional {
        body["required"] = json!(false);
    }
}

/// An axum path in OpenAPI's syntax: `{*rest}` becomes `{rest}`.
pub(super) fn openapi_path(path: &str) -> String {
    path.replace("{*", "{")
}

/// Adds to one operation what follows from who may call it: its security requirement and
/// the answers the guard, the scope check and the middleware give.
fn complete(op: &mut serde_json::Map<String, Value>, caller: Admits) {
    let credential = |scopes: &[&str]| json!({ KEY_SCHEME: scopes, SECRET_SCHEME: [] });
    let reads_body = op.contains_key("requestBody");
    let mut respond = |status: &str, name: &str| {
        let responses = op
            .entry("responses")
            .or_insert_with(|| json!({}))
            .as_object_mut();
        if let Some(responses) = responses {
            responses
                .entry(status)
                .or_insert_with(|| json!({ "$ref": format!("#/components/responses/{name}") }));
        }
    };
    respond("408", "Timeout");
    respond("500", "Internal");
    // Every route that reads a body reads it through the same limit and media-type check.
    if reads_body {
        respond("413", "PayloadTooLarge");
        respond("415", "UnsupportedMediaType");
    }
    let security = match caller {
        Admits::Anyone => json!([]),
        Admits::AnyoneOrCredential => {
            respond("401", "Unauthorized");
            json!([{}, credential(&[])])
        }
        Admits::Credential => {
            respond("401", "Unauthorized");
            json!([credential(&[])])
        }
        Admits::Holding(need) => {
            respond("401", "Unauthorized");
            respond("403", "InsufficientScope");
            let (scope, rule) = match need {
                Need::Scope(scope) => (scope, format!("Needs the scope `{scope}` (or `*`).")),
                Need::ScopeOrSelf(scope) => (
                    scope,
                    format!(
                        "Needs the scope `{scope}` (or `*`), unless `{{api_key}}` is the caller's own key."
                    ),
                ),
            };
            let description = op
                .get("description")
                .and_then(Value::as_str)
                .map_or(rule.clone(), |d| format!("{d}\n\n{rule}"));
            op.insert("description".into(), Value::String(description));
            op.insert("x-required-scope".into(), Value::String(scope.into()));
            json!([credential(&[scope])])
        }
    };
    op.insert("security".into(), security);
}

/// The error answers many operations share.
fn shared_responses() -> Value {
    let error = |description: &str| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        })
    };
    let mut unauthorized = error(
        "`UNAUTHORIZED`: a credential header is missing, repeated or malformed, or the pair is \
         forged, unknown, revoked or expired. The answer never says which.",
    );
    unauthorized["headers"] = json!({
        "WWW-Authenticate": {"schema": {"type": "string"}, "description": "`ApiKey realm=\"credgate\"`"}
    });
    json!({
        "Unauthorized": unauthorized,
        "InsufficientScope": error("`INSUFFICIENT_SCOPE`: the credential lacks the scope this operation needs; the message names it."),
        "Timeout": error("`REQUEST_TIMEOUT`: the request took longer than `--request-timeout`."),
        "PayloadTooLarge": error("`PAYLOAD_TOO_LARGE`: the body is over 65 536 bytes."),
        "UnsupportedMediaType": error("`UNSUPPORTED_MEDIA_TYPE`: a body not declared as JSON."),
        "Internal": error("`INTERNAL_ERROR`: the database or the service failed; the cause is logged, never shown."),
    })
}

/// Every error's body (SPEC §2).
// The documented type is the one `ApiError` writes, straight from its code and message (no
// JSON map in between). The doc comment above is the schema's description.
#[derive(ToSchema, Serialize)]
#[schema(as = Error)]
pub(super) struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// The error itself.
#[derive(ToSchema, Serialize)]
pub(super) struct ErrorDetail<'a> {
    /// A stable machine code, such as `INVALID_FIELD`.
    #[schema(pattern = "^[A-Z_]+$", example = "INVALID_FIELD")]
    code: &'a str,
    /// Text for people; for `INVALID_FIELD` it starts with the field's name.
    message: &'a str,
}

impl<'a> ErrorBody<'a> {
    pub(super) fn new(code: &'a str, message: &'a str) -> Self {
        Self {
            error: ErrorDetail { code, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every route the router serves is in the document with each of its methods, and the
    /// document describes no other.
    #[test]
    fn the_document_describes_every_route_and_no_other() {
        let declared = super::super::table().declared;
        let doc = document(&declared);
        let served: BTreeSet<(String, String)> = declared
            .iter()
            .flat_map(|d| {
                d.methods
                    .iter()
                    .map(|m| (m.as_str().to_ascii_lowercase(), openapi_path(d.path)))
            })
            .collect();
        let described: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| !matches!(k.as_str(), "parameters" | "summary" | "description"))
                    .map(|m| (m.clone(), path.clone()))
            })
            .collect();
        assert_eq!(served, described);
        assert_eq!(doc["openapi"], "3.1.0");
        // Access as the table declares it: open, optional, any credential, a scope.
        let security = |path: &str, method: &str| doc["paths"][path][method]["security"].clone();
        assert_eq!(security("/health", "get"), json!([]));
        assert_eq!(
            security("/credentials", "post"),
            json!([{}, {"api_key": [], "api_secret": []}])
        );
        assert_eq!(
            security("/auth/verify/{path}", "trace"),
            json!([{"api_key": [], "api_secret": []}])
        );
        assert_eq!(
            security("/audit", "get"),
            json!([{"api_key": ["audit:read"], "api_secret": []}])
        );
        assert!(doc["paths"]["/audit"]["get"]["responses"]["403"].is_object());
        assert!(doc["paths"]["/credentials"]["post"]["responses"]["403"].is_object());
        assert!(doc["paths"]["/health"]["get"]["responses"]["401"].is_null());
        // Every operation with a body answers the body limit and media type; none other.
        for (path, method) in [
            ("/credentials", "post"),
            ("/credentials/{api_key}/roll", "post"),
        ] {
            let responses = &doc["paths"][path][method]["responses"];
            assert!(
                responses["413"].is_object() && responses["415"].is_object(),
                "{path}"
            );
        }
        assert!(doc["paths"]["/audit"]["get"]["responses"]["415"].is_null());
    }
}

/// `{"status": …}` of `/health` and `/ready`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct Status {
    /// `ok` or `ready`.
    status: String,
}

/// `POST /credentials`: a pair, and attributes (which need `credentials:write`, except
/// `name` and `expires_at`). Other fields are ignored; `null` is the same as absent.
#[derive(ToSchema)]
#[schema(as = Register)]
#[allow(dead_code)]
pub(super) struct RegisterBody {
    /// The public key.
    #[schema(pattern = "^ak_[A-Za-z0-9]{16,64}$")]
    api_key: String,
    /// Its secret: the derivation of `api_key` under the master key, canonical base64url.
    #[schema(pattern = "^sk_[A-Za-z0-9_-]{43}$")]
    api_secret: String,
    /// A label for people: 1 to 200 characters, no control characters.
    #[schema(pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]{1,200}$")]
    name: Option<String>,
    /// Whom it belongs to: 1 to 200 of `A-Z a-z 0-9 . _ : @ / -`.
    #[schema(pattern = "^[A-Za-z0-9._:@/-]{1,200}$")]
    owner: Option<String>,
    /// Free-form attributes: a JSON object of at most 4 096 bytes.
    #[schema(value_type = Option<Object>)]
    meta: Option<Value>,
    /// What it may do; the registration policy's defaults when absent.
    #[schema(max_items = 32, inline)]
    scopes: Option<Vec<Scope>>,
    /// When it stops authenticating: RFC 3339 with an offset, in the future.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

/// A scope: `*` (every scope) or `[a-z0-9][a-z0-9:._-]{0,63}`.
#[derive(Deserialize, ToSchema)]
#[schema(pattern = "^(\\*|[a-z0-9][a-z0-9:._-]{0,63})$")]
#[allow(dead_code)]
pub(super) struct Scope(String);

/// `POST /credentials/issue`: the new credential's attributes, all optional; the body may be
/// empty. Scopes default to none, and the caller grants only scopes it holds.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Issue)]
#[allow(dead_code)]
pub(super) struct IssueBody {
    /// A label for people: 1 to 200 characters, no control characters.
    #[schema(pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]{1,200}$")]
    name: Option<String>,
    /// Whom it belongs to: 1 to 200 of `A-Z a-z 0-9 . _ : @ / -`.
    #[schema(pattern = "^[A-Za-z0-9._:@/-]{1,200}$")]
    owner: Option<String>,
    /// Free-form attributes: a JSON object of at most 4 096 bytes.
    #[schema(value_type = Option<Object>)]
    meta: Option<Value>,
    /// What it may do.
    #[schema(max_items = 32, inline)]
    scopes: Option<Vec<Scope>>,
    /// When it stops authenticating: RFC 3339 with an offset, in the future.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

/// `PATCH /credentials/{api_key}`: at least one attribute; each given one replaces the stored
/// one, and `null` clears `name`, `owner` and `expires_at`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Update, min_properties = 1)]
#[allow(dead_code)]
pub(super) struct UpdateBody {
    /// A label for people: 1 to 200 characters, no control characters; `null` clears it.
    #[schema(pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]{1,200}$")]
    name: Option<String>,
    /// Whom it belongs to; `null` clears it.
    #[schema(pattern = "^[A-Za-z0-9._:@/-]{1,200}$")]
    owner: Option<String>,
    /// Free-form attributes: a JSON object of at most 4 096 bytes.
    #[serde(default)]
    #[schema(value_type = Object)]
    meta: Value,
    /// What it may do: the caller grants only scopes it holds.
    #[serde(default)]
    #[schema(max_items = 32, inline)]
    scopes: Vec<Scope>,
    /// When it stops authenticating: RFC 3339 with an offset, in the future; `null` clears it.
    #[schema(format = DateTime)]
    expires_at: Option<String>,
}

/// `POST /credentials/{api_key}/roll`: the body may be empty.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Roll)]
#[allow(dead_code)]
pub(super) struct RollBody {
    /// How many more seconds the old key works (default 86 400, at most 30 days).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2_592_000)]
    grace_seconds: i64,
}

/// `POST /credentials`' answer, serialized as it is documented (straight from the key, not
/// through a JSON map: registration is the high-volume write).
#[derive(ToSchema, Serialize)]
pub(super) struct Registered {
    /// The key registered.
    #[serde(serialize_with = "key_text")]
    #[schema(value_type = String)]
    pub(super) api_key: ApiKey,
}

fn key_text<S: serde::Serializer>(key: &ApiKey, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(key.as_str())
}

/// `DELETE /credentials/{api_key}`'s answer.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct Revoked {
    /// The key revoked.
    api_key: String,
    /// Always `true`.
    revoked: bool,
}

/// A page of credentials.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct CredentialPage {
    /// At most `limit` credentials, in key order.
    credentials: Vec<CredentialRecord>,
    /// The `after` of the next page; `null` on the last one.
    next: Option<String>,
}

/// A page of the audit log.
#[derive(ToSchema)]
#[allow(dead_code)]
pub(super) struct EventPage {
    /// At most `limit` events, oldest first.
    events: Vec<Event>,
    /// The `after` of the next page; `null` on the last one.
    next: Option<String>,
}

/// A credential minted by the service, with its secret: shown this once, never again.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub(super) struct WithSecret {
    #[serde(flatten)]
    credential: CredentialRecord,
    /// The secret. Store it now: credgate keeps no copy it could show again.
    #[schema(pattern = "^sk_[A-Za-z0-9_-]{43}$")]
    api_secret: String,
    /// On a roll, the key it replaces.
    rolled_from: Option<String>,
}

/// The `{api_key}` of a path. A malformed one is `404 CREDENTIAL_NOT_FOUND`, like an unknown one.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub(super) struct KeyPath {
    /// The credential's key.
    #[param(pattern = "^ak_[A-Za-z0-9]{16,64}$")]
    api_key: String,
}

/// The request id an operation that changes something records in the audit log.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub(super) struct RequestId {
    /// Kept when it is 1 to 128 visible ASCII characters; otherwise (or when absent) a
    /// random one is recorded.
    #[param(rename = "X-Request-Id")]
    request_id: Option<String>,
}

/// Page size of the paged lists.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct Limit {
    /// At most this many items (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}
