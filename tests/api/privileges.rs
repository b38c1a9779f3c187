//! SPEC §7: attributes, scopes, the registration policy, `/auth/verify` for proxies, expiry,
//! and changes reaching the cache. Every rule has an allowed and a refused case.

use std::time::Duration;

use credgate::attributes::Scopes;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::app::{Backend, TestApp, spawn_app, spawn_app_with};
use crate::helpers::client::{assert_error, in_seconds, metric_value};
use crate::helpers::credentials::{Pair, deriver, forged, mint};
use crate::helpers::wait::eventually;

contract_tests!(
    registration_stores_attributes_and_listing_filters_them,
    bad_attributes_are_400_naming_the_field_and_store_nothing,
    each_route_needs_its_scope_and_self_needs_none,
    nobody_grants_a_scope_they_lack,
    registration_scopes_and_authenticated_registration,
    closed_registration_needs_credentials_write,
    verify_answers_every_proxy_shape_the_same_way,
    verify_checks_required_scopes,
    verify_ok_status_200_for_envoy,
    expiry_is_enforced_even_while_cached,
    attribute_changes_reach_the_cache_at_once,
    attribute_changes_by_sql_reach_the_cache,
    updates_are_validated_and_refused_on_revoked_credentials,
);

/// A credential with `scopes`, registered by `admin` (which holds `*`).
async fn with_scopes(app: &TestApp, admin: &Pair, scopes: &[&str]) -> Pair {
    app.registered_with(json!({ "scopes": scopes }), Some(admin))
        .await
}

async fn get(app: &TestApp, path: &str, by: &Pair) -> reqwest::Response {
    app.send(Method::GET, path, Some(by)).await
}

