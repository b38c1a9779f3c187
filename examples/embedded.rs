//! An API that embeds credgate: its own routes authenticated in-process by
//! `credgate::layer::Authenticate`, with the same cache and database as credgate's own API,
//! which it also serves under `/credgate/` (to register, list and revoke credentials).
//!
//! ```sh
//! cargo run --example embedded -- 127.0.0.1:3000 ./credgate-data
//! eval "$(cargo run -q -- issue --data-dir ./credgate-data --format env | sed 's/^/export /')"
//! curl -s -XPOST localhost:3000/credgate/credentials -H 'Content-Type: application/json' \
//!      -d "{\"api_key\":\"$CREDGATE_API_KEY\",\"api_secret\":\"$CREDGATE_API_SECRET\"}"
//! curl -s localhost:3000/whoami -H "X-Api-Key: $CREDGATE_API_KEY" -H "X-Api-Secret: $CREDGATE_API_SECRET"
//! ```
//!
//! Routes: `GET /health` (open), `GET /whoami` (any credential), `GET /orders` (`orders:read`),
//! `POST /orders` (`orders:write`), and credgate's API under `/credgate/`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::Extension;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use credgate::auth::Caller;
use credgate::http::AppState;
use credgate::layer::Authenticate;
use serde_json::{Value, json};

/// The example's API around credgate's state: what `main` serves, and what its tests run.
pub fn app(credgate: AppState) -> Router {
    let authenticate = Authenticate::new(credgate.auth.clone());
    let api = Router::new()
        .route("/whoami", get(whoami))
        .route(
            "/orders",
            get(list_orders).route_layer(authenticate.clone().require("orders:read")),
        )
        .route(
            "/orders",
            axum::routing::post(create_order)
                .route_layer(authenticate.clone().require("orders:write")),
        )
        .layer(authenticate);
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .merge(api)
        .nest_service(
            "/credgate",
            credgate::http::router(credgate, Duration::from_secs(10)),
        )
}

/// Who called: the layer put the credential in the request's extensions. The secret header
/// never reaches a handler.
async fn whoami(Extension(caller): Extension<Caller>, headers: HeaderMap) -> Json<Value> {
    Json(json!({
        "api_key": caller.key.as_str(),
        "owner": caller.profile.owner(),
        "scopes": caller.profile.scopes().iter().collect::<Vec<_>>(),
        "secret_header_seen": headers.contains_key("x-api-secret"),
    }))
}

async fn list_orders(Extension(caller): Extension<Caller>) -> Json<Value> {
    Json(json!({ "orders": [], "for": caller.key.as_str() }))
}

async fn create_order(Extension(caller): Extension<Caller>) -> (StatusCode, Json<Value>) {
    (
        StatusCode::CREATED,
        Json(json!({ "order": 1, "by": caller.key.as_str() })),
    )
}

/// Serves the example on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, credgate: AppState) -> anyhow::Result<()> {
    axum::serve(listener, app(credgate)).await?;
    Ok(())
}

#[allow(dead_code)] // The tests include this file for `app` and `serve`, not for `main`.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:3000".into())
        .parse()?;
    let data_dir = args.next().unwrap_or_else(|| "./credgate-data".into());
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", listener.local_addr()?);
    // credgate's master key and database, as `credgate serve` would find them in `data_dir`.
    let credgate = credgate::startup::open(&credgate::Config::new(data_dir)).await?;
    serve(listener, credgate).await
}
