//! The HTTP contract (SPEC §2), row by row, against the real server on a real database.

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::app::{Backend, spawn_app};
use crate::helpers::client::{assert_error, metric_value};
use crate::helpers::credentials::{Pair, forged, mint};

// ---- POST /credentials ----------------------------------------------------------------

async fn register_returns_201_with_the_key_only(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = mint();
    let resp = app.register(&pair).await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let text = resp.text().await.unwrap();
    assert!(!text.contains(&pair.secret));
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body, json!({ "api_key": pair.key }));
    assert_eq!(app.verify(&pair).await, StatusCode::NO_CONTENT);
}

async fn register_accepts_the_spec_test_vectors(backend: Backend) {
    let app = spawn_app(backend).await;
    let resp = app
        .register(&Pair {
            key: "ak_0123456789abcdefghijklmnopqrstuv".into(),
            secret: "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo".into(),
        })
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
}

async fn register_rejects_malformed_bodies_and_fields_with_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let good = mint();
    let long_key = format!("ak_{}", "a".repeat(65));
    let short_key = format!("ak_{}", "a".repeat(15));
    let cases: Vec<Value> = vec![
        json!([good.key, good.secret]),
        json!("text"),
        json!(42),
        json!(null),
        json!({ "api_secret": good.secret }),
        json!({ "api_key": good.key }),
        json!({ "api_key": 12, "api_secret": good.secret }),
        json!({ "api_key": good.key, "api_secret": null }),
        json!({ "api_key": "", "api_secret": good.secret }),
        json!({ "api_key": good.key, "api_secret": "" }),
        json!({ "api_key": good.key.replacen("ak_", "xk_", 1), "api_secret": good.secret }),
        json!({ "api_key": good.key, "api_secret": good.secret.replacen("sk_", "ak_", 1) }),
        json!({ "api_key": format!("{}-", &good.key[..20]), "api_secret": good.secret }),
        json!({ "api_key": long_key, "api_secret": good.secret }),
        json!({ "api_key": short_key, "api_secret": good.secret }),
        json!({ "api_key": good.key, "api_secret": &good.secret[..good.secret.len() - 1] }),
        json!({ "api_key": good.key, "api_secret": format!("{}=", good.secret) }),
        json!({ "api_key": good.key, "api_secret": format!("sk_+{}", &good.secret[4..]) }),
    ];
    for body in cases {
        let resp = app.register_json(&body).await;
        assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
    }
    // Not JSON at all.
    let resp = app
        .http
        .post(app.url("/credentials"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
    // None of these registered anything.
    assert_eq!(app.verify(&good).await, StatusCode::UNAUTHORIZED);
}

async fn register_refuses_duplicate_json_fields_with_400_naming_them(backend: Backend) {
    let app = spawn_app(backend).await;
    let good = mint();
    let other = mint();
    let (k, s) = (json!(good.key), json!(good.secret));
    let (k2, s2) = (json!(other.key), json!(other.secret));
    // (body, the field the message must name)
    let cases = [
        (
            format!(r#"{{"api_key":{k},"api_key":{k2},"api_secret":{s}}}"#),
            "api_key",
        ),
        // Identical copies too: which one a reader keeps must never matter.
        (
            format!(r#"{{"api_key":{k},"api_secret":{s},"api_key":{k}}}"#),
            "api_key",
        ),
        (
            format!(r#"{{"api_key":{k},"api_secret":{s2},"api_secret":{s}}}"#),
            "api_secret",
        ),
        (
            format!(r#"{{"api_key":{k},"api_secret":{s},"note":1,"note":1}}"#),
            "note",
        ),
        (
            format!(r#"{{"api_key":{k},"api_secret":{s},"x":{{"y":1,"y":2}}}}"#),
            "x.y",
        ),
    ];
    for (body, field) in cases {
        let resp = app
            .http
            .post(app.url("/credentials"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let err = assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
        let message = err["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{field} ")),
            "{body}: message {message:?} does not name {field}"
        );
    }
    // None of them registered either key.
    assert_eq!(app.verify(&good).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.register(&good).await.status(), StatusCode::CREATED);
}

async fn non_canonical_secret_is_never_registered_or_authenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    // The vector's secret ends in 'o' (low bits 00); 'p' decodes to the same bytes leniently.
    let pair = Pair {
        key: "ak_0123456789abcdefghijklmnopqrstuv".into(),
        secret: "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOp".into(),
    };
    let resp = app.register(&pair).await;
    assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
    let canonical = Pair {
        key: pair.key.clone(),
        secret: "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOo".into(),
    };
    assert_eq!(app.register(&canonical).await.status(), StatusCode::CREATED);
    assert_eq!(app.verify(&pair).await, StatusCode::UNAUTHORIZED);
    assert_eq!(app.verify(&canonical).await, StatusCode::NO_CONTENT);
}

async fn register_forged_pair_is_403_whether_or_not_the_key_exists(backend: Backend) {
    let app = spawn_app(backend).await;
    let fake = forged();
    assert_error(
        app.register(&fake).await,
        StatusCode::FORBIDDEN,
        "INVALID_CREDENTIAL",
    )
    .await;
    // A registered key with a wrong secret: same answer, nothing leaks.
    let real = app.registered().await;
    let wrong = Pair {
        key: real.key.clone(),
        secret: fake.secret.clone(),
    };
    assert_error(
        app.register(&wrong).await,
        StatusCode::FORBIDDEN,
        "INVALID_CREDENTIAL",
    )
    .await;
    // The forged key was never stored.
    let resp = app
        .send(
            Method::GET,
            &format!("/credentials/{}", fake.key),
            Some(&real),
        )
        .await;
    assert_error(resp, StatusCode::NOT_FOUND, "CREDENTIAL_NOT_FOUND").await;
}

async fn register_duplicate_is_409_active_or_revoked(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = app.registered().await;
    assert_error(
        app.register(&pair).await,
        StatusCode::CONFLICT,
        "DUPLICATE_API_KEY",
    )
    .await;
    assert_eq!(app.revoke(&pair.key, &pair).await.status(), StatusCode::OK);
    // A revoked key can never come back.
    assert_error(
        app.register(&pair).await,
        StatusCode::CONFLICT,
        "DUPLICATE_API_KEY",
    )
    .await;
    assert_eq!(app.verify(&pair).await, StatusCode::UNAUTHORIZED);
}

/// A valid registration body padded with JSON whitespace to exactly `len` bytes.
fn padded_body(pair: &Pair, len: usize) -> String {
    let body = json!({ "api_key": pair.key, "api_secret": pair.secret }).to_string();
    format!("{body}{}", " ".repeat(len - body.len()))
}

async fn register_body_limit_is_64_kib(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = mint();
    let post = |body: String| {
        app.http
            .post(app.url("/credentials"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = post(padded_body(&pair, 65_537)).await.unwrap();
    assert_error(resp, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE").await;
    let resp = post(padded_body(&pair, 65_536)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

async fn register_requires_json_content_type(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = mint();
    let body = json!({ "api_key": pair.key, "api_secret": pair.secret }).to_string();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = app.http.post(app.url("/credentials")).body(body.clone());
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.unwrap();
        assert_error(
            resp,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
        )
        .await;
    }
    let resp = app
        .http
        .post(app.url("/credentials"))
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

async fn concurrent_registrations_of_one_key_create_exactly_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = mint();
    let statuses: Vec<StatusCode> = join_all((0..32).map(|_| app.register(&pair)))
        .await
        .into_iter()
        .map(|r| r.status())
        .collect();
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CONFLICT)
            .count(),
        31,
        "{statuses:?}"
    );
}

// ---- DELETE /credentials/{api_key} -------------------------------------------------------

async fn revoke_returns_200_and_records_who_and_when(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let target = app.registered().await;
    let resp = app.revoke(&target.key, &admin).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, json!({ "api_key": target.key, "revoked": true }));
    assert_eq!(app.verify(&target).await, StatusCode::UNAUTHORIZED);
    let record = app.record(&target.key, &admin).await;
    assert_eq!(record["active"], false);
    assert_eq!(record["revoked_by"], admin.key);
    let revoked_at = record["revoked_at"].as_str().expect("revoked_at");
    let created_at = record["created_at"].as_str().expect("created_at");
    let revoked_at = chrono::DateTime::parse_from_rfc3339(revoked_at).expect("rfc3339");
    let created_at = chrono::DateTime::parse_from_rfc3339(created_at).expect("rfc3339");
    assert!(revoked_at >= created_at);
    assert_eq!(revoked_at.offset().local_minus_utc(), 0);
}

async fn revoke_requires_authentication(backend: Backend) {
    let app = spawn_app(backend).await;
    let target = app.registered().await;
    let resp = app
        .send(
            Method::DELETE,
            &format!("/credentials/{}", target.key),
            None,
        )
        .await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    let resp = app.revoke(&target.key, &forged()).await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    assert_eq!(app.verify(&target).await, StatusCode::NO_CONTENT);
}

async fn revoke_unknown_malformed_or_revoked_key_is_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    for key in [mint().key, "ak_short".to_owned(), "not-a-key".to_owned()] {
        assert_error(
            app.revoke(&key, &admin).await,
            StatusCode::NOT_FOUND,
            "CREDENTIAL_NOT_FOUND",
        )
        .await;
    }
    let target = app.registered().await;
    assert_eq!(
        app.revoke(&target.key, &admin).await.status(),
        StatusCode::OK
    );
    assert_error(
        app.revoke(&target.key, &admin).await,
        StatusCode::NOT_FOUND,
        "CREDENTIAL_NOT_FOUND",
    )
    .await;
}

async fn a_credential_may_revoke_itself(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = app.registered().await;
    assert_eq!(app.verify(&pair).await, StatusCode::NO_CONTENT);
    assert_eq!(app.revoke(&pair.key, &pair).await.status(), StatusCode::OK);
    assert_eq!(app.verify(&pair).await, StatusCode::UNAUTHORIZED);
    assert_error(
        app.revoke(&pair.key, &pair).await,
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
    )
    .await;
}

async fn concurrent_revocations_of_one_key_succeed_exactly_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let admins: Vec<Pair> = join_all((0..4).map(|_| app.registered())).await;
    let target = app.registered().await;
    let statuses: Vec<StatusCode> =
        join_all((0..32).map(|i| app.revoke(&target.key, &admins[i % 4])))
            .await
            .into_iter()
            .map(|r| r.status())
            .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::NOT_FOUND)
            .count(),
        31,
        "{statuses:?}"
    );
}

// ---- Authentication ----------------------------------------------------------------------

async fn every_authentication_failure_is_the_same_401(backend: Backend) {
    let app = spawn_app(backend).await;
    let good = app.registered().await;
    let revoked = app.registered().await;
    assert_eq!(
        app.revoke(&revoked.key, &good).await.status(),
        StatusCode::OK
    );
    let unregistered = mint();
    let non_canonical = Pair {
        key: "ak_0123456789abcdefghijklmnopqrstuv".into(),
        secret: "sk_x3WIncH4WcxsOvcOMY66Fjay8bqDTjErBwSru6iHvOp".into(),
    };
    let mut bodies = Vec::new();
    let requests = vec![
        app.request(Method::GET, "/auth/verify", None),
        app.request(Method::GET, "/auth/verify", None)
            .header("X-Api-Key", &good.key),
        app.request(Method::GET, "/auth/verify", None)
            .header("X-Api-Secret", &good.secret),
        app.request(
            Method::GET,
            "/auth/verify",
            Some(&Pair {
                key: "ak_bad".into(),
                secret: good.secret.clone(),
            }),
        ),
        app.request(
            Method::GET,
            "/auth/verify",
            Some(&Pair {
                key: good.key.clone(),
                secret: "sk_bad".into(),
            }),
        ),
        app.request(
            Method::GET,
            "/auth/verify",
            Some(&Pair {
                key: good.key.clone(),
                secret: forged().secret,
            }),
        ),
        app.request(Method::GET, "/auth/verify", Some(&unregistered)),
        app.request(Method::GET, "/auth/verify", Some(&revoked)),
        app.request(Method::GET, "/auth/verify", Some(&non_canonical)),
    ];
    for req in requests {
        let resp = req.send().await.unwrap();
        bodies.push(assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:?}");
    // The outcomes are told apart only in metrics.
    for (result, at_least) in [
        ("rejected_form", 5.0),
        ("rejected_derivation", 1.0),
        ("rejected_unknown", 1.0),
        ("rejected_revoked", 1.0),
    ] {
        let n = app
            .metric(&format!(
                "credgate_auth_results_total{{result=\"{result}\"}}"
            ))
            .await;
        assert!(n >= at_least, "{result}: {n}");
    }
}

async fn repeated_credential_headers_are_the_same_401(backend: Backend) {
    let app = spawn_app(backend).await;
    let good = app.registered().await;
    let other = app.registered().await;
    let reference = app.send(Method::GET, "/auth/verify", None).await;
    let reference = assert_error(reference, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    let series = "credgate_auth_results_total{result=\"rejected_form\"}";
    let before = app.metric(series).await;
    let get = || app.request(Method::GET, "/auth/verify", None);
    // reqwest appends: each `.header` call sends one more header line.
    let requests = vec![
        // Identical copies.
        get()
            .header("X-Api-Key", &good.key)
            .header("X-Api-Key", &good.key)
            .header("X-Api-Secret", &good.secret),
        get()
            .header("X-Api-Key", &good.key)
            .header("X-Api-Secret", &good.secret)
            .header("X-Api-Secret", &good.secret),
        // Two valid credentials: a proxy reading the last copy would act as `other`.
        get()
            .header("X-Api-Key", &good.key)
            .header("X-Api-Key", &other.key)
            .header("X-Api-Secret", &good.secret)
            .header("X-Api-Secret", &other.secret),
        get()
            .header("X-Api-Key", &good.key)
            .header("x-api-key", &other.key)
            .header("X-Api-Secret", &good.secret),
        get()
            .header("X-Api-Key", &good.key)
            .header("X-Api-Secret", &good.secret)
            .header("X-Api-Secret", ""),
    ];
    let n = requests.len() as f64;
    for req in requests {
        let resp = req.send().await.unwrap();
        let body = assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
        assert_eq!(body, reference);
    }
    assert_eq!(app.metric(series).await - before, n);
    // A protected route other than /auth/verify refuses them too.
    let resp = app
        .request(
            Method::GET,
            &format!("/credentials/{}", good.key),
            Some(&good),
        )
        .header("X-Api-Key", &good.key)
        .send()
        .await
        .unwrap();
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
    // Sent once each, the same pair still works.
    assert_eq!(app.verify(&good).await, StatusCode::NO_CONTENT);
}

async fn auth_verify_returns_204_with_the_key_header(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = app.registered().await;
    let resp = app.send(Method::GET, "/auth/verify", Some(&pair)).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(resp.headers()["x-credential-key"], pair.key.as_str());
    assert!(resp.text().await.unwrap().is_empty());
}

async fn unknown_routes_and_wrong_methods_need_credentials_first(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = app.registered().await;
    for path in ["/nope", "/credentials/a/b", "/health/"] {
        let resp = app.send(Method::GET, path, None).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
        let resp = app.send(Method::GET, path, Some(&pair)).await;
        assert_error(resp, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    }
    let own = format!("/credentials/{}", pair.key);
    // (`/auth/verify` answers every method, and PATCH updates a credential: SPEC §7.4, §8.1.)
    for (method, path) in [
        (Method::PUT, "/credentials"),
        (Method::DELETE, "/credentials"),
        (Method::PUT, own.as_str()),
    ] {
        let resp = app.send(method.clone(), path, None).await;
        assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
        let resp = app.send(method, path, Some(&pair)).await;
        assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED").await;
    }
    // Public routes answer 405 to anyone.
    for (method, path) in [
        (Method::POST, "/health"),
        (Method::DELETE, "/metrics"),
        (Method::PUT, "/ready"),
    ] {
        let resp = app.send(method, path, None).await;
        assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED").await;
    }
}

/// The headers of a response minus `date`, which differs between any two responses.
fn headers_but_date(resp: &reqwest::Response) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(name, _)| *name != "date")
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
        .collect();
    headers.sort();
    headers
}

async fn anonymous_wrong_method_is_indistinguishable_from_any_401(backend: Backend) {
    let app = spawn_app(backend).await;
    let pair = app.registered().await;
    let own = format!("/credentials/{}", pair.key);
    // The reference: an anonymous request to a route that does not exist.
    let reference = app.send(Method::GET, "/nope", None).await;
    let reference_headers = headers_but_date(&reference);
    assert_eq!(reference.status(), StatusCode::UNAUTHORIZED);
    let reference_body = reference.bytes().await.unwrap();
    let anonymous = [
        None,
        Some(forged()),
        Some(Pair {
            key: pair.key.clone(),
            secret: "sk_bad".into(),
        }),
    ];
    for (method, path) in [
        (Method::PUT, "/credentials"),
        (Method::DELETE, "/credentials"),
        (Method::PATCH, "/credentials"),
        (Method::PUT, own.as_str()),
        (Method::POST, own.as_str()),
        (Method::PUT, "/credentials/ak_x"),
    ] {
        for auth in &anonymous {
            let resp = app.send(method.clone(), path, auth.as_ref()).await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
            assert!(
                resp.headers().get("allow").is_none(),
                "{method} {path}: a 401 carries Allow: {:?}",
                resp.headers().get("allow")
            );
            assert_eq!(
                headers_but_date(&resp),
                reference_headers,
                "{method} {path}"
            );
            assert_eq!(
                resp.bytes().await.unwrap(),
                reference_body,
                "{method} {path}"
            );
        }
        // With valid credentials the route is revealed: 405.
        let resp = app.send(method.clone(), path, Some(&pair)).await;
        assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED").await;
    }
    // Public routes answer 405 to anyone.
    for (method, path) in [(Method::POST, "/health"), (Method::DELETE, "/ready")] {
        let resp = app.send(method, path, None).await;
        assert_error(resp, StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED").await;
    }
}

// ---- Operational and extended routes -----------------------------------------------------

async fn health_ready_and_metrics_are_public(backend: Backend) {
    let app = spawn_app(backend).await;
    let resp = app.send(Method::GET, "/health", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "status": "ok" })
    );
    let resp = app.send(Method::GET, "/ready", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "status": "ready" })
    );

    let pair = app.registered().await;
    app.verify(&pair).await;
    app.verify(&pair).await;
    assert_eq!(app.revoke(&pair.key, &pair).await.status(), StatusCode::OK);
    let resp = app.send(Method::GET, "/metrics", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    assert!(!text.contains(&pair.secret));
    for series in [
        "credgate_http_requests_total{route=\"/health\",status=\"200\"}",
        "credgate_http_request_duration_seconds_bucket{route=\"/auth/verify\",status=\"204\"",
        "credgate_auth_results_total{result=\"ok\"}",
        "credgate_auth_cache_hits_total",
        "credgate_auth_cache_misses_total",
        "credgate_auth_cache_entries",
        "credgate_registrations_total 1",
        "credgate_revocations_total 1",
        "credgate_db_query_duration_seconds_count{op=\"state\"}",
    ] {
        assert!(text.contains(series), "missing {series}");
    }
    assert!(metric_value(&text, "credgate_auth_cache_hits_total") >= 1.0);
}

async fn get_one_credential_active_revoked_or_unknown(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let resp = app
        .send(
            Method::GET,
            &format!("/credentials/{}", admin.key),
            Some(&admin),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(!text.contains(&admin.secret));
    let record: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(record["api_key"], admin.key);
    assert_eq!(record["active"], true);
    assert_eq!(record["revoked_at"], Value::Null);
    assert_eq!(record["revoked_by"], Value::Null);
    chrono::DateTime::parse_from_rfc3339(record["created_at"].as_str().unwrap()).unwrap();
    // The five fields of SPEC §2 and the eight attributes of §7.1.
    assert_eq!(record.as_object().unwrap().len(), 13);

    for key in [mint().key, "ak_x".to_owned()] {
        let resp = app
            .send(Method::GET, &format!("/credentials/{key}"), Some(&admin))
            .await;
        assert_error(resp, StatusCode::NOT_FOUND, "CREDENTIAL_NOT_FOUND").await;
    }
    let resp = app
        .send(Method::GET, &format!("/credentials/{}", admin.key), None)
        .await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
}

async fn list_pages_with_a_cursor_and_filters(backend: Backend) {
    let app = spawn_app(backend).await;
    let pairs: Vec<Pair> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(app.registered().await);
        }
        v
    };
    let admin = &pairs[0];
    assert_eq!(
        app.revoke(&pairs[1].key, admin).await.status(),
        StatusCode::OK
    );
    let mut expected: Vec<String> = pairs.iter().map(|p| p.key.clone()).collect();
    expected.sort();

    let mut seen = Vec::new();
    let mut path = "/credentials?limit=2".to_owned();
    loop {
        let body: Value = app
            .send(Method::GET, &path, Some(admin))
            .await
            .json()
            .await
            .unwrap();
        let page = body["credentials"].as_array().unwrap();
        assert!(page.len() <= 2);
        seen.extend(
            page.iter()
                .map(|r| r["api_key"].as_str().unwrap().to_owned()),
        );
        match body["next"].as_str() {
            Some(next) => path = format!("/credentials?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen, expected);

    let body: Value = app
        .send(Method::GET, "/credentials", Some(admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["credentials"].as_array().unwrap().len(), 5);
    assert_eq!(body["next"], Value::Null);
    assert!(!body.to_string().contains("sk_"));

    let revoked: Value = app
        .send(Method::GET, "/credentials?active=false", Some(admin))
        .await
        .json()
        .await
        .unwrap();
    let revoked = revoked["credentials"].as_array().unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["api_key"], pairs[1].key);
    assert_eq!(revoked[0]["revoked_by"], admin.key);
    let active: Value = app
        .send(Method::GET, "/credentials?active=true", Some(admin))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(active["credentials"].as_array().unwrap().len(), 4);

    for bad in [
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "active=maybe",
        "after=zzz",
    ] {
        let resp = app
            .send(Method::GET, &format!("/credentials?{bad}"), Some(admin))
            .await;
        assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
    }
    let resp = app
        .send(Method::GET, "/credentials?limit=1000", Some(admin))
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = app.send(Method::GET, "/credentials", None).await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
}

contract_tests!(
    register_returns_201_with_the_key_only,
    register_accepts_the_spec_test_vectors,
    register_rejects_malformed_bodies_and_fields_with_400,
    register_refuses_duplicate_json_fields_with_400_naming_them,
    non_canonical_secret_is_never_registered_or_authenticated,
    register_forged_pair_is_403_whether_or_not_the_key_exists,
    register_duplicate_is_409_active_or_revoked,
    register_body_limit_is_64_kib,
    register_requires_json_content_type,
    concurrent_registrations_of_one_key_create_exactly_one,
    revoke_returns_200_and_records_who_and_when,
    revoke_requires_authentication,
    revoke_unknown_malformed_or_revoked_key_is_404,
    a_credential_may_revoke_itself,
    concurrent_revocations_of_one_key_succeed_exactly_once,
    every_authentication_failure_is_the_same_401,
    repeated_credential_headers_are_the_same_401,
    auth_verify_returns_204_with_the_key_header,
    unknown_routes_and_wrong_methods_need_credentials_first,
    anonymous_wrong_method_is_indistinguishable_from_any_401,
    health_ready_and_metrics_are_public,
    get_one_credential_active_revoked_or_unknown,
    list_pages_with_a_cursor_and_filters,
);

// ---- Properties over HTTP: few cases, the parsers themselves are covered in unit tests ----

mod properties {
    use std::cell::RefCell;
    use std::collections::HashSet;

    use credgate::credential::{ApiKey, ApiSecret, MasterKey, SecretDeriver};
    use proptest::prelude::*;
    use reqwest::StatusCode;
    use serde_json::{Value, json};

    use crate::helpers::app::{Backend, spawn_app};
    use crate::helpers::credentials::{Pair, deriver};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A register body's top-level entries: the pair (its secret derived, forged, one
    /// character off or arbitrary), perhaps a repeated field and an extra one, in any order.
    fn register_entries() -> impl Strategy<Value = Vec<(String, Value)>> {
        let key = prop_oneof![3 => "ak_[A-Za-z0-9]{32}", 1 => "(ak_)?[A-Za-z0-9_+=-]{10,70}"];
        (
            key,
            0..4u8,
            "[A-Za-z0-9_-]",
            prop::option::of((any::<bool>(), any::<bool>())),
            prop::option::of(("[a-z_]{1,10}", any::<i32>())),
        )
            .prop_flat_map(|(key, kind, last, repeat, extra)| {
                let derive = |d: &SecretDeriver| {
                    ApiKey::parse(&key)
                        .map(|k| d.secret_for(&k).expose())
                        .unwrap_or_else(|_| format!("sk_{}", "A".repeat(43)))
                };
                let derived = derive(&deriver());
                let secret = match kind {
                    0 => derived.clone(),
                    1 => derive(&SecretDeriver::new(&MasterKey::from_bytes([42; 32]))),
                    2 => format!("{}{last}", &derived[..derived.len() - 1]),
                    _ => format!("sk_{last}"),
                };
                let mut entries = vec![
                    ("api_key".to_owned(), json!(key)),
                    ("api_secret".to_owned(), json!(secret)),
                ];
                if let Some((which, same)) = repeat {
                    let (name, value) = entries[usize::from(which)].clone();
                    // The other copy: the same, or another key, or the secret that would
                    // make the pair valid.
                    let other = if which { derived } else { format!("{key}0") };
                    entries.push((name, if same { value } else { json!(other) }));
                }
                if let Some((name, n)) = extra {
                    entries.push((name, json!(n)));
                }
                Just(entries).prop_shuffle()
            })
    }

    /// The status SPEC §2 gives a register body, by the crate's own (unit-tested) parsers.
    fn register_status(entries: &[(String, Value)], registered: &HashSet<String>) -> StatusCode {
        let names: HashSet<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        let field = |name: &str| {
            entries
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.as_str())
                .unwrap_or_default()
        };
        match (
            names.len() == entries.len(),
            ApiKey::parse(field("api_key")),
            ApiSecret::parse(field("api_secret")),
        ) {
            (true, Ok(key), Ok(secret)) if deriver().verify(&key, &secret) => {
                if registered.contains(key.as_str()) {
                    StatusCode::CONFLICT
                } else {
                    StatusCode::CREATED
                }
            }
            (true, Ok(_), Ok(_)) => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    #[test]
    fn register_answers_exactly_as_the_spec_says() {
        let rt = runtime();
        let app = rt.block_on(spawn_app(Backend::Sqlite));
        // Shrinking replays inputs: a key registered once is a 409 afterwards.
        let registered = RefCell::new(HashSet::new());
        proptest!(ProptestConfig::with_cases(48), |(entries in register_entries())| {
            let body = format!(
                "{{{}}}",
                entries
                    .iter()
                    .map(|(n, v)| format!("{}:{v}", json!(n)))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let want = register_status(&entries, &registered.borrow());
            let got = rt.block_on(async {
                app.http
                    .post(app.url("/credentials"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap()
                    .status()
            });
            if got == StatusCode::CREATED {
                let key = entries.iter().find(|(n, _)| n == "api_key").unwrap();
                registered.borrow_mut().insert(key.1.as_str().unwrap().to_owned());
            }
            prop_assert_eq!(got, want, "{}", body);
        });
    }

    #[test]
    fn only_one_copy_of_each_header_of_a_registered_pair_authenticates() {
        let rt = runtime();
        let app = rt.block_on(spawn_app(Backend::Sqlite));
        let pairs: Vec<Pair> =
            rt.block_on(async { vec![app.registered().await, app.registered().await] });
        let reference = rt.block_on(async {
            app.send(reqwest::Method::GET, "/auth/verify", None)
                .await
                .bytes()
                .await
                .unwrap()
        });
        // Indexes 0 and 1 pick a registered pair's part; anything else, printable noise.
        let part = || prop_oneof![(0..2usize).prop_map(Ok), "[!-~]{0,50}".prop_map(Err)];
        proptest!(ProptestConfig::with_cases(48), |(
            keys in prop::collection::vec(part(), 0..3),
            secrets in prop::collection::vec(part(), 0..3),
        )| {
            let value = |p: &Result<usize, String>, secret: bool| match p {
                Ok(i) if secret => pairs[*i].secret.clone(),
                Ok(i) => pairs[*i].key.clone(),
                Err(noise) => noise.clone(),
            };
            let mut req = app.http.get(app.url("/auth/verify"));
            for k in &keys {
                req = req.header("X-Api-Key", value(k, false));
            }
            for s in &secrets {
                req = req.header("X-Api-Secret", value(s, true));
            }
            let want = match (keys.as_slice(), secrets.as_slice()) {
                ([Ok(k)], [Ok(s)]) if k == s => StatusCode::NO_CONTENT,
                _ => StatusCode::UNAUTHORIZED,
            };
            let (status, body) = rt.block_on(async {
                let resp = req.send().await.unwrap();
                (resp.status(), resp.bytes().await.unwrap())
            });
            prop_assert_eq!(status, want, "keys {:?} secrets {:?}", keys, secrets);
            if status == StatusCode::UNAUTHORIZED {
                prop_assert_eq!(&body, &reference);
            }
        });
    }
}