/// The keys of a `GET /credentials` answer.
async fn listed(app: &TestApp, query: &str, by: &Pair) -> Vec<String> {
    let resp = get(app, &format!("/credentials?limit=1000&{query}"), by).await;
    assert_eq!(resp.status(), StatusCode::OK, "{query}");
    let body: Value = resp.json().await.unwrap();
    body["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["api_key"].as_str().unwrap().to_owned())
        .collect()
}

async fn registration_stores_attributes_and_listing_filters_them(backend: Backend) {
    let app = spawn_app(backend).await;
    // Open registration may set a name and an expiry; the default scopes are every scope.
    let expires = in_seconds(3600);
    let named = app
        .registered_with(json!({ "name": "CI runner", "expires_at": expires }), None)
        .await;
    let record = app.record(&named.key, &named).await;
    assert_eq!(record["name"], "CI runner");
    assert_eq!(record["expires_at"], expires);
    assert_eq!(record["scopes"], json!(["*"]));
    assert_eq!(record["meta"], json!({}));
    assert_eq!(record["owner"], Value::Null);
    assert_eq!(record["last_used_at"], Value::Null);
    assert_eq!(record["state"], "active");
    assert_eq!(record["master_key_id"], deriver().key_id());
    assert_eq!(deriver().key_id().len(), 16);

    // owner, meta and scopes need credentials:write, which an anonymous caller lacks.
    for attribute in [
        json!({ "owner": "acme" }),
        json!({ "meta": {} }),
        json!({ "scopes": [] }),
    ] {
        let mut body = attribute.clone();
        let pair = mint();
        body["api_key"] = pair.key.clone().into();
        body["api_secret"] = pair.secret.clone().into();
        let resp = app.register_as(&body, None).await;
        let error = assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("credentials:write"),
            "{error}"
        );
        assert_error(
            get(&app, &format!("/credentials/{}", pair.key), &named).await,
            StatusCode::NOT_FOUND,
            "CREDENTIAL_NOT_FOUND",
        )
        .await;
    }
    // A caller holding it may.
    let owned = app
        .registered_with(
            json!({
                "owner": "tenant:42/acme@eu",
                "meta": { "plan": "gold", "seats": [1, 2] },
                "scopes": ["orders:read", "orders:read", "credentials:read"],
            }),
            Some(&named),
        )
        .await;
    let record = app.record(&owned.key, &named).await;
    assert_eq!(record["owner"], "tenant:42/acme@eu");
    assert_eq!(record["meta"], json!({ "plan": "gold", "seats": [1, 2] }));
    assert_eq!(record["scopes"], json!(["credentials:read", "orders:read"]));

    // Filters, alone and combined.
    let soon = app
        .registered_with(json!({ "expires_at": in_seconds(1) }), None)
        .await;
    let revoked = app.registered().await;
    assert_eq!(
        app.revoke(&revoked.key, &named).await.status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        listed(&app, "owner=tenant:42/acme@eu", &named).await,
        vec![owned.key.clone()]
    );
    assert!(listed(&app, "owner=nobody", &named).await.is_empty());
    let expired = listed(&app, "state=expired", &named).await;
    assert_eq!(expired, vec![soon.key.clone()]);
    let revoked_keys = listed(&app, "state=revoked", &named).await;
    assert_eq!(revoked_keys, vec![revoked.key.clone()]);
    let active = listed(&app, "state=active", &named).await;
    assert_eq!(active.len(), 2);
    assert!(active.contains(&named.key) && active.contains(&owned.key));
    // An expired credential is still `active: true` (it was never revoked).
    assert_eq!(
        listed(&app, "state=expired&active=true", &named).await,
        vec![soon.key.clone()]
    );
    assert_eq!(
        listed(
            &app,
            &format!("master_key_id={}", deriver().key_id()),
            &named
        )
        .await
        .len(),
        4
    );
    assert!(
        listed(&app, "master_key_id=0000000000000000", &named)
            .await
            .is_empty()
    );
    // An owner's credentials a page at a time, following the cursor, with other owners' and
    // owner-less credentials on either side of them in key order.
    let mut tenant = vec![owned.key.clone()];
    for _ in 0..3 {
        let pair = app
            .registered_with(json!({ "owner": "tenant:42/acme@eu" }), Some(&named))
            .await;
        tenant.push(pair.key.clone());
        app.registered_with(json!({ "owner": "tenant:7" }), Some(&named))
            .await;
    }
    tenant.sort();
    let mut paged = Vec::new();
    let mut path = "/credentials?limit=1&owner=tenant:42/acme@eu".to_owned();
    loop {
        let body: Value = get(&app, &path, &named).await.json().await.unwrap();
        for c in body["credentials"].as_array().unwrap() {
            paged.push(c["api_key"].as_str().unwrap().to_owned());
        }
        match body["next"].as_str() {
            Some(next) => {
                path = format!("/credentials?limit=1&owner=tenant:42/acme@eu&after={next}")
            }
            None => break,
        }
    }
    assert_eq!(paged, tenant);
    let record = app.record(&soon.key, &named).await;
    assert_eq!(record["state"], "expired");
    for (query, field) in [
        ("state=gone", "state"),
        ("owner=a%20b", "owner"),
        ("owner=", "owner"),
        ("master_key_id=XYZ", "master_key_id"),
        ("master_key_id=0123456789ABCDEF", "master_key_id"),
    ] {
        let resp = get(&app, &format!("/credentials?{query}"), &named).await;
        let error = assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{query}: {message}");
    }
}

async fn bad_attributes_are_400_naming_the_field_and_store_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let many: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
    let cases = [
        ("name", json!("")),
        ("name", json!("a\u{7}b")),
        ("name", json!("x".repeat(201))),
        ("name", json!(7)),
        ("owner", json!("a b")),
        ("owner", json!("")),
        ("owner", json!("x".repeat(201))),
        ("owner", json!(["a"])),
        ("meta", json!([1])),
        ("meta", json!("{}")),
        ("meta", json!({ "x": "y".repeat(4100) })),
        ("scopes", json!("orders:read")),
        ("scopes", json!(["Orders"])),
        ("scopes", json!([1])),
        ("scopes", json!(["a b"])),
        ("scopes", json!(many)),
        ("expires_at", json!("2000-01-01T00:00:00Z")),
        ("expires_at", json!("2999-01-01T00:00:00")),
        ("expires_at", json!("tomorrow")),
        ("expires_at", json!(4_102_444_800_i64)),
    ];
    for (field, value) in cases {
        let pair = mint();
        let body = json!({ "api_key": pair.key, "api_secret": pair.secret, field: value });
        // As the admin, so only the value can be wrong.
        let resp = app.register_as(&body, Some(&admin)).await;
        let error = assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{field} = {value}: {message}");
        let resp = get(&app, &format!("/credentials/{}", pair.key), &admin).await;
        assert_error(resp, StatusCode::NOT_FOUND, "CREDENTIAL_NOT_FOUND").await;
        // The same value in an update is refused too, and changes nothing.
        let before = app.record(&admin.key, &admin).await;
        let resp = app
            .update(&admin.key, &json!({ field: value }), &admin)
            .await;
        assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
        assert_eq!(app.record(&admin.key, &admin).await, before);
    }
    // The limits themselves are accepted.
    let max: Vec<String> = (0..32).map(|i| format!("s{i}")).collect();
    let meta = json!({ "x": "y".repeat(4088) });
    assert_eq!(serde_json::to_vec(&meta).unwrap().len(), 4096);
    app.registered_with(
        json!({ "name": "é".repeat(200), "owner": "o".repeat(200), "scopes": max, "meta": meta }),
        Some(&admin),
    )
    .await;
}

