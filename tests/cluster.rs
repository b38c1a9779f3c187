//! Several credgate instances on one PostgreSQL: a revocation anywhere — through any
//! instance's API or by SQL — reaches every instance's cache, also across lost listener
//! connections and a PostgreSQL restart; so does a change of scopes, owner or expiry.

// A test crate has no public API: its helpers are `pub` only to be shared between modules.
#![allow(unreachable_pub)]

/// The shared helpers this binary uses. It calls only part of `app`, `client` and
/// `credentials`, hence the allowances; the `api` binary includes every helper module without
/// them, so a helper that no test uses is still reported there.
#[path = "helpers"]
mod helpers {
    #[allow(dead_code)]
    pub mod app;
    #[allow(dead_code)]
    pub mod client;
    #[allow(dead_code)]
    pub mod credentials;
    pub mod pg;
    pub mod wait;
}

use std::time::Duration;

use credgate::store::DatabaseTarget;
use reqwest::StatusCode;

use helpers::app::{TestApp, spawn_config, test_config};
use helpers::credentials::Pair;
use helpers::pg;
use helpers::wait::eventually;

async fn instance(url: &str) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.database = Some(DatabaseTarget::Postgres(url.to_owned()));
    config.store.timeout = Duration::from_secs(2);
    spawn_config(config, dir).await
}

/// Authenticates `pair` on every instance, twice, so it is cached everywhere.
async fn cache_everywhere(apps: &[TestApp], pair: &Pair) {
    for app in apps {
        assert_eq!(app.verify(pair).await, StatusCode::NO_CONTENT);
        assert_eq!(app.verify(pair).await, StatusCode::NO_CONTENT);
    }
}

/// Waits until every instance refuses `pair`; the bound is generous on purpose (the SPEC
/// asks for 1 s; measured figures are in BENCHMARKS.md), this checks that it happens at all
/// long before the 300 s TTL.
async fn refused_everywhere(apps: &[TestApp], pair: &Pair) -> bool {
    for app in apps {
        let refused = eventually(Duration::from_secs(3), || async {
            app.verify(pair).await == StatusCode::UNAUTHORIZED
        })
        .await;
        if !refused {
            return false;
        }
    }
    true
}

async fn all_listening(apps: &[TestApp]) -> bool {
    for app in apps {
        let up = eventually(Duration::from_secs(15), || async {
            app.ready().await == StatusCode::OK
        })
        .await;
        if !up {
            return false;
        }
    }
    true
}

async fn revoke_by_sql(apps: &[TestApp], pair: &Pair) {
    apps[0]
        .sql(&format!(
            "UPDATE api_credential SET active = false WHERE api_key = '{}'",
            pair.key
        ))
        .await;
}

/// `/auth/verify?scope=…` on one instance.
async fn verify_scope(app: &TestApp, pair: &Pair, scope: &str) -> reqwest::Response {
    app.send(
        reqwest::Method::GET,
        &format!("/auth/verify?scope={scope}"),
        Some(pair),
    )
    .await
}

/// Waits at most 1 s (SPEC §7, §8.1) until `check` holds on every instance.
async fn within_a_second_everywhere<F, Fut>(apps: &[TestApp], check: F) -> bool
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    for i in 0..apps.len() {
        let left = Duration::from_secs(1).saturating_sub(started.elapsed());
        if !eventually(left, || check(i)).await {
            return false;
        }
    }
    true
}

