//! SPEC §9 packaging: the Dockerfile, compose.yaml, the nginx configuration compose mounts
//! (`deploy/nginx/credgate.conf`) and the Envoy configuration (`deploy/envoy/envoy.yaml`),
//! checked as far as this machine allows without running containers or Envoy: what the image
//! runs is run with the built binary, compose.yaml is validated by Debian's `docker-compose`
//! (which needs no daemon for `config`), the nginx configuration is run by a real nginx in
//! front of two real credgate instances, and the Envoy configuration is parsed against
//! Envoy's v3 API (the `envoy-data-plane` bindings from PyPI) before its meaning is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::ecosystem::{Proxy, credgate, ensure_tool, free_port, repo, report, virtualenv};
use crate::helpers::credentials::{Pair, forged};
use crate::helpers::server_process::ServerProcess;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// One Dockerfile instruction: its keyword (upper case) and the rest of it, continuation
/// lines joined.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// The Dockerfile's build stages, in order, each a list of instructions (its `FROM` first).
fn dockerfile_stages() -> Vec<Vec<Instruction>> {
    let text = read("Dockerfile");
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    assert!(current.is_empty(), "the Dockerfile ends in a continuation");
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for line in logical.into_iter().filter(|l| !l.trim().is_empty()) {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let instruction = Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_owned(),
        };
        if instruction.keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
    }
    stages
}

/// The arguments of each `keyword` instruction of a stage.
fn all<'a>(stage: &'a [Instruction], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|i| i.keyword == keyword)
        .map(|i| i.args.as_str())
        .collect()
}

/// The arguments of the last `keyword` instruction of a stage (the one in force).
fn last<'a>(stage: &'a [Instruction], keyword: &str) -> &'a str {
    all(stage, keyword)
        .pop()
        .unwrap_or_else(|| panic!("the final stage has no {keyword}"))
}

/// An exec-form (JSON array) argument list.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args)
        .unwrap_or_else(|_| panic!("`{args}` is not in exec form (a JSON array)"))
}

/// The variables the final stage's `ENV` instructions set (`KEY=value` form).
fn image_env(stage: &[Instruction]) -> BTreeMap<String, String> {
    all(stage, "ENV")
        .iter()
        .flat_map(|args| args.split_whitespace())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .unwrap_or_else(|| panic!("ENV {pair}: use the KEY=value form"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// The Dockerfile: a multi-stage build on the official images, the binary alone in a slim
/// runtime stage running as a fixed non-root uid, in exec form (so `credgate` is PID 1 and
/// gets the SIGTERM of `docker stop`), with a health check on `/health`, the data directory a
/// volume, and nothing from the build context beyond the sources (never a key).
#[test]
fn the_dockerfile_is_multi_stage_non_root_and_health_checked() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "not a multi-stage build");
    let builder = &stages[0];
    let from = builder[0].args.to_ascii_lowercase();
    assert_eq!(from, "rust:1-bookworm as builder");
    assert!(
        all(builder, "RUN")
            .iter()
            .any(|run| run.contains("cargo build --release --locked")),
        "the builder does not run `cargo build --release --locked`"
    );
    let runtime = stages.last().expect("a stage");
    assert_eq!(runtime[0].args, "debian:bookworm-slim");
    assert!(
        all(runtime, "COPY")
            .contains(&"--from=builder /build/target/release/credgate /usr/local/bin/credgate"),
        "the runtime stage does not take the binary from the builder"
    );

    // A fixed uid that is not root, in force at the end of the final stage.
    let user = last(runtime, "USER");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("USER {user}: give a numeric uid"));
    assert_ne!(uid, 0, "the image runs as root");

    // Where it listens and keeps its data.
    let env = image_env(runtime);
    assert_eq!(env["CREDGATE_LISTEN"], "0.0.0.0:8080");
    let data_dir = &env["CREDGATE_DATA_DIR"];
    assert_eq!(exec_form(last(runtime, "VOLUME")), vec![data_dir.clone()]);
    assert_eq!(last(runtime, "EXPOSE"), "8080");
    assert_eq!(exec_form(last(runtime, "ENTRYPOINT")), ["credgate"]);
    assert_eq!(exec_form(last(runtime, "CMD")), ["serve"]);

    // The health check asks /health on the listening port, with a tool the image installs.
    let health = last(runtime, "HEALTHCHECK");
    let command = exec_form(
        health
            .split_once("CMD ")
            .map(|(_, command)| command)
            .expect("HEALTHCHECK … CMD [...]"),
    );
    assert!(
        command
            .last()
            .is_some_and(|url| url == "http://127.0.0.1:8080/health"),
        "{command:?}"
    );
    let tool = &command[0];
    assert!(
        all(runtime, "RUN")
            .iter()
            .any(|run| run.contains("apt-get install")
                && run.split_whitespace().any(|word| word == tool.as_str())),
        "the runtime stage does not install `{tool}`, which its health check runs"
    );

    // Only the sources go into the build, and no key or secret can.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    for must in ["target", ".git", "secrets", "*.key", ".env"] {
        assert!(
            ignored.iter().any(|i| i == must),
            ".dockerignore lets {must} in"
        );
    }
    for stage in &stages {
        for copy in all(stage, "COPY")
            .iter()
            .filter(|c| !c.starts_with("--from"))
        {
            let words: Vec<&str> = copy.split_whitespace().collect();
            for source in &words[..words.len() - 1] {
                let source = source.trim_end_matches('/');
                assert!(
                    repo(source).exists(),
                    "COPY {source}: not in the repository"
                );
                assert!(
                    !ignored.iter().any(|i| i == source),
                    "COPY {source}, which .dockerignore leaves out"
                );
            }
        }
    }
}

