//! SPEC §9: credgate with the ecosystem's own tools, run for real. Prometheus: `/metrics` as
//! `promtool` reads it, and the example scrape configuration and alert rules in
//! `deploy/prometheus/`, checked and unit-tested by `promtool`. Tools missing on this machine
//! are installed from Debian's packages when the tests run as root.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

use crate::helpers::credentials::{MASTER_HEX, Pair, forged, mint};
use crate::helpers::server_process::ServerProcess;

/// Makes sure `tool` is on PATH, installing Debian's `package` when it is not (as root);
/// otherwise fails, naming the package: a check that is skipped is not a check.
pub(crate) fn ensure_tool(tool: &str, package: &str) {
    // One installation at a time: the tests run in parallel, and dpkg takes one at a time.
    static APT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _apt = APT.lock().unwrap_or_else(|p| p.into_inner());
    let found = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found(tool) {
        return;
    }
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "`{tool}` is missing: install the Debian package `{package}` (the tests do so as root)"
    );
    let installed = Command::new("sh")
        .args([
            "-c",
            &format!(
                "apt-get -o DPkg::Lock::Timeout=120 update -qq && \
                 DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 \
                 install -y -qq --no-install-recommends {package}"
            ),
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(installed && found(tool), "could not install `{package}`");
}

pub(crate) fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write to promtool");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("promtool")
}