async fn attribute_changes_reach_every_instance(apps: &[TestApp], admin: &Pair) {
    let customer = &apps[0]
        .registered_with(
            serde_json::json!({ "scopes": ["orders:read"] }),
            Some(admin),
        )
        .await;
    for app in apps {
        for _ in 0..2 {
            let resp = verify_scope(app, customer, "orders:read").await;
            assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        }
    }
    // Through one instance's API: the others refuse the dropped scope within 1 s.
    let resp = apps[1]
        .update(
            &customer.key,
            &serde_json::json!({ "scopes": ["orders:write"] }),
            admin,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        within_a_second_everywhere(apps, |i| async move {
            verify_scope(&apps[i], customer, "orders:read")
                .await
                .status()
                == StatusCode::FORBIDDEN
        })
        .await,
        "a scope change did not reach every instance within 1 s"
    );
    // By SQL: a new owner, then an expiry in the past.
    apps[0]
        .sql(&format!(
            "UPDATE api_credential SET owner = 'acme' WHERE api_key = '{}'",
            customer.key
        ))
        .await;
    assert!(
        within_a_second_everywhere(apps, |i| async move {
            let resp = verify_scope(&apps[i], customer, "orders:write").await;
            resp.headers()
                .get("x-credential-owner")
                .is_some_and(|v| v == "acme")
        })
        .await,
        "an owner change by SQL did not reach every instance within 1 s"
    );
    apps[0]
        .sql(&format!(
            "UPDATE api_credential SET expires_at = now() - interval '1 second' \
             WHERE api_key = '{}'",
            customer.key
        ))
        .await;
    assert!(
        within_a_second_everywhere(apps, |i| async move {
            apps[i].verify(customer).await == StatusCode::UNAUTHORIZED
        })
        .await,
        "an expiry set by SQL did not reach every instance within 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_revocations() {
    let server = pg::server();
    let url = server.fresh_database().await;
    let apps = vec![
        instance(&url).await,
        instance(&url).await,
        instance(&url).await,
    ];
    let admin = apps[0].registered().await;

    // Registered on A, authenticated on B and C.
    let p1 = apps[0].registered().await;
    cache_everywhere(&apps, &p1).await;
    assert!(apps[1].metric("credgate_auth_cache_hits_total").await >= 1.0);

    // Revoked through A's API: B and C refuse.
    assert_eq!(
        apps[0].revoke(&p1.key, &admin).await.status(),
        StatusCode::OK
    );
    assert!(
        refused_everywhere(&apps, &p1).await,
        "API revocation did not reach every instance"
    );

    // Revoked by SQL: all three refuse.
    let p2 = apps[1].registered().await;
    cache_everywhere(&apps, &p2).await;
    revoke_by_sql(&apps, &p2).await;
    assert!(
        refused_everywhere(&apps, &p2).await,
        "SQL revocation did not reach every instance"
    );

    // A change of scopes, expiry or owner travels like a revocation: within 1 s everywhere.
    attribute_changes_reach_every_instance(&apps, &admin).await;

    // The listener connections are killed; a revocation made right after must not be lost
    // even if its notification went to a dying connection.
    let p3 = apps[2].registered().await;
    let p4 = apps[2].registered().await;
    cache_everywhere(&apps, &p3).await;
    cache_everywhere(&apps, &p4).await;
    apps[0]
        .sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .await;
    revoke_by_sql(&apps, &p3).await;
    assert!(
        refused_everywhere(&apps, &p3).await,
        "revocation lost across a killed listener"
    );
    assert!(all_listening(&apps).await, "listeners did not come back");
    for app in &apps {
        assert!(
            app.metric("credgate_invalidation_listener_reconnects_total")
                .await
                >= 1.0
        );
        assert_eq!(
            app.metric("credgate_invalidation_listener_connected").await,
            1.0
        );
    }
    // ...and later revocations are still heard.
    cache_everywhere(&apps, &p4).await;
    assert_eq!(
        apps[1].revoke(&p4.key, &admin).await.status(),
        StatusCode::OK
    );
    assert!(
        refused_everywhere(&apps, &p4).await,
        "revocation after listener recovery not heard"
    );

    // PostgreSQL restarts: cached credentials keep working while it is down, uncached ones
    // get 500 (never 401), and everything recovers without restarting credgate.
    let p5 = apps[0].registered().await;
    let p6 = apps[0].registered().await;
    cache_everywhere(&apps, &p5).await;
    tokio::task::spawn_blocking(|| pg::server().stop())
        .await
        .unwrap();
    for app in &apps {
        assert_eq!(
            app.verify(&p5).await,
            StatusCode::NO_CONTENT,
            "cached auth while PostgreSQL is down"
        );
        assert_eq!(app.verify(&p6).await, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(app.ready().await, StatusCode::SERVICE_UNAVAILABLE);
    }
    tokio::task::spawn_blocking(|| pg::server().launch())
        .await
        .unwrap()
        .unwrap();
    assert!(
        all_listening(&apps).await,
        "instances did not recover after the restart"
    );
    for app in &apps {
        assert_eq!(app.verify(&p6).await, StatusCode::NO_CONTENT);
    }
    cache_everywhere(&apps, &p5).await;
    assert_eq!(
        apps[2].revoke(&p5.key, &admin).await.status(),
        StatusCode::OK
    );
    assert!(
        refused_everywhere(&apps, &p5).await,
        "revocation after restart not heard"
    );
    revoke_by_sql(&apps, &p6).await;
    assert!(
        refused_everywhere(&apps, &p6).await,
        "SQL revocation after restart not heard"
    );
}
