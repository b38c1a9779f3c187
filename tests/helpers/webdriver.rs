//! A headless Chromium driven over the W3C WebDriver protocol (plain HTTP and JSON, spoken
//! with reqwest): `chromedriver` from Debian's `chromium-driver`, started on a free port and
//! stopped when dropped. Only what the console tests use.

use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session; the driver and the browser end with it.
pub struct Browser {
    driver: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole process group: chromedriver's Chromium processes would outlive it.
        if let Ok(group) = i32::try_from(self.driver.id()) {
            // SAFETY: kill(2) takes plain integers and touches no memory.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// An element of the current page.
pub struct Element<'b> {
    browser: &'b Browser,
    id: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            // A group of its own, which it and the browser it starts share.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            let ready = http.get(format!("{root}/status")).send().await;
            if let Ok(r) = ready
                && let Ok(status) = r.json::<Value>().await
                && status["value"]["ready"] == true
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            },
        }}});
        let session: Value = http
            .post(format!("{root}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session answer");
        let id = session["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {session}"))
            .to_owned();
        Self {
            driver,
            base: format!("{root}/session/{id}"),
            http,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let answer: Value = req
            .send()
            .await
            .expect("webdriver request")
            .json()
            .await
            .expect("webdriver answer");
        answer["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// Loads `url` and waits for the page.
    pub async fn open(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await;
    }

    /// The current URL.
    pub async fn url(&self) -> String {
        self.get("/url")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its value.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    /// The element `css` selects, waiting up to 10 s for it to exist and be displayed.
    pub async fn find(&self, css: &str) -> Element<'_> {
        let started = Instant::now();
        loop {
            let found = self
                .post("/element", json!({"using": "css selector", "value": css}))
                .await;
            if let Some(id) = found[ELEMENT].as_str() {
                let element = Element {
                    browser: self,
                    id: id.to_owned(),
                };
                if element.displayed().await {
                    return element;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no visible element {css}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether `css` selects a displayed element now.
    pub async fn visible(&self, css: &str) -> bool {
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        match found[ELEMENT].as_str() {
            Some(id) => {
                Element {
                    browser: self,
                    id: id.to_owned(),
                }
                .displayed()
                .await
            }
            None => false,
        }
    }

    /// Waits up to 10 s for the text of `css` to contain `text`; returns the text.
    pub async fn wait_text(&self, css: &str, text: &str) -> String {
        let started = Instant::now();
        loop {
            if self.visible(css).await {
                let now = self.find(css).await.text().await;
                if now.contains(text) {
                    return now;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "{css} shows {now:?}, not {text:?}"
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{css} never showed {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Accepts the open `confirm` dialog, returning its text.
    pub async fn accept_dialog(&self) -> String {
        let started = Instant::now();
        loop {
            let text = self.get("/alert/text").await;
            if let Some(text) = text.as_str() {
                self.post("/alert/accept", json!({})).await;
                return text.to_owned();
            }
            assert!(started.elapsed() < Duration::from_secs(10), "no dialog");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let png = self.get("/screenshot").await;
        base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("a screenshot"))
            .expect("base64 PNG")
    }
}

impl Element<'_> {
    fn path(&self, rest: &str) -> String {
        format!("/element/{}{rest}", self.id)
    }

    /// Clicks it.
    pub async fn click(&self) {
        self.browser.post(&self.path("/click"), json!({})).await;
    }

    /// Types `text` into it, after clearing it.
    pub async fn fill(&self, text: &str) {
        self.browser.post(&self.path("/clear"), json!({})).await;
        self.browser
            .post(&self.path("/value"), json!({ "text": text }))
            .await;
    }

    /// Its rendered text.
    pub async fn text(&self) -> String {
        self.browser
            .get(&self.path("/text"))
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn displayed(&self) -> bool {
        self.browser.get(&self.path("/displayed")).await == true
    }
}
