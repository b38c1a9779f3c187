//! SPEC §8.1–8.2 and §8.4: server-side issuance, rolling with an overlap window, last used. Every route has
//! allowed, refused and invalid cases; nothing is half-written on any error.

use std::time::Duration;

use chrono::Utc;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::app::{Backend, TestApp, spawn_app};
use crate::helpers::client::{assert_error, in_seconds};
use crate::helpers::credentials::{Pair, deriver, mint};
use crate::helpers::wait::eventually;

contract_tests!(
    issue_mints_a_working_pair_shown_once,
    issue_is_refused_without_the_scope_or_with_bad_fields,
    roll_overlaps_then_only_the_new_pair_works,
    roll_is_refused_on_revoked_expired_unknown_and_bad_input,
    last_used_is_written_once_per_interval_off_the_request_path,
);

/// POST `path` as `by`, with a JSON `body` (none: an empty request body).
async fn post(app: &TestApp, path: &str, body: Option<Value>, by: &Pair) -> reqwest::Response {
    let req = app.request(Method::POST, path, Some(by));
    match body {
        Some(body) => req.json(&body),
        None => req,
    }
    .send()
    .await
    .unwrap()
}

/// POST /credentials/issue as `by`, with `body` (none: an empty request body).
async fn issue(app: &TestApp, body: Option<Value>, by: &Pair) -> reqwest::Response {
    post(app, "/credentials/issue", body, by).await
}

/// POST /credentials/{key}/roll as `by`, with `body` (none: an empty request body).
async fn roll(app: &TestApp, key: &str, body: Option<Value>, by: &Pair) -> reqwest::Response {
    post(app, &format!("/credentials/{key}/roll"), body, by).await
}

/// The pair in a 201 that carries a secret, checking it is marked `no-store`.
async fn minted(resp: reqwest::Response) -> (Pair, Value) {
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(
        resp.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let body: Value = resp.json().await.unwrap();
    let pair = Pair {
        key: body["api_key"].as_str().unwrap().to_owned(),
        secret: body["api_secret"].as_str().unwrap().to_owned(),
    };
    (pair, body)
}

/// The number of registered credentials, as the admin sees them.
async fn count(app: &TestApp, admin: &Pair) -> usize {
    let body: Value = app
        .send(Method::GET, "/credentials?limit=1000", Some(admin))
        .await
        .json()
        .await
        .unwrap();
    body["credentials"].as_array().unwrap().len()
}

async fn issue_mints_a_working_pair_shown_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let expires = in_seconds(3600);
    let (pair, body) = minted(
        issue(
            &app,
            Some(json!({
                "name": "billing", "owner": "acme", "meta": { "tier": 2 },
                "scopes": ["orders:read"], "expires_at": expires,
            })),
            &admin,
        )
        .await,
    )
    .await;
    // Minted with the master key, exactly as `credgate issue` does.
    assert!(pair.key.starts_with("ak_") && pair.key.len() == 35);
    let key = credgate::credential::ApiKey::parse(&pair.key).unwrap();
    assert_eq!(deriver().secret_for(&key).expose(), pair.secret);
    assert_eq!(body["name"], "billing");
    assert_eq!(body["owner"], "acme");
    assert_eq!(body["meta"], json!({ "tier": 2 }));
    assert_eq!(body["scopes"], json!(["orders:read"]));
    assert_eq!(body["expires_at"], expires);
    assert_eq!(body["state"], "active");
    assert_eq!(body["master_key_id"], deriver().key_id());
    assert_eq!(app.verify(&pair).await, StatusCode::NO_CONTENT);
    // The secret is shown once: never again in a read or a listing.
    let record = app
        .send(
            Method::GET,
            &format!("/credentials/{}", pair.key),
            Some(&admin),
        )
        .await
        .text()
        .await
        .unwrap();
    assert!(!record.contains(&pair.secret) && !record.contains("api_secret"));
    let listing = app
        .send(Method::GET, "/credentials", Some(&admin))
        .await
        .text()
        .await
        .unwrap();
    assert!(!listing.contains(&pair.secret));
    // Least privilege: without `scopes`, none; an empty body is an empty request.
    let (bare, body) = minted(issue(&app, None, &admin).await).await;
    assert_eq!(body["scopes"], json!([]));
    assert_eq!(body["name"], Value::Null);
    assert_eq!(app.verify(&bare).await, StatusCode::NO_CONTENT);
    let (_, body) = minted(issue(&app, Some(json!({ "name": null })), &admin).await).await;
    assert_eq!(body["scopes"], json!([]));
}

