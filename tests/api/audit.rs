//! SPEC §8.5: the audit log. Every change of every kind has its event, written with it;
//! changes made by SQL are recorded by the database; events cannot be changed; `GET /audit`
//! pages and filters them, for `audit:read` only. Secrets never appear in it.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::app::{Backend, spawn_app};
use crate::helpers::client::{assert_error, event_kinds, in_seconds};
use crate::helpers::credentials::{Pair, mint};

contract_tests!(
    every_change_made_through_the_api_has_its_event,
    changes_made_by_sql_are_recorded_and_events_cannot_be_changed,
    the_audit_log_pages_filters_and_needs_its_scope,
);

/// The pair in a 201 that carries a secret.
async fn minted(resp: reqwest::Response) -> Pair {
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body: Value = resp.json().await.unwrap();
    Pair {
        key: body["api_key"].as_str().unwrap().to_owned(),
        secret: body["api_secret"].as_str().unwrap().to_owned(),
    }
}

async fn every_change_made_through_the_api_has_its_event(backend: Backend) {
    let app = spawn_app(backend).await;
    // Anonymous registration: no actor.
    let admin = app.registered().await;
    // Authenticated registration, with the client's request id.
    let b = mint();
    let resp = app
        .request(Method::POST, "/credentials", Some(&admin))
        .header("X-Request-Id", "req-b")
        .json(&json!({
            "api_key": b.key, "api_secret": b.secret,
            "owner": "acme", "scopes": ["orders:read"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let issued = minted(
        app.request(Method::POST, "/credentials/issue", Some(&admin))
            .json(&json!({ "name": "ci", "scopes": ["orders:read"] }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let expiry = in_seconds(3600);
    let resp = app
        .update(
            &b.key,
            &json!({ "name": "billing", "expires_at": expiry }),
            &admin,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let rolled = minted(
        app.request(
            Method::POST,
            &format!("/credentials/{}/roll", b.key),
            Some(&admin),
        )
        .json(&json!({ "grace_seconds": 0 }))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        app.revoke(&issued.key, &admin).await.status(),
        StatusCode::OK
    );

    // Refused changes write nothing.
    assert_eq!(app.register(&admin).await.status(), StatusCode::CONFLICT);
    assert_eq!(
        app.revoke(&issued.key, &admin).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.update(&issued.key, &json!({ "name": "x" }), &admin)
            .await
            .status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        app.update(&b.key, &json!({ "scopes": "not a list" }), &admin)
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
    let resp = app
        .send(
            Method::POST,
            &format!("/credentials/{}/roll", issued.key),
            Some(&admin),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CONFLICT);

    let events = app.events("", &admin).await;
    assert_eq!(
        event_kinds(&events),
        [
            ("registered", &admin.key),
            ("registered", &b.key),
            ("issued", &issued.key),
            ("updated", &b.key),
            ("rolled", &b.key),
            ("issued", &rolled.key),
            ("revoked", &issued.key),
        ]
        .map(|(e, k)| (e.to_owned(), k.clone()))
    );
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for event in &events {
        assert_eq!(event["source"], "api");
        assert_eq!(event["detail"]["client"], "127.0.0.1", "{event}");
        assert!(event["detail"]["request_id"].is_string(), "{event}");
        assert!(event["at"].is_string());
    }
    // The anonymous registration has no actor; every later change was made by the admin.
    assert_eq!(events[0]["actor"], Value::Null);
    assert!(events[1..].iter().all(|e| e["actor"] == admin.key.as_str()));
    assert_eq!(events[1]["detail"]["request_id"], "req-b");
    assert_eq!(events[1]["detail"]["owner"], "acme");
    assert_eq!(events[1]["detail"]["scopes"], json!(["orders:read"]));
    assert_eq!(events[2]["detail"]["name"], "ci");
    assert_eq!(
        events[3]["detail"]["changed"],
        json!({ "name": "billing", "expires_at": expiry })
    );
    assert_eq!(events[4]["detail"]["rolled_to"], rolled.key.as_str());
    assert!(events[4]["detail"]["expires_at"].is_string());
    assert_eq!(events[5]["detail"]["rolled_from"], b.key.as_str());
    assert_eq!(events[5]["detail"]["owner"], "acme");
    // Fresh request ids when the client sends none: one per request.
    assert_ne!(
        events[0]["detail"]["request_id"],
        events[2]["detail"]["request_id"]
    );

    // Each credential's own history starts with the event that made it, however it was made.
    for (key, first) in [
        (&b.key, "registered"),
        (&issued.key, "issued"),
        (&rolled.key, "issued"),
    ] {
        let own = app.events(&format!("api_key={key}"), &admin).await;
        assert_eq!(own[0]["event"], first, "{key}: {own:?}");
        assert_eq!(own[0]["api_key"], key.as_str());
        if matches!(backend, Backend::Sqlite) {
            // SQLite's writer stamps a batch's rows and events with one time.
            let record: Value = app
                .send(Method::GET, &format!("/credentials/{key}"), Some(&admin))
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(record["created_at"], own[0]["at"], "{key}");
        }
    }

    // No secret anywhere in the log.
    let body = app
        .send(Method::GET, "/audit?limit=1000", Some(&admin))
        .await
        .text()
        .await
        .unwrap();
    for pair in [&admin, &b, &issued, &rolled] {
        assert!(!body.contains(&pair.secret), "a secret is in the audit log");
    }
}

async fn changes_made_by_sql_are_recorded_and_events_cannot_be_changed(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let (b, c) = (app.registered().await, app.registered().await);
    let inserted = mint();
    let (truthy, falsy) = match backend {
        Backend::Sqlite => ("1", "0"),
        Backend::Postgres => ("true", "false"),
    };
    app.sql(&format!(
        "INSERT INTO api_credential (api_key, scopes) VALUES ('{}', 'orders:read orders:write')",
        inserted.key
    ))
    .await;
    app.sql(&format!(
        "UPDATE api_credential SET scopes = 'orders:read', owner = 'acme' WHERE api_key = '{}'",
        b.key
    ))
    .await;
    // Setting a column to its own value changes nothing, and records nothing.
    app.sql(&format!(
        "UPDATE api_credential SET active = {truthy}, owner = owner WHERE api_key = '{}'",
        b.key
    ))
    .await;
    app.sql(&format!(
        "UPDATE api_credential SET active = {falsy} WHERE api_key = '{}'",
        c.key
    ))
    .await;
    app.sql(&format!(
        "DELETE FROM api_credential WHERE api_key = '{}'",
        inserted.key
    ))
    .await;
    // Last used and the master key id are not changes of a credential.
    app.sql(&format!(
        "UPDATE api_credential SET last_used_at = created_at WHERE api_key = '{}'",
        b.key
    ))
    .await;

    let events = app.events("", &admin).await;
    let sql: Vec<&Value> = events.iter().filter(|e| e["source"] == "sql").collect();
    assert_eq!(
        event_kinds(&sql.iter().map(|e| (*e).clone()).collect::<Vec<_>>()),
        [
            ("registered", &inserted.key),
            ("updated", &b.key),
            ("revoked", &c.key),
            ("deleted", &inserted.key),
        ]
        .map(|(e, k)| (e.to_owned(), k.clone()))
    );
    assert!(sql.iter().all(|e| e["actor"].is_null()));
    assert_eq!(
        sql[0]["detail"],
        json!({ "scopes": ["orders:read", "orders:write"] })
    );
    assert_eq!(
        sql[1]["detail"],
        json!({ "changed": { "scopes": ["orders:read"], "owner": "acme" } })
    );
    // A credential's history, its row deleted or not.
    for key in [&inserted.key, &b.key] {
        let own: Vec<Value> = events
            .iter()
            .filter(|e| e["api_key"] == key.as_str())
            .cloned()
            .collect();
        assert_eq!(app.events(&format!("api_key={key}"), &admin).await, own);
        assert_eq!(own[0]["event"], "registered");
    }
    // The revocation made by SQL is also refused by the service.
    assert_eq!(app.verify(&c).await, StatusCode::UNAUTHORIZED);

    // Append-only: the database refuses to change an event, whoever asks.
    let refused = app
        .try_sql("UPDATE api_credential_event SET actor = 'forged'")
        .await;
    assert!(refused.is_err(), "an event was changed");
    assert!(
        refused
            .unwrap_err()
            .to_string()
            .contains("cannot be changed"),
        "the refusal names the rule"
    );
    assert_eq!(app.events("", &admin).await, events);
}

async fn the_audit_log_pages_filters_and_needs_its_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.registered().await;
    let mut keys = vec![admin.key.clone()];
    for _ in 0..4 {
        keys.push(app.registered().await.key);
    }
    assert_eq!(app.revoke(&keys[2], &admin).await.status(), StatusCode::OK);

    // Pages of two, following `next`, give the whole log in order, once.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = match &after {
            Some(after) => format!("limit=2&after={after}"),
            None => "limit=2".into(),
        };
        let resp = app
            .send(Method::GET, &format!("/audit?{query}"), Some(&admin))
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        seen.extend(event_kinds(body["events"].as_array().unwrap()));
        match body["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, event_kinds(&app.events("", &admin).await));
    assert_eq!(seen.len(), 6);

    // One credential's events.
    let of_key = app.events(&format!("api_key={}", keys[2]), &admin).await;
    assert_eq!(
        event_kinds(&of_key),
        [("registered", &keys[2]), ("revoked", &keys[2])].map(|(e, k)| (e.to_owned(), k.clone()))
    );
    assert!(
        app.events(&format!("api_key={}", mint().key), &admin)
            .await
            .is_empty()
    );
    let first = of_key[0]["id"].to_string();
    let later = app
        .events(&format!("api_key={}&after={first}", keys[2]), &admin)
        .await;
    assert_eq!(later, of_key[1..]);
    let last = of_key[1]["id"].to_string();
    assert!(
        app.events(&format!("after={last}"), &admin)
            .await
            .is_empty()
    );

    // Bad queries name their field and change nothing.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("after=-1", "after"),
        ("after=abc", "after"),
        ("api_key=not-a-key", "api_key"),
    ] {
        let resp = app
            .send(Method::GET, &format!("/audit?{query}"), Some(&admin))
            .await;
        let body = assert_error(resp, StatusCode::BAD_REQUEST, "INVALID_FIELD").await;
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{query}: {body}"
        );
    }

    // audit:read only.
    let reader = app
        .registered_with(json!({ "scopes": ["credentials:read"] }), Some(&admin))
        .await;
    let resp = app.send(Method::GET, "/audit", Some(&reader)).await;
    assert_error(resp, StatusCode::FORBIDDEN, "INSUFFICIENT_SCOPE").await;
    let auditor = app
        .registered_with(json!({ "scopes": ["audit:read"] }), Some(&admin))
        .await;
    assert_eq!(app.events("", &auditor).await.len(), 8);
    let resp = app.send(Method::GET, "/audit", None).await;
    assert_error(resp, StatusCode::UNAUTHORIZED, "UNAUTHORIZED").await;
}

/// A registration that an operator's trigger skips stored nothing: the service answers it
/// as a conflict, and no event says it was registered (SQLite, where the service writes the
/// event before the row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_skipped_by_an_operator_trigger_leaves_no_event() {
    let app = spawn_app(Backend::Sqlite).await;
    let admin = app.registered().await;
    app.sql(
        "CREATE TRIGGER operator_skips BEFORE INSERT ON api_credential \
         WHEN NEW.name = 'skip me' BEGIN SELECT RAISE(IGNORE); END",
    )
    .await;
    let skipped = mint();
    let resp = app
        .request(Method::POST, "/credentials", None)
        .json(&json!({ "api_key": skipped.key, "api_secret": skipped.secret, "name": "skip me" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(app.verify(&skipped).await, StatusCode::UNAUTHORIZED);
    assert!(
        app.events(&format!("api_key={}", skipped.key), &admin)
            .await
            .is_empty()
    );
    let all = app.events("", &admin).await;
    assert!(all.iter().all(|e| e["api_key"] != skipped.key.as_str()));
    // The next registration is recorded as usual.
    let next = app.registered().await;
    assert_eq!(
        app.events(&format!("api_key={}", next.key), &admin)
            .await
            .len(),
        1
    );
}