pub(crate) fn report(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn metrics_pass_promtool_and_the_example_alerts_hold() {
    ensure_tool("promtool", "prometheus");
    let (server, _dir) = credgate();
    // Traffic that puts a sample in every series: each authentication result the SQLite
    // store can produce, registrations, revocations, reads, a 404.
    let (admin, other) = (server.registered().await, server.registered().await);
    assert_eq!(server.verify(&admin).await, StatusCode::NO_CONTENT);
    assert_eq!(server.verify(&forged()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        server.revoke(&other.key, &admin).await.status(),
        StatusCode::OK
    );
    assert_eq!(server.verify(&other).await, StatusCode::UNAUTHORIZED);
    let unknown = mint();
    assert_eq!(server.verify(&unknown).await, StatusCode::UNAUTHORIZED);
    let resp = server.send(Method::GET, "/audit", Some(&admin)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = server.send(Method::GET, "/nowhere", Some(&admin)).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let resp = server.send(Method::GET, "/metrics", None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let metrics = resp.text().await.unwrap();
    let out = promtool(&["check", "metrics"], Some(&metrics));
    assert!(
        out.status.success(),
        "promtool check metrics: {}",
        report(&out)
    );
    assert!(report(&out).trim().is_empty(), "lint: {}", report(&out));

    // The examples are valid, and every alert fires (and only) when it should.
    let config = repo("deploy/prometheus/prometheus.yml");
    let out = promtool(&["check", "config", config.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", report(&out));
    let tests = repo("deploy/prometheus/alerts.test.yml");
    let out = promtool(&["test", "rules", tests.to_str().unwrap()], None);
    assert!(out.status.success(), "{}", report(&out));

    // The Grafana dashboard's queries are valid PromQL (checked as recording rules, with
    // Grafana's `$__rate_interval` made a plain range).
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/credgate-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().expect("targets").iter())
        .map(|target| {
            target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "5m")
        })
        .collect();
    assert!(queries.len() >= 8);
    let mut recorded = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        recorded.push_str(&format!(
            "      - record: credgate:dashboard_{i}\n        expr: {}\n",
            serde_json::to_string(query).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard.rules.yml");
    std::fs::write(&path, recorded).unwrap();
    let out = promtool(&["check", "rules", path.to_str().unwrap()], None);
    assert!(out.status.success(), "dashboard queries: {}", report(&out));

    // The rules and the dashboard name only series the service exports: a renamed metric
    // cannot silently leave an alert that never fires or a panel that stays empty.
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let names = regex::Regex::new(r"credgate_[a-z_]+").unwrap();
    for (file, text) in [("alerts.yml", rules), ("the dashboard", queries.join("\n"))] {
        for name in names.find_iter(&text).map(|m| m.as_str()) {
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(
                metrics.contains(&format!("# TYPE {family} ")),
                "{file} uses {name}, which /metrics does not export"
            );
        }
    }
}

/// The example unit passes `systemd-analyze verify` without a warning, with the built binary
/// in place of the installed one, and keeps its hardening: an overall exposure of at most
/// 2.0 by `systemd-analyze security` (0 is the most locked down, 10 the least).
#[test]
fn the_systemd_unit_verifies_and_stays_hardened() {
    ensure_tool("systemd-analyze", "systemd");
    let unit = std::fs::read_to_string(repo("deploy/systemd/credgate.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/credgate serve"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credgate.service");
    let unit = unit.replace("/usr/local/bin/credgate", env!("CARGO_BIN_EXE_credgate"));
    std::fs::write(&path, unit).unwrap();
    let path = path.to_str().unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path])
        .output()
        .expect("run systemd-analyze");
    assert!(out.status.success(), "{}", report(&out));
    assert!(report(&out).trim().is_empty(), "warnings: {}", report(&out));
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", path])
        .output()
        .expect("run systemd-analyze");
    assert!(
        out.status.success(),
        "exposure above 2.0:\n{}",
        report(&out)
    );
}

/// The README's configuration for a proxy, verbatim: its first code block in `lang`.
pub(crate) fn readme_block(lang: &str) -> String {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let fence = format!("```{lang}\n");
    let start = readme.find(&fence).expect("the block in README.md") + fence.len();
    let end = start + readme[start..].find("```").expect("its end");
    readme[start..end].to_owned()
}

/// An upstream API that answers every request with the path and headers it received, and
/// counts the requests that reached it.
async fn echo_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    use axum::http::HeaderMap;
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let headers: serde_json::Map<String, serde_json::Value> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                .collect();
            axum::Json(serde_json::json!({ "path": uri.path(), "headers": headers }))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, hits)
}

/// A proxy in the foreground with its files in a directory of its own; killed when dropped.
pub(crate) struct Proxy {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl Proxy {
    /// Runs `command` (whose files are in `dir`) and waits until it accepts on `listen`.
    fn spawn(mut command: Command, dir: tempfile::TempDir, listen: SocketAddr) -> Self {
        let log = std::fs::File::create(dir.path().join("error.log")).unwrap();
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the proxy");
        let proxy = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(listen).is_err() {
            assert!(
                Instant::now() < deadline,
                "the proxy did not listen: {}",
                proxy.errors()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    }

    /// nginx running `server_block` (a `server { … }` and what it needs, in `http`), which
    /// gets `listen` as its first directive.
    fn nginx(server_block: &str, listen: SocketAddr) -> Self {
        let block =
            server_block.replacen("server {", &format!("server {{\n    listen {listen};"), 1);
        Self::nginx_http(&block, listen)
    }

    /// nginx running `http` (the contents of its `http` block, as they are), which must
    /// listen on `listen`; checked with `nginx -t` first.
    pub(crate) fn nginx_http(http: &str, listen: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{http}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let prefix = d.to_string();
        let out = Command::new("nginx")
            .args(["-t", "-p", &prefix, "-c", "nginx.conf"])
            .output()
            .expect("nginx -t");
        assert!(out.status.success(), "nginx -t: {}", report(&out));
        let mut command = Command::new("nginx");
        command.args(["-p", &prefix, "-c", "nginx.conf"]);
        Self::spawn(command, dir, listen)
    }

    /// Caddy running `caddyfile`.
    fn caddy(caddyfile: &str, listen: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Caddyfile");
        std::fs::write(&path, caddyfile).unwrap();
        let mut command = Command::new("caddy");
        command
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path());
        Self::spawn(command, dir, listen)
    }

    pub(crate) fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// credgate with the test master key, in a directory of its own.
pub(crate) fn credgate() -> (ServerProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.hex");
    std::fs::write(&key_file, format!("{MASTER_HEX}\n")).unwrap();
    let server = ServerProcess::start(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--master-key-file",
        key_file.to_str().unwrap(),
    ]);
    (server, dir)
}

/// The README's forward-auth promises, through a proxy at `listen` in front of the echo
/// upstream: a valid credential reaches the API, which learns who called (and cannot be
/// lied to about it) and never sees the secret; the location requiring `orders:write`
/// refuses a credential without it; forged, revoked and missing credentials get 401; with
/// credgate down the client gets a 5xx. In every refused case the API is never reached.
async fn forward_auth_holds(
    proxy: &Proxy,
    listen: SocketAddr,
    credgate: ServerProcess,
    hits: &AtomicUsize,
    forwards_owner: bool,
) {
    // Requests go to the proxy, with the credential headers when a pair is given.
    let proxy_client = crate::helpers::client::Client::new(listen);
    let get =
        |path: &str, pair: Option<&Pair>| proxy_client.request(reqwest::Method::GET, path, pair);
    let admin = credgate.registered().await;
    let customer = credgate
        .registered_with(
            serde_json::json!({ "owner": "acme", "scopes": ["orders:read"] }),
            Some(&admin),
        )
        .await;
    let resp = get("/api/x?page=2", Some(&customer)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", proxy.errors());
    let seen: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(seen["path"], "/x");
    assert_eq!(seen["headers"]["x-credential-key"], customer.key.as_str());
    if forwards_owner {
        assert_eq!(seen["headers"]["x-credential-owner"], "acme");
    } else {
        assert!(
            seen["headers"].get("x-credential-owner").is_none(),
            "{seen}"
        );
    }
    assert!(
        seen["headers"].get("x-api-secret").is_none(),
        "the secret reached the API: {seen}"
    );
    // A client cannot tell the API it is someone else: the administrator has no owner.
    let resp = get("/api/x", Some(&admin))
        .header("X-Credential-Owner", "someone-else")
        .header("X-Credential-Key", &customer.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(seen["headers"]["x-credential-key"], admin.key.as_str());
    assert!(
        seen["headers"].get("x-credential-owner").is_none(),
        "a client-sent owner reached the API: {seen}"
    );
    let reached = hits.load(Ordering::SeqCst);

    // The scope-requiring location: 403 for the customer, through for the administrator.
    let resp = get("/api/orders/1", Some(&customer)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(hits.load(Ordering::SeqCst), reached);
    let resp = get("/api/orders/1", Some(&admin)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(seen["path"], "/orders/1");
    assert_eq!(seen["headers"]["x-credential-key"], admin.key.as_str());
    let reached = hits.load(Ordering::SeqCst);

    // Forged, missing, revoked: 401, and the API never sees them.
    let status = |resp: reqwest::Result<reqwest::Response>| resp.unwrap().status();
    assert_eq!(
        status(get("/api/x", Some(&forged())).send().await),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(get("/api/x", None).send().await),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        credgate.revoke(&customer.key, &admin).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        status(get("/api/x", Some(&customer)).send().await),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(hits.load(Ordering::SeqCst), reached);

    // credgate down: a 5xx for the client, nothing for the API.
    drop(credgate);
    let down = status(get("/api/x", Some(&admin)).send().await);
    assert!(down.is_server_error(), "credgate down answered {down}");
    assert_eq!(hits.load(Ordering::SeqCst), reached);
}

/// nginx `auth_request` with the README's configuration, verbatim but for its addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_with_the_readme_configuration() {
    ensure_tool("nginx", "nginx");
    let (credgate, _dir) = credgate();
    let (upstream, hits) = echo_upstream().await;
    let block = readme_block("nginx")
        .replace(
            "server 127.0.0.1:8080;",
            &format!("server {};", credgate.addr),
        )
        .replace("http://your-api/", &format!("http://{upstream}/"));
    let listen = free_port();
    let proxy = Proxy::nginx(&block, listen);
    forward_auth_holds(&proxy, listen, credgate, &hits, true).await;
}

/// Caddy `forward_auth` with the README's Caddyfile, verbatim but for its addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_forward_auth_with_the_readme_configuration() {
    ensure_tool("caddy", "caddy");
    let (credgate, _dir) = credgate();
    let (upstream, hits) = echo_upstream().await;
    let listen = free_port();
    let caddyfile = readme_block("caddyfile")
        .replace("http://:8000", &format!("http://{listen}"))
        .replace("127.0.0.1:8080", &credgate.addr.to_string())
        .replace("your-api:80", &upstream.to_string());
    let proxy = Proxy::caddy(&caddyfile, listen);
    // The README copies only the key with Caddy 2.6 (see there why).
    forward_auth_holds(&proxy, listen, credgate, &hits, false).await;
}

/// The schemathesis release the suite runs: pinned, so a new release cannot change the verdict.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// A virtualenv named `name` under `target/` with exactly `requirements` (pinned), made the
/// first time and reused by later runs; returns its directory.
pub(crate) fn virtualenv(name: &str, requirements: &[&str]) -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let marker = venv.join("installed");
    let wanted = requirements.join(" ");
    if std::fs::read_to_string(&marker).is_ok_and(|v| v == wanted)
        && venv.join("bin/python").exists()
    {
        return venv;
    }
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("run python3");
        assert!(out.status.success(), "{cmd:?} failed:\n{}", report(&out));
    };
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv));
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(requirements));
    std::fs::write(&marker, wanted).unwrap();
    venv
}

/// schemathesis, from its virtualenv.
fn schemathesis() -> PathBuf {
    virtualenv("schemathesis-venv", &[SCHEMATHESIS]).join("bin/schemathesis")
}

/// schemathesis, every operation of `/openapi.json` with every check, against a live server
/// with a credential that works (`tests/schemathesis/hooks.py` mints a new one whenever the
/// run revoked, rolled or narrowed its own): no 5xx, and every answer is what the document
/// says (status, content type, headers, body), valid input accepted and invalid refused. The
/// few checks turned off for one operation say why in `tests/schemathesis/schemathesis.toml`.
#[tokio::test]
async fn schemathesis_finds_the_api_as_its_document_says() {
    let binary = schemathesis();
    let (server, dir) = credgate();
    let document: serde_json::Value = reqwest::get(server.url("/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operations: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    // Run in a scratch directory under target/: schemathesis and Hypothesis write their
    // state where they run, and the source tree stays as it is.
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for file in ["schemathesis.toml", "hooks.py"] {
        std::fs::copy(
            repo("tests/schemathesis").join(file),
            work.path().join(file),
        )
        .unwrap();
    }
    let out = Command::new(binary)
        .current_dir(work.path())
        .env("CREDGATE_URL", server.url(""))
        .env("CREDGATE_BIN", env!("CARGO_BIN_EXE_credgate"))
        .env("CREDGATE_MASTER_KEY_FILE", dir.path().join("master.hex"))
        .env("NO_COLOR", "1")
        .args(["--config-file", "schemathesis.toml", "run"])
        .arg(server.url("/openapi.json"))
        .output()
        .expect("run schemathesis");
    let text = report(&out);
    assert!(out.status.success(), "schemathesis failed:\n{text}");
    assert!(
        text.contains(&format!("Tested: {operations}")),
        "not every one of the {operations} operations was tested:\n{text}"
    );
}