async fn each_route_needs_its_scope_and_self_needs_none(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let none = with_scopes(&app, &admin, &[]).await;
    let reader = with_scopes(&app, &admin, &["credentials:read"]).await;
    let revoker = with_scopes(&app, &admin, &["credentials:revoke"]).await;
    let writer = with_scopes(&app, &admin, &["credentials:write"]).await;
    let target = app.registered().await;
    let target_path = format!("/credentials/{}", target.key);

    let refused = |scope: &'static str| {
        move |resp: reqwest::Response| async move {
            let error = assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
            let message = error["error"]["message"].as_str().unwrap().to_owned();
            assert!(message.contains(scope), "{message} names {scope}");
        }
    };
    // credentials:read: the list and any credential.
    refused("credentials:read")(get(&app, "/credentials", &none).await).await;
    refused("credentials:read")(get(&app, &target_path, &none).await).await;
    refused("credentials:read")(get(&app, &target_path, &revoker).await).await;
    assert_eq!(get(&app, "/credentials", &reader).await.status(), 200);
    assert_eq!(get(&app, &target_path, &reader).await.status(), 200);
    // Self-read needs no scope.
    let own = get(&app, &format!("/credentials/{}", none.key), &none).await;
    assert_eq!(own.status(), StatusCode::OK);
    // credentials:write: updates.
    let patch = json!({ "name": "renamed" });
    refused("credentials:write")(app.update(&target.key, &patch, &reader).await).await;
    refused("credentials:write")(app.update(&none.key, &patch, &none).await).await;
    assert_eq!(
        app.update(&target.key, &patch, &writer).await.status(),
        StatusCode::OK
    );
    // credentials:revoke: revoking another.
    refused("credentials:revoke")(app.revoke(&target.key, &reader).await).await;
    refused("credentials:revoke")(app.revoke(&target.key, &none).await).await;
    assert_eq!(app.verify(&target).await, StatusCode::NO_CONTENT);
    assert_eq!(
        app.revoke(&target.key, &revoker).await.status(),
        StatusCode::OK
    );
    assert_eq!(app.verify(&target).await, StatusCode::UNAUTHORIZED);
    // Without any scope a credential still authenticates, and revokes itself.
    assert_eq!(app.verify(&none).await, StatusCode::NO_CONTENT);
    assert_eq!(app.revoke(&none.key, &none).await.status(), StatusCode::OK);
    assert_eq!(app.verify(&none).await, StatusCode::UNAUTHORIZED);
    // A 403 comes after authentication: a forged pair is still the plain 401.
    let resp = app.send(Method::GET, "/credentials", Some(&forged())).await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    // `*` holds every scope.
    assert_eq!(get(&app, "/credentials", &admin).await.status(), 200);
}