/// What the image runs, run here with the built binary: `serve` with the image's environment
/// (its data directory a fresh one) starts with no other configuration, keeps the SQLite
/// database and a generated master key (mode 0600) in the data directory, and the image's
/// health check command passes against it — and fails once it is gone.
#[test]
fn what_the_image_runs_starts_and_passes_its_health_check() {
    ensure_tool("curl", "curl");
    let stages = dockerfile_stages();
    let runtime = stages.last().expect("a stage");
    let env = image_env(runtime);
    let volume = tempfile::tempdir().expect("tempdir");
    let data_dir = volume.path().join("credgate");
    let server = ServerProcess::start_with(&[], |command| {
        command
            .envs(&env)
            .env("CREDGATE_DATA_DIR", &data_dir)
            .current_dir(volume.path());
    });
    for file in ["credgate.db", "master.key"] {
        assert!(data_dir.join(file).exists(), "{file} is not in the volume");
    }
    let mode = std::fs::metadata(data_dir.join("master.key"))
        .expect("master.key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let health = last(runtime, "HEALTHCHECK");
    let command: Vec<String> = exec_form(health.split_once("CMD ").expect("CMD").1)
        .into_iter()
        .map(|arg| arg.replace("127.0.0.1:8080", &server.addr.to_string()))
        .collect();
    let check = || {
        Command::new(&command[0])
            .args(&command[1..])
            .output()
            .expect("run the health check")
    };
    let out = check();
    assert!(out.status.success(), "health check: {}", report(&out));
    drop(server);
    assert!(
        !check().status.success(),
        "the health check passes with no server"
    );
}

/// A YAML document as JSON, read by Python's PyYAML (`python` must have it).
fn yaml_to_json(python: &Path, yaml: &[u8]) -> Value {
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), yaml).expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(out.status.success(), "not YAML: {}", report(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

/// `docker-compose config` on compose.yaml, with `password` as POSTGRES_PASSWORD (none when
/// `None`) and no `.env` file.
fn compose_config(password: Option<&str>) -> Output {
    let env_file = tempfile::NamedTempFile::new().expect("an empty env file");
    let mut command = Command::new("docker-compose");
    command
        .arg("--env-file")
        .arg(env_file.path())
        .arg("-f")
        .arg(repo("compose.yaml"))
        .arg("config")
        .current_dir(repo(""))
        .env_remove("POSTGRES_PASSWORD");
    if let Some(password) = password {
        command.env("POSTGRES_PASSWORD", password);
    }
    command.output().expect("run docker-compose")
}

/// The `server host:port` lines of one nginx `upstream` block.
fn upstream_servers(conf: &str, name: &str) -> Vec<String> {
    let start = conf
        .find(&format!("upstream {name} {{"))
        .unwrap_or_else(|| panic!("no upstream {name}"));
    let block = &conf[start..start + conf[start..].find('}').expect("its end")];
    block
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .map(|l| l.split([' ', ';']).next().expect("address").to_owned())
        .collect()
}

/// compose.yaml is valid Compose (checked by Debian's `docker-compose`, which needs no
/// daemon for `config`) and wires the deployment together: PostgreSQL with a `pg_isready`
/// health check; two credgate instances built from the Dockerfile, on that database with its
/// user, password and name, the master key from a secret file (which never enters a build),
/// each healthy only when /health answers and started only once PostgreSQL is healthy; nginx
/// in front with deploy/nginx/credgate.conf, balancing over exactly those two instances on
/// the port the image listens on, started once both are healthy. The database password must
/// be given: there is no default one.
#[test]
fn compose_is_valid_and_wires_postgres_two_instances_and_nginx() {
    ensure_tool("docker-compose", "docker-compose");
    let out = compose_config(None);
    assert!(!out.status.success(), "compose.yaml has a default password");
    assert!(
        report(&out).contains("POSTGRES_PASSWORD"),
        "{}",
        report(&out)
    );

    let password = "0123abcd";
    let out = compose_config(Some(password));
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        report(&out)
    );
    // docker-compose runs on Debian's python3, with PyYAML (one of its dependencies).
    let config = yaml_to_json(Path::new("/usr/bin/python3"), &out.stdout);
    let services = config["services"].as_object().expect("services");

    let postgres = &services["postgres"];
    assert_eq!(postgres["image"], "postgres:15");
    assert!(
        postgres["healthcheck"]["test"]
            .to_string()
            .contains("pg_isready"),
        "{postgres}"
    );
    let pg_env = &postgres["environment"];

    let root = repo("").canonicalize().expect("repository root");
    let instances: Vec<(&String, &Value)> = services
        .iter()
        .filter(|(_, s)| {
            s["build"]["context"]
                .as_str()
                .is_some_and(|c| Path::new(c) == root)
        })
        .collect();
    assert_eq!(
        instances.len(),
        2,
        "two credgate instances built from the Dockerfile"
    );
    let secret_file = config["secrets"]["credgate_master_key"]["file"]
        .as_str()
        .expect("the master key secret is a file");
    assert_eq!(Path::new(secret_file), root.join("secrets/master.key"));
    for (name, service) in &instances {
        let env = &service["environment"];
        assert_eq!(
            env["CREDGATE_DATABASE_URL"],
            format!(
                "postgres://{}:{password}@postgres:5432/{}",
                pg_env["POSTGRES_USER"].as_str().expect("user"),
                pg_env["POSTGRES_DB"].as_str().expect("database")
            ),
            "{name}"
        );
        assert_eq!(
            env["CREDGATE_MASTER_KEY_FILE"], "/run/secrets/credgate_master_key",
            "{name}"
        );
        assert!(
            service["secrets"]
                .as_array()
                .expect("secrets")
                .iter()
                .any(|s| s["source"] == "credgate_master_key" && s.get("target").is_none()),
            "{name} does not mount the master key"
        );
        assert_eq!(
            service["depends_on"]["postgres"]["condition"], "service_healthy",
            "{name}"
        );
        assert!(
            service["healthcheck"]["test"]
                .to_string()
                .contains("/health"),
            "{name}"
        );
        assert!(service.get("ports").is_none(), "{name} is published");
        // Longer than credgate's own --shutdown-timeout (30 s).
        let grace = service["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period");
        let seconds: u64 = grace.trim_end_matches('s').parse().expect("seconds");
        assert!(seconds > 30, "{name}: stop_grace_period {grace}");
    }

    // nginx: the configuration file in the repository, in front of exactly those instances.
    let nginx = &services["nginx"];
    let mounts: Vec<&str> = nginx["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| v.as_str().expect("short syntax"))
        .collect();
    let conf_path = root.join("deploy/nginx/credgate.conf");
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with(&format!("{}:/etc/nginx/conf.d/", conf_path.display()))),
        "{mounts:?}"
    );
    for (name, _) in &instances {
        assert_eq!(
            nginx["depends_on"][name.as_str()]["condition"],
            "service_healthy"
        );
    }
    let conf = read("deploy/nginx/credgate.conf");
    let listen_port = {
        let stages = dockerfile_stages();
        image_env(stages.last().expect("a stage"))["CREDGATE_LISTEN"]
            .rsplit(':')
            .next()
            .expect("port")
            .to_owned()
    };
    let mut upstream = upstream_servers(&conf, "credgate");
    upstream.sort();
    let mut expected: Vec<String> = instances
        .iter()
        .map(|(name, _)| format!("{name}:{listen_port}"))
        .collect();
    expected.sort();
    assert_eq!(upstream, expected);
    let published = nginx["ports"][0].as_str().expect("nginx publishes a port");
    let container_port = published
        .trim_end_matches("/tcp")
        .rsplit(':')
        .next()
        .expect("port");
    assert!(
        conf.contains(&format!("listen {container_port};")),
        "nginx publishes {published}, which credgate.conf does not listen on"
    );
}

