//! SPEC §9: credgate with the ecosystem's own tools, run for real. Prometheus: `/metrics` as
//! `promtool` reads it, and the example scrape configuration and alert rules in
//! `deploy/prometheus/`, checked and unit-tested by `promtool`. Tools missing on this machine
//! are installed from Debian's packages when the tests run as root.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use reqwest::{Method, StatusCode};

use crate::helpers::credentials::{MASTER_HEX, forged, mint};
use crate::helpers::server_process::ServerProcess;

/// Makes sure `tool` is on PATH, installing Debian's `package` when it is not (as root);
/// otherwise fails, naming the package: a check that is skipped is not a check.
fn ensure_tool(tool: &str, package: &str) {
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
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                 apt-get install -y -qq --no-install-recommends {package}"
            ),
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(installed && found(tool), "could not install `{package}`");
}

fn repo(path: &str) -> PathBuf {
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

fn report(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn metrics_pass_promtool_and_the_example_alerts_hold() {
    ensure_tool("promtool", "prometheus");
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("master.hex");
    std::fs::write(&key_file, format!("{MASTER_HEX}\n")).unwrap();
    let server = ServerProcess::start(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--master-key-file",
        key_file.to_str().unwrap(),
    ]);
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

    // The rules name only series the service exports: a renamed metric cannot silently
    // leave an alert that never fires.
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let names = regex::Regex::new(r"credgate_[a-z_]+").unwrap();
    for name in names.find_iter(&rules).map(|m| m.as_str()) {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "alerts.yml uses {name}, which /metrics does not export"
        );
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
