//! The library way (SPEC §9): `examples/embedded.rs`, compiled into this binary, served over
//! real HTTP. Its own routes are authenticated in-process by `credgate::layer::Authenticate`
//! with the same cache and database as credgate's API, which it mounts under `/credgate/`.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::embedded_example;
use crate::helpers::client::Client;
use crate::helpers::credentials::{MASTER_HEX, forged, mint};

const AUTH_OK: &str = "credgate_auth_results_total{result=\"ok\"}";

/// Starts the example on a free port, its data in a fresh directory.
async fn start() -> (Client, Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.hex");
    std::fs::write(&key_file, format!("{MASTER_HEX}\n")).unwrap();
    let mut config = credgate::Config::new(dir.path());
    config.master_key_file = Some(key_file);
    let state = credgate::startup::open(&config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if let Err(e) = embedded_example::serve(listener, state).await {
            panic!("the example stopped: {e:#}");
        }
    });
    (Client::new(addr), Client::under(addr, "/credgate"), dir)
}

async fn error_code(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_example_authenticates_its_routes_with_the_layer() {
    let (app, credgate, _dir) = start().await;
    assert_eq!(
        app.send(Method::GET, "/health", None).await.status(),
        StatusCode::OK
    );
    // Credentials are registered through credgate's own API, mounted by the example.
    let admin = credgate.registered().await;
    let reader = credgate
        .registered_with(
            json!({"owner": "acme", "scopes": ["orders:read"]}),
            Some(&admin),
        )
        .await;

    // The handler sees who called, and never the secret.
    let resp = app.send(Method::GET, "/whoami", Some(&reader)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let who: Value = resp.json().await.unwrap();
    assert_eq!(
        who,
        json!({"api_key": reader.key, "owner": "acme", "scopes": ["orders:read"], "secret_header_seen": false})
    );

    // Every failure is credgate's one 401, with its body and challenge.
    let unknown = mint();
    for pair in [None, Some(&unknown), Some(&forged())] {
        let resp = app.send(Method::GET, "/whoami", pair).await;
        assert_eq!(
            resp.headers()["www-authenticate"],
            "ApiKey realm=\"credgate\""
        );
        assert_eq!(
            error_code(resp).await,
            (StatusCode::UNAUTHORIZED, "UNAUTHORIZED".into())
        );
    }
    let only_key = app
        .request(Method::GET, "/whoami", None)
        .header("X-Api-Key", &reader.key)
        .send()
        .await
        .unwrap();
    assert_eq!(only_key.status(), StatusCode::UNAUTHORIZED);

    // Scopes per route: reading needs orders:read, writing orders:write (`*` holds both).
    let before = credgate.metric(AUTH_OK).await;
    assert_eq!(
        app.send(Method::GET, "/orders", Some(&reader))
            .await
            .status(),
        StatusCode::OK
    );
    // The route's scope check reuses what the outer layer authenticated: one authentication.
    assert_eq!(credgate.metric(AUTH_OK).await - before, 1.0);
    let resp = app.send(Method::POST, "/orders", Some(&reader)).await;
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("INSUFFICIENT_SCOPE") && body.contains("orders:write"),
        "{body}"
    );
    let resp = app.send(Method::POST, "/orders", Some(&admin)).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"order": 1, "by": admin.key})
    );

    // A revocation through credgate's API reaches the layer's cache at once: the reader was
    // cached by the requests above.
    assert_eq!(
        credgate.revoke(&reader.key, &admin).await.status(),
        StatusCode::OK
    );
    let resp = app.send(Method::GET, "/whoami", Some(&reader)).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // And a narrowing of scopes too.
    let narrowed = credgate
        .registered_with(
            json!({"scopes": ["orders:read", "orders:write"]}),
            Some(&admin),
        )
        .await;
    assert_eq!(
        app.send(Method::POST, "/orders", Some(&narrowed))
            .await
            .status(),
        StatusCode::CREATED
    );
    let resp = credgate
        .update(&narrowed.key, &json!({"scopes": ["orders:read"]}), &admin)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = app.send(Method::POST, "/orders", Some(&narrowed)).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

/// The example as built (`cargo test` builds every example): started as its README comment
/// says, with a master key it generates, and a pair minted by `credgate issue` from the same
/// data directory.
#[tokio::test]
async fn the_embedded_example_runs_as_documented() {
    use std::io::{BufRead, BufReader};
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_credgate"));
    let example = bin.with_file_name("examples").join("embedded");
    assert!(
        example.exists(),
        "{} is missing: `cargo test` builds it (a filtered `cargo test --test api` does not)",
        example.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(&example)
        .args(["127.0.0.1:0", dir.path().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    let (app, credgate) = (Client::new(addr), Client::under(addr, "/credgate"));
    let minted = crate::helpers::server_process::binary()
        .args(["issue", "--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let pair: Value = serde_json::from_slice(&minted.stdout).unwrap();
    let pair = crate::helpers::credentials::Pair {
        key: pair["api_key"].as_str().unwrap().to_owned(),
        secret: pair["api_secret"].as_str().unwrap().to_owned(),
    };
    assert_eq!(
        app.send(Method::GET, "/whoami", Some(&pair)).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(credgate.register(&pair).await.status(), StatusCode::CREATED);
    let resp = app.send(Method::GET, "/whoami", Some(&pair)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["api_key"], pair.key);
    child.kill().unwrap();
    child.wait().unwrap();
}
