//! One small HTTP client for the service: the server's address and a `reqwest::Client`, with
//! one method per endpoint. `TestApp` (the application in process) and `ServerProcess` (the
//! real binary) both dereference to one, so a test talks to either in the same words.

use std::net::SocketAddr;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::credentials::{Pair, mint};

/// A client of one running server.
pub struct Client {
    /// Where the server listens.
    pub addr: SocketAddr,
    /// The underlying client, for requests no method below makes.
    pub http: reqwest::Client,
    /// Where credgate's API is mounted: empty, or a prefix when another service embeds it.
    prefix: &'static str,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self::under(addr, "")
    }

    /// A client of credgate's API mounted under `prefix` by a service that embeds it.
    pub fn under(addr: SocketAddr, prefix: &'static str) -> Self {
        Self {
            addr,
            http: reqwest::Client::new(),
            prefix,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.addr, self.prefix, path)
    }

    /// A request, authenticated with `auth` when given.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        auth: Option<&Pair>,
    ) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, self.url(path));
        if let Some(p) = auth {
            req = req
                .header("X-Api-Key", &p.key)
                .header("X-Api-Secret", &p.secret);
        }
        req
    }

    pub async fn send(&self, method: Method, path: &str, auth: Option<&Pair>) -> reqwest::Response {
        self.request(method, path, auth).send().await.expect("send")
    }

    /// POST /credentials with a JSON body.
    pub async fn register_json(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/credentials"))
            .json(body)
            .send()
            .await
            .expect("send")
    }

    /// POST /credentials with a JSON body, authenticated as `by` when given.
    pub async fn register_as(&self, body: &Value, by: Option<&Pair>) -> reqwest::Response {
        self.request(Method::POST, "/credentials", by)
            .json(body)
            .send()
            .await
            .expect("send")
    }

    /// Mints and registers a pair with these attributes as `by`, asserting 201.
    pub async fn registered_with(&self, attributes: Value, by: Option<&Pair>) -> Pair {
        let pair = mint();
        let mut body = attributes;
        body["api_key"] = pair.key.clone().into();
        body["api_secret"] = pair.secret.clone().into();
        let resp = self.register_as(&body, by).await;
        assert_eq!(resp.status(), StatusCode::CREATED, "{body}");
        pair
    }

    /// PATCH /credentials/{target} with a JSON body as `by`.
    pub async fn update(&self, target: &str, body: &Value, by: &Pair) -> reqwest::Response {
        self.request(Method::PATCH, &format!("/credentials/{target}"), Some(by))
            .json(body)
            .send()
            .await
            .expect("send")
    }

    /// POST /credentials with `pair`.
    pub async fn register(&self, pair: &Pair) -> reqwest::Response {
        self.register_json(&serde_json::json!({ "api_key": pair.key, "api_secret": pair.secret }))
            .await
    }

    /// Mints and registers a pair, asserting 201.
    pub async fn registered(&self) -> Pair {
        let pair = mint();
        let resp = self.register(&pair).await;
        assert_eq!(resp.status(), StatusCode::CREATED);
        pair
    }

    /// GET /audit?{query} as `by`, asserting 200: the page's events, oldest first.
    pub async fn events(&self, query: &str, by: &Pair) -> Vec<Value> {
        let resp = self
            .send(Method::GET, &format!("/audit?{query}"), Some(by))
            .await;
        assert_eq!(resp.status(), StatusCode::OK, "GET /audit?{query}");
        let body: Value = resp.json().await.expect("json");
        body["events"].as_array().expect("events").clone()
    }

    /// DELETE /credentials/{target} as `by`.
    pub async fn revoke(&self, target: &str, by: &Pair) -> reqwest::Response {
        self.send(Method::DELETE, &format!("/credentials/{target}"), Some(by))
            .await
    }

    /// GET /credentials/{key} as `by`, parsed.
    pub async fn record(&self, key: &str, by: &Pair) -> Value {
        self.send(Method::GET, &format!("/credentials/{key}"), Some(by))
            .await
            .json()
            .await
            .expect("record json")
    }

    /// Status of GET /auth/verify with `pair`.
    pub async fn verify(&self, pair: &Pair) -> StatusCode {
        self.send(Method::GET, "/auth/verify", Some(pair))
            .await
            .status()
    }

    /// Status of GET /ready.
    pub async fn ready(&self) -> StatusCode {
        self.send(Method::GET, "/ready", None).await.status()
    }

    /// The value of one series of GET /metrics (the exact series text before the value).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .send(Method::GET, "/metrics", None)
            .await
            .text()
            .await
            .expect("body");
        metric_value(&text, series)
    }
}

/// An `expires_at` value `seconds` from now (in the past when negative), as the API writes it.
pub fn in_seconds(seconds: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(seconds))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `(event, api_key)` of each audit event, in order.
pub fn event_kinds(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().expect("event").to_owned(),
                e["api_key"].as_str().expect("api_key").to_owned(),
            )
        })
        .collect()
}

/// The value of one series in a metrics text (the exact series text before the value).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().expect("metric value"))
        .unwrap_or_else(|| panic!("series {series} not in metrics:\n{text}"))
}

/// Asserts an error response: status, JSON content type, and the `{"error":{code,message}}`
/// shape with the given code. Returns the body.
pub async fn assert_error(resp: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(resp.status(), status, "status");
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("application/json"), "content-type {ct:?}");
    let body: Value = resp.json().await.expect("json body");
    assert_eq!(body["error"]["code"], code, "body {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "message in {body}"
    );
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "only `error` in {body}"
    );
    body
}