async fn nobody_grants_a_scope_they_lack(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let writer = with_scopes(&app, &admin, &["credentials:write", "orders:read"]).await;
    // Registration: only scopes the writer holds.
    for scopes in [
        json!(["orders:write"]),
        json!(["*"]),
        json!(["credentials:read"]),
    ] {
        let pair = mint();
        let body = json!({ "api_key": pair.key, "api_secret": pair.secret, "scopes": scopes });
        let resp = app.register_as(&body, Some(&writer)).await;
        assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
        let resp = get(&app, &format!("/credentials/{}", pair.key), &admin).await;
        assert_error(resp, StatusCode::NOT_FOUND, "CREDENTIAL_NOT_FOUND").await;
    }
    let child = app
        .registered_with(json!({ "scopes": ["orders:read"] }), Some(&writer))
        .await;
    // Updates: the same rule, also on the writer itself.
    let resp = app
        .update(&child.key, &json!({ "scopes": ["orders:write"] }), &writer)
        .await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    let resp = app
        .update(&writer.key, &json!({ "scopes": ["*"] }), &writer)
        .await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    let record = app.record(&child.key, &admin).await;
    assert_eq!(record["scopes"], json!(["orders:read"]));
    let resp = app
        .update(
            &child.key,
            &json!({ "scopes": ["orders:read", "credentials:write"] }),
            &writer,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    // The holder of `*` may grant anything.
    let resp = app
        .update(&child.key, &json!({ "scopes": ["*"] }), &admin)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
}

async fn registration_scopes_and_authenticated_registration(backend: Backend) {
    let app = spawn_app_with(backend, |config| {
        config.policy.registration_scopes = Scopes::parse_list("").unwrap();
    })
    .await;
    // Openly registered: no scope, so it manages only itself.
    let customer = app.registered().await;
    let record = app.record(&customer.key, &customer).await;
    assert_eq!(record["scopes"], json!([]));
    let other = app.registered().await;
    let resp = get(&app, &format!("/credentials/{}", other.key), &customer).await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    let resp = app.revoke(&other.key, &customer).await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    // Headers, when sent, must be valid: a forged or half pair is 401, nothing stored.
    for auth in [
        forged(),
        Pair {
            key: customer.key.clone(),
            secret: String::new(),
        },
    ] {
        let pair = mint();
        let body = json!({ "api_key": pair.key, "api_secret": pair.secret });
        let resp = app.register_as(&body, Some(&auth)).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
        assert_eq!(app.verify(&pair).await, StatusCode::UNAUTHORIZED);
    }
    // An authenticated caller without credentials:write registers like an anonymous one.
    let named = app
        .registered_with(json!({ "name": "mine" }), Some(&customer))
        .await;
    assert_eq!(app.record(&named.key, &named).await["scopes"], json!([]));
    let pair = mint();
    let body = json!({ "api_key": pair.key, "api_secret": pair.secret, "owner": "x" });
    let resp = app.register_as(&body, Some(&customer)).await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
}

async fn closed_registration_needs_credentials_write(backend: Backend) {
    let app = spawn_app_with(backend, |config| {
        config.policy.open_registration = false;
    })
    .await;
    // The first administrator comes from the database (README: bootstrapping).
    let admin = mint();
    app.sql(&format!(
        "INSERT INTO api_credential (api_key, scopes) VALUES ('{}', '*')",
        admin.key
    ))
    .await;
    let pair = mint();
    let resp = app.register(&pair).await;
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some(r#"ApiKey realm="credgate""#)
    );
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    let reader = with_scopes(&app, &admin, &["credentials:read"]).await;
    let resp = app
        .register_as(
            &json!({ "api_key": pair.key, "api_secret": pair.secret }),
            Some(&reader),
        )
        .await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    // A writer gets the registration scopes (default `*`) only if it holds them.
    let writer = with_scopes(&app, &admin, &["credentials:write"]).await;
    let resp = app
        .register_as(
            &json!({ "api_key": pair.key, "api_secret": pair.secret }),
            Some(&writer),
        )
        .await;
    let error = assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    assert!(error["error"]["message"].as_str().unwrap().contains('*'));
    let resp = app
        .register_as(
            &json!({ "api_key": pair.key, "api_secret": pair.secret, "scopes": [] }),
            Some(&writer),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(app.verify(&pair).await, StatusCode::NO_CONTENT);
}

const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

const VERIFY_PATHS: [&str; 5] = [
    "/auth/verify",
    "/auth/verify/",
    "/auth/verify/api/orders/7",
    "/auth/verify/api/orders?page=2&sort=x",
    "/auth/verify?x=1",
];

/// The identity headers of a verify answer.
fn identity(resp: &reqwest::Response) -> [Option<String>; 3] {
    [
        "x-credential-key",
        "x-credential-owner",
        "x-credential-scopes",
    ]
    .map(|name| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    })
}

async fn verify_answers_every_proxy_shape_the_same_way(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let customer = app
        .registered_with(
            json!({ "owner": "acme", "scopes": ["orders:write", "orders:read"] }),
            Some(&admin),
        )
        .await;
    let bare = with_scopes(&app, &admin, &[]).await;
    for method in METHODS {
        for path in VERIFY_PATHS {
            let label = format!("{method} {path}");
            // A body is ignored, whatever it holds.
            let resp = app
                .request(method.clone(), path, Some(&customer))
                .header("content-type", "application/json")
                .body("{\"not\": \"read\"")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::NO_CONTENT, "{label}");
            assert_eq!(
                identity(&resp),
                [
                    Some(customer.key.clone()),
                    Some("acme".to_owned()),
                    Some("orders:read orders:write".to_owned())
                ],
                "{label}"
            );
            let resp = app.send(method.clone(), path, Some(&bare)).await;
            assert_eq!(resp.status(), StatusCode::NO_CONTENT, "{label}");
            assert_eq!(
                identity(&resp),
                [Some(bare.key.clone()), None, None],
                "{label}"
            );
            for auth in [None, Some(forged())] {
                let resp = app.send(method.clone(), path, auth.as_ref()).await;
                assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{label}");
                assert_eq!(
                    resp.headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok()),
                    Some(r#"ApiKey realm="credgate""#),
                    "{label}"
                );
                assert_eq!(identity(&resp), [None, None, None], "{label}");
            }
        }
    }
    // Neither the secret nor anything else of the request comes back.
    let resp = app.send(Method::GET, "/auth/verify", Some(&customer)).await;
    assert!(resp.headers().get("x-api-secret").is_none());
    // Other paths are not verify: a sibling prefix is an unknown route.
    let resp = app
        .send(Method::GET, "/auth/verifyx", Some(&customer))
        .await;
    assert_error(resp, StatusCode::NOT_FOUND, "NOT_FOUND").await;

    // The guard answers these requests without routing them; metrics label them as the
    // three routes they are declared as, and the refused ones as unmatched, like every
    // request the guard refuses.
    let per_path = (2 * METHODS.len()) as f64;
    for (route, status, count) in [
        ("/auth/verify", 204, 2.0 * per_path + 1.0),
        ("/auth/verify/", 204, per_path),
        ("/auth/verify/{*path}", 204, 2.0 * per_path),
        ("unmatched", 401, per_path * VERIFY_PATHS.len() as f64),
    ] {
        let series =
            format!("credgate_http_requests_total{{route=\"{route}\",status=\"{status}\"}}");
        assert_eq!(app.metric(&series).await, count, "{series}");
    }
}