/// What the stand-in API of credgate.conf answered: its `name: value` lines.
async fn seen(resp: reqwest::Response) -> BTreeMap<String, String> {
    assert_eq!(resp.status(), StatusCode::OK);
    resp.text()
        .await
        .expect("body")
        .lines()
        .filter_map(|l| {
            l.split_once(": ")
                .or_else(|| l.strip_suffix(':').map(|k| (k, "")))
        })
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Asserts that `series` of an instance's /metrics is at least 1.
async fn counted(server: &ServerProcess, series: &str) {
    let text = server
        .send(reqwest::Method::GET, "/metrics", None)
        .await
        .text()
        .await
        .expect("metrics");
    let value: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0);
    assert!(
        value >= 1.0,
        "{series} is {value} on {}:\n{text}",
        server.addr
    );
}

/// deploy/nginx/credgate.conf, as compose runs it but for its addresses, in front of two
/// credgate instances on one database: a valid credential reaches the API with who it is
/// (key, owner, scopes) and without its secret, and a client cannot claim another identity;
/// the orders location refuses a credential without `orders:write`; forged, missing and
/// revoked credentials get 401; the authentication requests are spread over both instances;
/// with one instance down every request is still answered, with both down the client gets a
/// 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_nginx_config_authenticates_through_both_instances() {
    ensure_tool("nginx", "nginx");
    let (first, dir) = credgate();
    let data_dir = dir.path().to_str().expect("utf-8 path");
    let key_file = dir.path().join("master.hex");
    let second = ServerProcess::start(&[
        "--data-dir",
        data_dir,
        "--master-key-file",
        key_file.to_str().expect("utf-8 path"),
    ]);
    let (listen, api) = (free_port(), free_port());
    let conf = read("deploy/nginx/credgate.conf");
    for needle in [
        "credgate-1:8080",
        "credgate-2:8080",
        "listen 8000;",
        "127.0.0.1:8081",
    ] {
        assert!(conf.contains(needle), "credgate.conf has no {needle}");
    }
    let conf = conf
        .replace("credgate-1:8080", &first.addr.to_string())
        .replace("credgate-2:8080", &second.addr.to_string())
        .replace("listen 8000;", &format!("listen {listen};"))
        .replace("127.0.0.1:8081", &api.to_string());
    let nginx = Proxy::nginx_http(&conf, listen);

    // Requests go to the proxy, with the credential headers when a pair is given.
    let proxy_client = crate::helpers::client::Client::new(listen);
    let get =
        |path: &str, pair: Option<&Pair>| proxy_client.request(reqwest::Method::GET, path, pair);
    let admin = first.registered().await;
    let customer = first
        .registered_with(
            json!({ "owner": "acme", "scopes": ["orders:read"] }),
            Some(&admin),
        )
        .await;
    let bare = first
        .registered_with(json!({ "scopes": [] }), Some(&admin))
        .await;

    let body = seen(
        get("/api/x?page=2", Some(&customer))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(body["path"], "/x", "{}", nginx.errors());
    assert_eq!(body["x-credential-key"], customer.key);
    assert_eq!(body["x-credential-owner"], "acme");
    assert_eq!(body["x-credential-scopes"], "orders:read");
    assert_eq!(body["x-api-secret"], "", "the secret reached the API");
    // A credential without owner or scopes cannot be given them by its client.
    let resp = get("/api/x", Some(&bare))
        .header("X-Credential-Key", &customer.key)
        .header("X-Credential-Owner", "acme")
        .header("X-Credential-Scopes", "*")
        .send()
        .await
        .expect("send");
    let body = seen(resp).await;
    assert_eq!(body["x-credential-key"], bare.key);
    assert_eq!(body["x-credential-owner"], "");
    assert_eq!(body["x-credential-scopes"], "");

    // The orders location needs `orders:write`.
    let resp = get("/api/orders/1", Some(&customer))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let body = seen(
        get("/api/orders/1", Some(&admin))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(body["path"], "/orders/1");
    assert_eq!(body["x-credential-key"], admin.key);

    // Refused: forged, missing, revoked (on either instance: they share the database).
    let unused = first.registered().await;
    assert_eq!(
        second.revoke(&unused.key, &admin).await.status(),
        StatusCode::OK
    );
    for pair in [Some(&forged()), None, Some(&unused)] {
        for _ in 0..2 {
            let resp = get("/api/x", pair).send().await.expect("send");
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        }
    }
    // Nothing outside /api/ is served, credgate's own API included.
    let resp = get("/credentials", Some(&admin))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Both instances answered authentication requests (nginx alternates between them).
    for server in [&first, &second] {
        counted(
            server,
            r#"credgate_http_requests_total{route="/auth/verify",status="204"}"#,
        )
        .await;
        counted(
            server,
            r#"credgate_auth_results_total{result="rejected_derivation"}"#,
        )
        .await;
    }

    // One instance down: still answered, by the other one.
    drop(second);
    for _ in 0..4 {
        let body = seen(get("/api/x", Some(&customer)).send().await.expect("send")).await;
        assert_eq!(body["x-credential-key"], customer.key);
    }
    // Both down: a 5xx, never a pass.
    drop(first);
    let resp = get("/api/x", Some(&customer)).send().await.expect("send");
    assert!(resp.status().is_server_error(), "{}", resp.status());
}

/// The envoy-data-plane release the Envoy configuration is parsed with: pinned, so a new
/// release cannot change the verdict.
const ENVOY_DATA_PLANE: &str = "envoy-data-plane==2.2.0";
const PYYAML: &str = "PyYAML==6.0.3";

/// A Python with Envoy's v3 API as classes, from a virtualenv under `target/`.
fn envoy_api_python() -> PathBuf {
    virtualenv("envoy-api-venv", &[ENVOY_DATA_PLANE, PYYAML]).join("bin/python")
}

/// Reads an Envoy bootstrap in YAML into Envoy's v3 API messages (typed_config included:
/// every message the file names is registered by the imports), failing on any field, enum
/// value or type the API does not have, and prints it back as proto3 JSON (camelCase names,
/// default values left out).
const PARSE_BOOTSTRAP: &str = r#"
import json, sys, yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
import envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3
import envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3
import envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3
import envoy_data_plane.envoy.extensions.filters.http.router.v3
bootstrap = Bootstrap.from_dict(yaml.safe_load(open(sys.argv[1])))
json.dump(bootstrap.to_dict(), sys.stdout)
"#;

fn parse_bootstrap(python: &Path, path: &Path) -> Result<Value, String> {
    let out = Command::new(python)
        .args(["-c", PARSE_BOOTSTRAP])
        .arg(path)
        .output()
        .expect("run python");
    if !out.status.success() {
        return Err(report(&out));
    }
    Ok(serde_json::from_slice(&out.stdout).expect("json"))
}

/// The `exact` header names of a ListStringMatcher.
fn exact_names(matcher: &Value) -> BTreeSet<String> {
    matcher["patterns"]
        .as_array()
        .expect("patterns")
        .iter()
        .map(|p| p["exact"].as_str().expect("exact").to_owned())
        .collect()
}

/// deploy/envoy/envoy.yaml is a valid Envoy v3 bootstrap (a misspelt field is caught: the
/// check itself is checked) that keeps the promises of its comments, checked against what
/// credgate answers Envoy's ext_authz request shape with (`--verify-ok-status 200`, the
/// original path under the prefix): the X-Credential-* headers credgate sends are exactly
/// the ones copied to the request, and removed from the client's request before ext_authz
/// runs (a filter ahead of it: a route's `request_headers_to_remove` would act after it); a
/// failure of credgate is never a pass; the secret is sent to credgate and never upstream;
/// the orders route requires `orders:write`, which credgate then enforces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_config_is_valid_and_keeps_identity_headers_honest() {
    let python = envoy_api_python();
    let path = repo("deploy/envoy/envoy.yaml");
    let config = parse_bootstrap(&python, &path).unwrap_or_else(|e| panic!("envoy.yaml: {e}"));
    let scratch = tempfile::tempdir().expect("tempdir");
    let broken = scratch.path().join("envoy.yaml");
    let text = read("deploy/envoy/envoy.yaml");
    // The README gives the whole configuration: the same file, character for character.
    assert_eq!(
        crate::ecosystem::readme_block("yaml"),
        text,
        "README.md's Envoy configuration differs from deploy/envoy/envoy.yaml"
    );
    assert!(text.contains("path_prefix:"));
    std::fs::write(&broken, text.replace("path_prefix:", "path_prefx:")).expect("write");
    let error = parse_bootstrap(&python, &broken).expect_err("a misspelt field parses");
    assert!(error.contains("path_prefx"), "{error}");

    let resources = &config["staticResources"];
    let clusters: BTreeSet<&str> = resources["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    let listeners = resources["listeners"].as_array().expect("listeners");
    assert_eq!(listeners.len(), 1);
    let hcm = &listeners[0]["filterChains"][0]["filters"][0]["typedConfig"];
    assert!(
        hcm["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with(".HttpConnectionManager"))
    );
    let filters = hcm["httpFilters"].as_array().expect("httpFilters");
    let names: Vec<&str> = filters
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "envoy.filters.http.header_mutation",
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.router"
        ]
    );
    let removed: BTreeSet<String> = filters[0]["typedConfig"]["mutations"]["requestMutations"]
        .as_array()
        .expect("requestMutations")
        .iter()
        .map(|m| m["remove"].as_str().expect("a removal").to_owned())
        .collect();

    let authz = &filters[1]["typedConfig"];
    assert_ne!(
        authz["failureModeAllow"], true,
        "credgate down lets requests through"
    );
    let service = &authz["httpService"];
    assert_eq!(service["pathPrefix"], "/auth/verify");
    let cluster = service["serverUri"]["cluster"].as_str().expect("cluster");
    assert!(clusters.contains(cluster), "no cluster {cluster}");
    assert!(service["serverUri"]["timeout"].is_string(), "no timeout");
    let sent = exact_names(&authz["allowedHeaders"]);
    for header in ["x-api-key", "x-api-secret", "x-required-scopes"] {
        assert!(sent.contains(header), "{header} is not sent to credgate");
    }
    let copied = exact_names(&service["authorizationResponse"]["allowedUpstreamHeaders"]);
    assert_eq!(
        removed, copied,
        "a copied identity header is not removed first, or the reverse"
    );

    let hosts = hcm["routeConfig"]["virtualHosts"]
        .as_array()
        .expect("hosts");
    assert_eq!(hosts.len(), 1);
    let host = &hosts[0];
    assert!(
        host["requestHeadersToRemove"]
            .as_array()
            .expect("requestHeadersToRemove")
            .contains(&json!("x-api-secret")),
        "the secret is forwarded"
    );
    let routes = host["routes"].as_array().expect("routes");
    for route in routes {
        let target = route["route"]["cluster"].as_str().expect("cluster");
        assert!(clusters.contains(target), "no cluster {target}");
        assert_ne!(target, cluster, "a route forwards to credgate itself");
    }
    let orders = routes
        .iter()
        .find(|r| r["match"]["prefix"] == "/api/orders/")
        .expect("the orders route");
    let per_route = &orders["typedPerFilterConfig"]["envoy.filters.http.header_mutation"];
    let set = &per_route["mutations"]["requestMutations"][0]["append"];
    assert_eq!(set["header"]["key"], "x-required-scopes");
    assert_eq!(set["appendAction"], "OVERWRITE_IF_EXISTS_OR_ADD");
    let required = set["header"]["value"].as_str().expect("value").to_owned();

    // credgate, answering as Envoy needs: the headers it adds are the ones Envoy copies.
    let dir = tempfile::tempdir().expect("tempdir");
    let key_file = dir.path().join("master.hex");
    std::fs::write(
        &key_file,
        format!("{}\n", crate::helpers::credentials::MASTER_HEX),
    )
    .expect("write the key");
    let server = ServerProcess::start(&[
        "--data-dir",
        dir.path().to_str().expect("utf-8 path"),
        "--master-key-file",
        key_file.to_str().expect("utf-8 path"),
        "--verify-ok-status",
        "200",
    ]);
    let admin = server.registered().await;
    let customer = server
        .registered_with(
            json!({ "owner": "acme", "scopes": ["orders:read"] }),
            Some(&admin),
        )
        .await;
    let client = reqwest::Client::new();
    let check = |method: reqwest::Method, path: &str, pair: &Pair| {
        client
            .request(method, server.url(&format!("/auth/verify{path}")))
            .header("X-Api-Key", &pair.key)
            .header("X-Api-Secret", &pair.secret)
            .header("Content-Length", "0")
    };
    let resp = check(reqwest::Method::POST, "/api/x?page=2", &customer)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let answered: BTreeSet<String> = resp
        .headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("x-credential-"))
        .collect();
    assert_eq!(
        answered, copied,
        "credgate's identity headers are not the ones Envoy copies"
    );
    let resp = check(reqwest::Method::GET, "/api/orders/1", &customer)
        .header("X-Required-Scopes", &required)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = check(reqwest::Method::GET, "/api/orders/1", &admin)
        .header("X-Required-Scopes", &required)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
}
