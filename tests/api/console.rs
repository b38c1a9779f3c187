//! SPEC §10: the console in a real headless Chromium, driven over WebDriver
//! (`helpers/webdriver.rs`; Debian's `chromium` and `chromium-driver`, installed when
//! missing), against the real binary.

use reqwest::StatusCode;
use serde_json::json;

use crate::ecosystem::{credgate, ensure_tool};
use crate::helpers::credentials::{Pair, forged, mint};
use crate::helpers::webdriver::Browser;

/// Clicks the credential link naming `key` in the list.
async fn open_credential(browser: &Browser, key: &str) {
    let script = "for (const a of document.querySelectorAll('a.key')) \
                  { if (a.textContent === arguments[0]) { a.click(); return true; } } return false;";
    let started = std::time::Instant::now();
    while browser.script(script, json!([key])).await != true {
        assert!(started.elapsed().as_secs() < 10, "{key} is not listed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    browser.wait_text("#detail-key", key).await;
}

async fn sign_in(browser: &Browser, pair: &Pair) {
    browser.find("#sign-in-key").await.fill(&pair.key).await;
    browser
        .find("#sign-in-secret")
        .await
        .fill(&pair.secret)
        .await;
    browser.find("#sign-in-form button").await.click().await;
}

/// The pair the page shows after issuing or rolling, read before it is dismissed.
async fn shown_secret(browser: &Browser) -> Pair {
    browser.find("#secret-view .warning").await;
    Pair {
        key: browser.find("#new-key").await.text().await,
        secret: browser.find("#new-secret").await.text().await,
    }
}

/// Whether the page (its markup, its inputs' values) or its URL holds `secret`.
async fn page_holds(browser: &Browser, secret: &str) -> bool {
    let in_page = browser
        .script(
            "const inputs = [...document.querySelectorAll('input')].map(i => i.value).join(' '); \
             return document.documentElement.outerHTML.includes(arguments[0]) \
                 || inputs.includes(arguments[0]) || location.href.includes(arguments[0]);",
            json!([secret]),
        )
        .await;
    in_page == true || browser.url().await.contains(secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_does_its_job_in_a_real_browser() {
    ensure_tool("chromium", "chromium");
    ensure_tool("chromedriver", "chromium-driver");
    let (server, _dir) = credgate();
    let admin = server.registered().await;
    let customer = server
        .registered_with(
            json!({"name": "shop front", "owner": "acme", "scopes": ["orders:read"]}),
            Some(&admin),
        )
        .await;
    let other = server
        .registered_with(
            json!({"name": "batch job", "owner": "globex"}),
            Some(&admin),
        )
        .await;
    let reader = server
        .registered_with(json!({"scopes": ["credentials:read"]}), Some(&admin))
        .await;
    let writer = server
        .registered_with(
            json!({"scopes": ["credentials:read", "credentials:write"]}),
            Some(&admin),
        )
        .await;

    // The page's own protections.
    let page = reqwest::get(server.url("/console")).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["referrer-policy"], "no-referrer");
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "inline script or style"
    );

    let browser = Browser::start().await;
    browser.open(&server.url("/console")).await;

    // A wrong pair is refused, readably; a forged one too.
    sign_in(&browser, &mint()).await;
    browser.wait_text("#sign-in-error", "not accepted").await;
    sign_in(&browser, &forged()).await;
    browser.wait_text("#sign-in-error", "not accepted").await;
    assert!(!browser.visible("#app-view").await);

    // Signed in: the list, and the secret nowhere but in session storage.
    sign_in(&browser, &admin).await;
    let rows = browser.wait_text("#credentials tbody", &customer.key).await;
    // Each row names its master key, and when it was last used.
    assert!(
        rows.contains(crate::helpers::credentials::deriver().key_id()),
        "{rows}"
    );
    assert!(rows.contains("never"), "{rows}");
    assert!(!page_holds(&browser, &admin.secret).await);
    let stored = browser
        .script("return sessionStorage.getItem('credgate.pair');", json!([]))
        .await;
    assert!(stored.as_str().unwrap().contains(&admin.secret));
    let local = browser
        .script("return localStorage.length;", json!([]))
        .await;
    assert_eq!(local, 0);

    // Search by owner, and by key prefix.
    browser.find("#search-text").await.fill("acme").await;
    browser.find("#search-form button").await.click().await;
    let rows = browser.wait_text("#credentials tbody", "acme").await;
    assert!(
        rows.contains(&customer.key) && !rows.contains(&other.key),
        "{rows}"
    );
    browser
        .find("#search-text")
        .await
        .fill(&other.key[..12])
        .await;
    browser.find("#search-form button").await.click().await;
    let rows = browser.wait_text("#credentials tbody", &other.key).await;
    assert!(!rows.contains(&customer.key), "{rows}");
    browser.find("#search-text").await.fill("").await;
    browser.find("#search-form button").await.click().await;
    browser.wait_text("#credentials tbody", &customer.key).await;
    let list_png = browser.screenshot().await;

    // Issue: the secret is shown once, and it works.
    browser.find("#show-issue").await.click().await;
    browser.find("#issue-name").await.fill("ci runner").await;
    browser.find("#issue-owner").await.fill("team-x").await;
    browser
        .find("#issue-scopes")
        .await
        .fill("orders:read")
        .await;
    browser.find("#issue-form button").await.click().await;
    let issued = shown_secret(&browser).await;
    assert_eq!(server.verify(&issued).await, StatusCode::NO_CONTENT);
    browser.find("#secret-done").await.click().await;
    assert!(!page_holds(&browser, &issued.secret).await);

    // Its detail, with its audit trail; then roll it with no grace period.
    browser.wait_text("#credentials tbody", &issued.key).await;
    open_credential(&browser, &issued.key).await;
    browser.wait_text("#detail-fields", "team-x").await;
    browser.wait_text("#events", "issued").await;
    let detail_png = browser.screenshot().await;
    browser.find("#roll").await.click().await;
    browser.find("#roll-grace").await.fill("0").await;
    browser.find("#roll-form button").await.click().await;
    let rolled = shown_secret(&browser).await;
    assert_ne!(rolled.key, issued.key);
    assert_eq!(server.verify(&rolled).await, StatusCode::NO_CONTENT);
    assert_eq!(server.verify(&issued).await, StatusCode::UNAUTHORIZED);
    browser.find("#secret-done").await.click().await;

    // Revoke, after a confirmation naming the key: refused by /auth/verify at once.
    open_credential(&browser, &other.key).await;
    browser.find("#revoke").await.click().await;
    let question = browser.accept_dialog().await;
    assert!(question.contains(&other.key), "{question}");
    browser.wait_text("#message", "Revoked").await;
    browser.wait_text("#detail-fields", "revoked").await;
    assert_eq!(server.verify(&other).await, StatusCode::UNAUTHORIZED);

    // Edit: the attributes change, as the API says.
    open_credential(&browser, &customer.key).await;
    browser.find("#edit").await.click().await;
    browser.find("#edit-name").await.fill("shop front v2").await;
    browser.find("#edit-form button").await.click().await;
    browser.wait_text("#message", "Saved").await;
    browser.wait_text("#detail-fields", "shop front v2").await;
    assert_eq!(
        server.record(&customer.key, &admin).await["name"],
        "shop front v2"
    );

    // The live chart counts authentications from /metrics.
    for _ in 0..5 {
        server.verify(&customer).await;
    }
    let started = std::time::Instant::now();
    loop {
        let latest = browser
            .script(
                "return document.getElementById('chart').dataset.latest || '';",
                json!([]),
            )
            .await;
        if latest
            .as_str()
            .is_some_and(|l| l.contains("\"ok\":") && !l.contains("\"ok\":0"))
        {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 10,
            "the chart saw no authentication: {latest}"
        );
        for _ in 0..5 {
            server.verify(&customer).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    // Sign out clears the pair.
    browser.find("#sign-out").await.click().await;
    browser.find("#sign-in-form").await;
    let stored = browser
        .script("return sessionStorage.getItem('credgate.pair');", json!([]))
        .await;
    assert!(stored.is_null(), "{stored}");

    // A reader sees others but is offered neither revoke, edit, roll nor issue.
    sign_in(&browser, &reader).await;
    browser.wait_text("#credentials tbody", &customer.key).await;
    assert!(!browser.visible("#show-issue").await);
    open_credential(&browser, &customer.key).await;
    for button in ["#revoke", "#edit", "#roll"] {
        assert!(
            !browser.visible(button).await,
            "{button} offered to a reader"
        );
    }
    browser.wait_text("#events", "audit:read").await;
    browser.find("#sign-out").await.click().await;

    // A writer may edit, but not grant what it lacks: the API's 403, readably.
    sign_in(&browser, &writer).await;
    browser.wait_text("#credentials tbody", &customer.key).await;
    open_credential(&browser, &customer.key).await;
    assert!(!browser.visible("#revoke").await);
    browser.find("#edit").await.click().await;
    browser
        .find("#edit-scopes")
        .await
        .fill("orders:read audit:read")
        .await;
    browser.find("#edit-form button").await.click().await;
    let message = browser.wait_text("#message", "INSUFFICIENT_SCOPE").await;
    assert!(message.contains("audit:read"), "{message}");

    // Screenshots of the real page, for the README.
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(shots.join("console-list.png"), list_png).unwrap();
    std::fs::write(shots.join("console-detail.png"), detail_png).unwrap();
}