async fn verify_checks_required_scopes(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let reader = with_scopes(&app, &admin, &["orders:read"]).await;
    let ok = StatusCode::NO_CONTENT;
    let check = |query: &'static str, header: Option<&'static str>, pair: &Pair| {
        let mut req = app.request(Method::GET, &format!("/auth/verify/api{query}"), Some(pair));
        if let Some(h) = header {
            req = req.header("x-required-scopes", h);
        }
        async move { req.send().await.unwrap() }
    };
    for (query, header, status) in [
        ("", None, ok),
        ("?scope=orders:read", None, ok),
        ("?scope=orders:read&scope=orders:read&page=2", None, ok),
        ("?scope=orders:write", None, StatusCode::FORBIDDEN),
        (
            "?scope=orders:read&scope=orders:write",
            None,
            StatusCode::FORBIDDEN,
        ),
        // A proxy's own requirement and the client's appended query both count.
        (
            "?x=1&scope=orders:write",
            Some("orders:read"),
            StatusCode::FORBIDDEN,
        ),
        ("", Some("orders:read"), ok),
        ("", Some("orders:read orders:write"), StatusCode::FORBIDDEN),
        ("?scope=orders%3Aread", None, ok),
        ("?scope=*", None, StatusCode::FORBIDDEN),
    ] {
        let resp = check(query, header, &reader).await;
        assert_eq!(resp.status(), status, "{query} {header:?}");
        if status == StatusCode::FORBIDDEN {
            let error = assert_error(resp, status, "INSUFFICIENT_SCOPE").await;
            assert!(
                error["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("orders:write")
                    || query.contains('*')
            );
        }
        // `*` holds every scope.
        assert_eq!(check(query, header, &admin).await.status(), ok, "{query}");
    }
    // A requirement that is no scope is a bad request, for everyone.
    for (query, header) in [("?scope=Orders", None), ("", Some("a/b"))] {
        for pair in [&reader, &admin] {
            let resp = check(query, header, pair).await;
            assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
        }
    }
}

async fn verify_ok_status_200_for_envoy(backend: Backend) {
    let app = spawn_app_with(backend, |config| {
        config.policy.verify_ok_status = credgate::config::VerifyStatus::Ok;
    })
    .await;
    let pair = app.registered().await;
    // Envoy's ext_authz: the original method, path_prefix + original path.
    for method in [Method::POST, Method::GET, Method::DELETE] {
        let resp = app
            .send(method, "/auth/verify/api/orders?id=1", Some(&pair))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(identity(&resp)[0].as_deref(), Some(pair.key.as_str()));
        assert!(resp.bytes().await.unwrap().is_empty());
    }
    let resp = app
        .send(Method::POST, "/auth/verify/api", Some(&forged()))
        .await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
}

async fn expiry_is_enforced_even_while_cached(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let soon = app
        .registered_with(json!({ "expires_at": in_seconds(2) }), None)
        .await;
    // Cached now; the cache TTL (300 s) is far longer than the credential's life.
    assert_eq!(app.verify(&soon).await, StatusCode::NO_CONTENT);
    let hits = app.metric("credgate_auth_cache_hits_total").await;
    assert_eq!(app.verify(&soon).await, StatusCode::NO_CONTENT);
    assert!(app.metric("credgate_auth_cache_hits_total").await > hits);
    let expired = eventually(Duration::from_secs(5), || async {
        app.verify(&soon).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(expired, "an expired credential still authenticates");
    let metrics = app
        .send(Method::GET, "/metrics", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        metric_value(
            &metrics,
            "credgate_auth_results_total{result=\"rejected_expired\"}"
        ) >= 1.0
    );
    // It can do nothing any more, not even revoke itself or read itself.
    let resp = app.revoke(&soon.key, &soon).await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    let resp = get(&app, &format!("/credentials/{}", soon.key), &soon).await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    assert_eq!(app.record(&soon.key, &admin).await["state"], "expired");
    // Extending its expiry brings it back (it was never revoked); another may revoke it.
    let resp = app
        .update(&soon.key, &json!({ "expires_at": in_seconds(60) }), &admin)
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(app.verify(&soon).await, StatusCode::NO_CONTENT);
    let resp = app
        .update(&soon.key, &json!({ "expires_at": in_seconds(-60) }), &admin)
        .await;
    assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
    app.sql(&format!(
        "UPDATE api_credential SET expires_at = {} WHERE api_key = '{}'",
        match backend {
            Backend::Sqlite => "'2000-01-01T00:00:00.000Z'",
            Backend::Postgres => "'2000-01-01T00:00:00Z'",
        },
        soon.key
    ))
    .await;
    let expired = eventually(Duration::from_secs(2), || async {
        app.verify(&soon).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(expired, "an expiry set by SQL did not reach the cache");
    assert_eq!(app.revoke(&soon.key, &admin).await.status(), StatusCode::OK);
    assert_eq!(app.record(&soon.key, &admin).await["state"], "revoked");
}

/// Status of `/auth/verify?scope=…` for `pair`.
async fn verify_scope(app: &TestApp, pair: &Pair, scope: &str) -> StatusCode {
    app.send(
        Method::GET,
        &format!("/auth/verify?scope={scope}"),
        Some(pair),
    )
    .await
    .status()
}

async fn attribute_changes_reach_the_cache_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let customer = with_scopes(&app, &admin, &["orders:read"]).await;
    assert_eq!(
        verify_scope(&app, &customer, "orders:read").await,
        StatusCode::NO_CONTENT
    );
    let hits = app.metric("credgate_auth_cache_hits_total").await;
    assert_eq!(
        verify_scope(&app, &customer, "orders:read").await,
        StatusCode::NO_CONTENT
    );
    assert!(app.metric("credgate_auth_cache_hits_total").await > hits);
    // Narrowed: refused on the very next request, no waiting.
    let resp = app
        .update(
            &customer.key,
            &json!({ "scopes": ["orders:write"], "owner": "acme" }),
            &admin,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let record: Value = resp.json().await.unwrap();
    assert_eq!(record["scopes"], json!(["orders:write"]));
    assert_eq!(
        verify_scope(&app, &customer, "orders:read").await,
        StatusCode::FORBIDDEN
    );
    let resp = app.send(Method::GET, "/auth/verify", Some(&customer)).await;
    assert_eq!(identity(&resp)[1].as_deref(), Some("acme"));
    // Expiry set in the past is refused by the API; one in a moment works, then refuses.
    let resp = app
        .update(
            &customer.key,
            &json!({ "expires_at": in_seconds(1) }),
            &admin,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        eventually(Duration::from_secs(4), || async {
            app.verify(&customer).await == StatusCode::UNAUTHORIZED
        })
        .await
    );
    // Clearing it brings the credential back at once.
    let resp = app
        .update(
            &customer.key,
            &json!({ "expires_at": null, "owner": null }),
            &admin,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = app.send(Method::GET, "/auth/verify", Some(&customer)).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(identity(&resp)[1], None);
}

async fn attribute_changes_by_sql_reach_the_cache(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let customer = with_scopes(&app, &admin, &["orders:read"]).await;
    assert_eq!(
        verify_scope(&app, &customer, "orders:read").await,
        StatusCode::NO_CONTENT
    );
    app.sql(&format!(
        "UPDATE api_credential SET scopes = 'orders:write' WHERE api_key = '{}'",
        customer.key
    ))
    .await;
    // PostgreSQL: NOTIFY; SQLite: the change log, polled every 100 ms.
    let narrowed = eventually(Duration::from_secs(1), || async {
        verify_scope(&app, &customer, "orders:read").await == StatusCode::FORBIDDEN
    })
    .await;
    assert!(
        narrowed,
        "a scope change by SQL did not reach the cache within 1 s"
    );
    app.sql(&format!(
        "UPDATE api_credential SET owner = 'acme' WHERE api_key = '{}'",
        customer.key
    ))
    .await;
    let owned = eventually(Duration::from_secs(1), || async {
        let resp = app.send(Method::GET, "/auth/verify", Some(&customer)).await;
        identity(&resp)[1].as_deref() == Some("acme")
    })
    .await;
    assert!(
        owned,
        "an owner change by SQL did not reach the cache within 1 s"
    );
}

async fn updates_are_validated_and_refused_on_revoked_credentials(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let target = app
        .registered_with(json!({ "name": "a", "meta": { "k": 1 } }), Some(&admin))
        .await;
    // Each given field replaces the stored one; meta whole; null clears name.
    let resp = app
        .update(
            &target.key,
            &json!({ "meta": { "j": 2 }, "name": null }),
            &admin,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let record: Value = resp.json().await.unwrap();
    assert_eq!(record["meta"], json!({ "j": 2 }));
    assert_eq!(record["name"], Value::Null);
    assert_eq!(record["scopes"], json!(["*"]));
    assert_eq!(app.record(&target.key, &admin).await, record);
    for (body, field) in [
        (json!({}), "request body"),
        (json!({ "scope": ["a"] }), "scope"),
        (json!({ "api_key": "ak_x" }), "api_key"),
        (json!({ "meta": null }), "meta"),
        (json!({ "scopes": null }), "scopes"),
        (json!([]), "request body"),
    ] {
        let resp = app.update(&target.key, &body, &admin).await;
        let error = assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{body}: {message}");
    }
    let resp = app
        .request(
            Method::PATCH,
            &format!("/credentials/{}", target.key),
            Some(&admin),
        )
        .body("{\"name\": \"x\"}")
        .send()
        .await
        .unwrap();
    assert_error(
        resp,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    .await;
    let resp = app
        .update(&mint().key, &json!({ "name": "x" }), &admin)
        .await;
    assert_error(resp, StatusCode::NOT_FOUND, "CREDENTIAL_NOT_FOUND").await;
    assert_eq!(
        app.revoke(&target.key, &admin).await.status(),
        StatusCode::OK
    );
    let resp = app
        .update(&target.key, &json!({ "name": "x" }), &admin)
        .await;
    assert_error(resp, StatusCode::CONFLICT, "CREDENTIAL_REVOKED").await;
    assert_eq!(app.record(&target.key, &admin).await["name"], Value::Null);
}