async fn issue_is_refused_without_the_scope_or_with_bad_fields(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let writer = app
        .registered_with(
            json!({ "scopes": ["credentials:write", "orders:read"] }),
            Some(&admin),
        )
        .await;
    let reader = app
        .registered_with(json!({ "scopes": ["credentials:read"] }), Some(&admin))
        .await;
    let before = count(&app, &admin).await;
    let resp = issue(&app, None, &reader).await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    let resp = app.send(Method::POST, "/credentials/issue", None).await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    // A writer grants only what it holds.
    let resp = issue(&app, Some(json!({ "scopes": ["orders:write"] })), &writer).await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    for (body, field) in [
        (json!({ "scopes": ["Bad"] }), "scopes"),
        (json!({ "owner": "a b" }), "owner"),
        (
            json!({ "expires_at": "2000-01-01T00:00:00Z" }),
            "expires_at",
        ),
        (json!({ "meta": [] }), "meta"),
        (json!({ "api_key": mint().key }), "api_key"),
        (json!([]), "request body"),
    ] {
        let resp = issue(&app, Some(body.clone()), &writer).await;
        let error = assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{body}: {message}");
    }
    let resp = app
        .request(Method::POST, "/credentials/issue", Some(&writer))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_error(
        resp,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    .await;
    assert_eq!(
        count(&app, &admin).await,
        before,
        "a refused issue stored something"
    );
    let (pair, body) =
        minted(issue(&app, Some(json!({ "scopes": ["orders:read"] })), &writer).await).await;
    assert_eq!(body["scopes"], json!(["orders:read"]));
    assert_eq!(app.verify(&pair).await, StatusCode::NO_CONTENT);
}

async fn roll_overlaps_then_only_the_new_pair_works(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let expires = in_seconds(3600);
    let old = app
        .registered_with(
            json!({
                "name": "worker", "owner": "acme", "meta": { "k": 1 },
                "scopes": ["orders:read"], "expires_at": expires,
            }),
            Some(&admin),
        )
        .await;
    assert_eq!(app.verify(&old).await, StatusCode::NO_CONTENT);
    let (new, body) =
        minted(roll(&app, &old.key, Some(json!({ "grace_seconds": 2 })), &admin).await).await;
    assert_ne!(new.key, old.key);
    assert_eq!(body["rolled_from"], old.key);
    for (field, value) in [
        ("name", json!("worker")),
        ("owner", json!("acme")),
        ("meta", json!({ "k": 1 })),
        ("scopes", json!(["orders:read"])),
        // The new one keeps the old one's original expiry.
        ("expires_at", json!(expires)),
    ] {
        assert_eq!(body[field], value, "{field}");
    }
    // Both work in the window; the old one's expiry is now the end of the window.
    assert_eq!(app.verify(&new).await, StatusCode::NO_CONTENT);
    assert_eq!(app.verify(&old).await, StatusCode::NO_CONTENT);
    let record = app.record(&old.key, &admin).await;
    let until =
        chrono::DateTime::parse_from_rfc3339(record["expires_at"].as_str().unwrap()).unwrap();
    let left = until.with_timezone(&Utc) - Utc::now();
    assert!(
        left <= chrono::Duration::seconds(2) && left > chrono::Duration::zero(),
        "{left}"
    );
    let refused = eventually(Duration::from_secs(5), || async {
        app.verify(&old).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(refused, "the old pair still works after the window");
    assert_eq!(app.verify(&new).await, StatusCode::NO_CONTENT);

    // A credential may roll itself, without any scope; grace 0 ends the old one at once.
    let bare = app
        .registered_with(json!({ "scopes": [] }), Some(&admin))
        .await;
    let (rolled, body) =
        minted(roll(&app, &bare.key, Some(json!({ "grace_seconds": 0 })), &bare).await).await;
    assert_eq!(body["scopes"], json!([]));
    assert_eq!(app.verify(&bare).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify(&rolled).await, StatusCode::NO_CONTENT);
    // Without a body the window is a day; a sooner expiry is kept.
    let soon = in_seconds(60);
    let short = app
        .registered_with(json!({ "expires_at": soon }), None)
        .await;
    let (_, body) = minted(roll(&app, &short.key, None, &admin).await).await;
    assert_eq!(body["expires_at"], soon);
    assert_eq!(app.record(&short.key, &admin).await["expires_at"], soon);
    let (_, _) = minted(roll(&app, &rolled.key, None, &admin).await).await;
    let record = app.record(&rolled.key, &admin).await;
    let until = chrono::DateTime::parse_from_rfc3339(record["expires_at"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    let day = until - Utc::now();
    assert!(
        day > chrono::Duration::hours(23) && day <= chrono::Duration::hours(24),
        "{day}"
    );
}

async fn roll_is_refused_on_revoked_expired_unknown_and_bad_input(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let reader = app
        .registered_with(json!({ "scopes": ["credentials:read"] }), Some(&admin))
        .await;
    let target = app.registered().await;
    let revoked = app.registered().await;
    assert_eq!(
        app.revoke(&revoked.key, &admin).await.status(),
        StatusCode::OK
    );
    let expired = app
        .registered_with(json!({ "expires_at": in_seconds(1) }), None)
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = count(&app, &admin).await;

    let resp = roll(&app, &target.key, None, &reader).await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    let resp = roll(&app, &revoked.key, None, &admin).await;
    assert_error(resp, StatusCode::CONFLICT, "CREDENTIAL_REVOKED").await;
    let resp = roll(&app, &expired.key, None, &admin).await;
    assert_error(resp, StatusCode::CONFLICT, "CREDENTIAL_EXPIRED").await;
    for key in [mint().key, "ak_x".to_owned()] {
        let resp = roll(&app, &key, None, &admin).await;
        assert_error(resp, StatusCode::NOT_FOUND, "CREDENTIAL_NOT_FOUND").await;
    }
    for body in [
        json!({ "grace_seconds": -1 }),
        json!({ "grace_seconds": 2_592_001 }),
        json!({ "grace_seconds": 1.5 }),
        json!({ "grace_seconds": "60" }),
        json!({ "grace_seconds": null }),
        json!({ "grace": 60 }),
        json!([60]),
    ] {
        let resp = roll(&app, &target.key, Some(body.clone()), &admin).await;
        assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
    }
    // Nothing was minted, and the target is as it was.
    assert_eq!(count(&app, &admin).await, before);
    let record = app.record(&target.key, &admin).await;
    assert_eq!(record["expires_at"], Value::Null);
    assert_eq!(app.verify(&target).await, StatusCode::NO_CONTENT);
    // The limits themselves are accepted, and a whole number written with a fraction.
    for grace in [json!(0), json!(2_592_000), json!(60.0)] {
        let victim = app.registered().await;
        minted(
            roll(
                &app,
                &victim.key,
                Some(json!({ "grace_seconds": grace })),
                &admin,
            )
            .await,
        )
        .await;
    }
}

async fn last_used_is_written_once_per_interval_off_the_request_path(backend: Backend) {
    let app = crate::helpers::app::spawn_app_with(backend, |config| {
        config.last_used_interval = Duration::from_secs(2);
    })
    .await;
    let admin = app.registered().await;
    let (used, idle) = (app.registered().await, app.registered().await);
    let started = Utc::now();
    assert_eq!(app.verify(&used).await, StatusCode::NO_CONTENT);
    let last_used = |key: String| {
        let (app, admin) = (&app, &admin);
        async move {
            app.record(&key, admin).await["last_used_at"]
                .as_str()
                .map(|t| {
                    chrono::DateTime::parse_from_rfc3339(t)
                        .unwrap()
                        .with_timezone(&Utc)
                })
        }
    };
    assert!(
        eventually(Duration::from_secs(5), || async {
            last_used(used.key.clone()).await.is_some()
        })
        .await,
        "last_used_at was not written"
    );
    let first = last_used(used.key.clone()).await.unwrap();
    assert!(
        first >= started - chrono::Duration::seconds(1),
        "{first} {started}"
    );
    assert_eq!(last_used(idle.key.clone()).await, None);
    // Used all the time: written again, but not more often than once per interval.
    let mut seen = vec![first];
    let until = std::time::Instant::now() + Duration::from_millis(4500);
    while std::time::Instant::now() < until {
        assert_eq!(app.verify(&used).await, StatusCode::NO_CONTENT);
        let now = last_used(used.key.clone()).await.unwrap();
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.len() >= 2, "{seen:?}");
    for pair in seen.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= chrono::Duration::milliseconds(1500),
            "written twice within an interval: {seen:?}"
        );
    }
}
