//! The load benchmark of SPEC §6, in one run: `bench/run.sh` (which builds this and the server
//! in release mode and installs wrk if missing).
//!
//! Seeds an SQLite database with 1 000 000 credentials (each with its own owner, two scopes
//! and an expiry), starts the real `credgate` binary on it, and drives it with wrk, alternating the cases round by round so machine drift hits all
//! of them alike: `GET /health`; `GET /auth/verify?scope=orders:read` with a cached credential
//! (identity headers, scope check, expiry check); forged secrets
//! (also checking that they cause zero database queries); cache misses over 200 000 keys with a
//! 10 000-entry cache; durable registrations with 64 connections (the cheap cases first get a
//! 1 s unmeasured run each). Each round prints a line. Then measures RSS with 100 000 cached
//! credentials on a fresh server. Prints one markdown table.
//!
//! Environment: `ROUNDS` (3), `REPS` (6 interleaved runs of the cheap cases per round),
//! `SHORT_SECONDS` (2, per cheap run), `SECONDS` (5, other cases), `CONNS` (32), `KEEP` (1
//! leaves the seeded database and the wrk scripts in the directory it prints, to profile).

#[path = "../benches/support/seed.rs"]
mod seed;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use credgate::credential::{ApiKey, MasterKey, SecretDeriver};

const MASTER_HEX: &str = "5f3c1a9e0b7d2c4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6";
const ROWS: u64 = 1_000_000;
const MISS_WORKING_SET: u64 = 200_000;
const MISS_CACHE_CAPACITY: u64 = 10_000;
const RSS_CACHED: u64 = 100_000;
const REGISTRATIONS_PER_ROUND: usize = 150_000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Server {
    child: Child,
    base: String,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn binary() -> anyhow::Result<PathBuf> {
    // target/release/examples/loadbench -> target/release/credgate
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("credgate"))
        .context("locating the credgate binary")?;
    anyhow::ensure!(bin.exists(), "{} missing: run bench/run.sh", bin.display());
    Ok(bin)
}

fn start_server(dir: &Path, db: &Path, cache_capacity: u64) -> anyhow::Result<Server> {
    let mut child = Command::new(binary()?)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "warn,credgate=info",
        ])
        .arg("--database-url")
        .arg(format!("sqlite://{}", db.display()))
        .arg("--master-key-file")
        .arg(dir.join("master.key"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--cache-capacity", &cache_capacity.to_string()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().context("server exited during start-up")??;
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(Server {
        child,
        base: format!("http://{addr}"),
        addr,
    })
}

#[derive(Debug, Clone, Copy, Default)]
struct WrkResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
}

const REPORT_LUA: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %f %f %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"#;

fn write_script(dir: &Path, name: &str, body: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}.lua"));
    std::fs::write(&path, format!("{body}\n{REPORT_LUA}"))?;
    Ok(path)
}

fn wrk(server: &Server, script: &Path, conns: u64, seconds: u64) -> anyhow::Result<WrkResult> {
    let out = Command::new("wrk")
        .args([
            "-t",
            "1",
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{seconds}s"),
        ])
        .arg("-s")
        .arg(script)
        .arg(&server.base)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| {
            format!(
                "no RESULT from wrk: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    anyhow::ensure!(f.len() == 6, "bad wrk line {line}");
    Ok(WrkResult {
        requests: f[0] as u64,
        rps: f[0] / (f[1] / 1e6),
        p50_us: f[2],
        p99_us: f[3],
        non_2xx: f[4] as u64,
        socket_errors: f[5] as u64,
    })
}

async fn metrics(client: &reqwest::Client, server: &Server) -> anyhow::Result<String> {
    Ok(client
        .get(format!("{}/metrics", server.base))
        .send()
        .await?
        .text()
        .await?)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// (upper bound, cumulative count) of one histogram series.
fn buckets(text: &str, prefix: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let le_start = rest.find("le=\"")? + 4;
            let le_end = le_start + rest[le_start..].find('"')?;
            let le = &rest[le_start..le_end];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = rest.rsplit(' ').next()?.trim().parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// The median of the observations between two snapshots of a histogram, interpolated
/// linearly inside its bucket.
fn histogram_p50(before: &str, after: &str, prefix: &str) -> Option<f64> {
    let a = buckets(after, prefix);
    let b = buckets(before, prefix);
    let delta: Vec<(f64, f64)> = a
        .iter()
        .map(|(le, n)| {
            (
                *le,
                n - b.iter().find(|(l, _)| l == le).map_or(0.0, |(_, m)| *m),
            )
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let half = total / 2.0;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, n) in delta {
        if n >= half {
            if le.is_infinite() {
                return Some(lower);
            }
            let frac = if n > below {
                (half - below) / (n - below)
            } else {
                0.0
            };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = n;
    }
    None
}

fn rss_kib(server: &Server) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")
}

/// The median; NaN when there is nothing to take it of (`ROUNDS=0` measures memory only).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[derive(Default)]
struct Case {
    runs: Vec<WrkResult>,
    ratios: Vec<f64>,
}

impl Case {
    fn med(&self, f: impl Fn(&WrkResult) -> f64) -> f64 {
        median(self.runs.iter().map(f).collect())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let rounds = env_or("ROUNDS", 3);
    let reps = env_or("REPS", 6) as usize;
    let short = env_or("SHORT_SECONDS", 2);
    let seconds = env_or("SECONDS", 5);
    let conns = env_or("CONNS", 32);
    let dir = tempfile::tempdir()?;
    // KEEP=1 leaves the seeded database and the wrk scripts behind, for profiling.
    let kept = (env_or("KEEP", 0) == 1).then(|| dir.path().to_owned());
    let d = dir.path();
    std::fs::write(d.join("master.key"), format!("{MASTER_HEX}\n"))?;
    let deriver = SecretDeriver::new(&MasterKey::from_hex(MASTER_HEX)?);
    let secret = |k: &ApiKey| deriver.secret_for(k).expose();

    let db = d.join("bench.db");
    eprintln!("seeding {ROWS} credentials...");
    let seed_time = seed::seed_sqlite(&db, ROWS, deriver.key_id()).await?;
    eprintln!("seeded in {:.2} s", seed_time.as_secs_f64());

    // Pair files for wrk's Lua scripts. The scripts format every request once, before the
    // run: wrk runs its Lua on its one thread, and formatting each request as it is sent
    // cost wrk more than the server spent on a cache miss (the miss case measured 14–17 k
    // req/s with per-request formatting, 22–24 k without, on one server).
    let mut miss_file = std::io::BufWriter::new(std::fs::File::create(d.join("miss.txt"))?);
    let stride = ROWS / MISS_WORKING_SET;
    for i in 0..MISS_WORKING_SET {
        let k = seed::bench_key(i * stride);
        writeln!(miss_file, "{} {}", k, secret(&k))?;
    }
    miss_file.flush()?;
    for round in 0..rounds {
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(d.join(format!("reg{round}.txt")))?);
        for _ in 0..REGISTRATIONS_PER_ROUND {
            let k = ApiKey::generate();
            writeln!(
                f,
                "{{\"api_key\":\"{}\",\"api_secret\":\"{}\"}}",
                k,
                secret(&k)
            )?;
        }
        f.flush()?;
    }
    let hot = seed::bench_key(7);
    let hot_secret = secret(&hot);
    let forged_secret = SecretDeriver::new(&MasterKey::from_bytes([1; 32]))
        .secret_for(&hot)
        .expose();

    let health = write_script(d, "health", r#"wrk.method = "GET"; wrk.path = "/health""#)?;
    let cached = write_script(
        d,
        "cached",
        &format!(
            "wrk.path = \"/auth/verify?scope=orders:read\"\nwrk.headers[\"X-Api-Key\"] = \"{hot}\"\nwrk.headers[\"X-Api-Secret\"] = \"{hot_secret}\""
        ),
    )?;
    let forged = write_script(
        d,
        "forged",
        &format!(
            "wrk.path = \"/auth/verify\"\nwrk.headers[\"X-Api-Key\"] = \"{hot}\"\nwrk.headers[\"X-Api-Secret\"] = \"{forged_secret}\""
        ),
    )?;
    let miss = write_script(
        d,
        "miss",
        &format!(
            r#"local requests, n = {{}}, 0
for line in io.lines("{}") do
  local k, s = line:match("(%S+) (%S+)")
  n = n + 1
  requests[n] = wrk.format("GET", "/auth/verify", {{["X-Api-Key"] = k, ["X-Api-Secret"] = s}})
end
math.randomseed(os.time())
request = function()
  return requests[math.random(n)]
end"#,
            d.join("miss.txt").display()
        ),
    )?;
    let register_scripts: Vec<PathBuf> = (0..rounds)
        .map(|round| {
            write_script(
                d,
                &format!("register{round}"),
                &format!(
                    r#"local requests, n, i = {{}}, 0, 0
local headers = {{["Content-Type"] = "application/json"}}
for line in io.lines("{}") do
  n = n + 1
  requests[n] = wrk.format("POST", "/credentials", headers, line)
end
request = function()
  i = i + 1
  if i > n then i = 1 end
  return requests[i]
end"#,
                    d.join(format!("reg{round}.txt")).display()
                ),
            )
        })
        .collect::<anyhow::Result<_>>()?;

    let server = start_server(d, &db, MISS_CACHE_CAPACITY)?;
    // No idle connection reuse: the server closes keep-alive connections idle for longer than
    // its header-read timeout, and a benchmark case can last longer than that.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let status = client
        .get(format!("{}/auth/verify", server.base))
        .header("X-Api-Key", hot.as_str())
        .header("X-Api-Secret", &hot_secret)
        .send()
        .await?
        .status();
    if status != 204 {
        bail!("priming the cached credential failed: {status}");
    }
    eprintln!(
        "server on {}; {rounds} rounds of {seconds} s per case",
        server.addr
    );

    // A fresh process warms up (allocator caches, each worker's copy of the hot cache entry)
    // in its first requests; unmeasured, so that the first round's short runs do not carry it.
    for script in [&health, &cached, &forged] {
        wrk(&server, script, conns, 1)?;
    }

    let (mut h, mut c, mut f, mut m, mut m1, mut r): (Case, Case, Case, Case, Case, Case) =
        Default::default();
    let mut miss1_server_p50 = Vec::new();
    let (mut forged_lookups, mut forged_rejected, mut forged_requests) = (0.0, 0.0, 0u64);
    let mut miss_server_p50 = Vec::new();
    let mut miss_db_p50 = Vec::new();
    for (round, register_script) in register_scripts.iter().enumerate() {
        // The three cheap cases, interleaved in short runs with a rotating order so that
        // drift and order effects hit all three alike; a round's ratio compares totals.
        let scripts = [&health, &cached, &forged];
        let mut totals = [(0.0f64, 0.0f64); 3]; // (requests, seconds)
        for rep in 0..reps {
            for j in 0..3 {
                let which = (rep + j) % 3;
                let before = metrics(&client, &server).await?;
                let run = wrk(&server, scripts[which], conns, short)?;
                let after = metrics(&client, &server).await?;
                totals[which].0 += run.requests as f64;
                totals[which].1 += run.requests as f64 / run.rps;
                match which {
                    0 => h.runs.push(run),
                    1 => c.runs.push(run),
                    _ => {
                        let lookups = "credgate_db_query_duration_seconds_count{op=\"state\"}";
                        let rejected =
                            "credgate_auth_results_total{result=\"rejected_derivation\"}";
                        forged_lookups += metric(&after, lookups) - metric(&before, lookups);
                        forged_rejected += metric(&after, rejected) - metric(&before, rejected);
                        forged_requests += run.requests;
                        f.runs.push(run);
                    }
                }
            }
        }
        let rate = |i: usize| totals[i].0 / totals[i].1;
        let h_rps = rate(0);
        h.ratios.push(1.0);
        c.ratios.push(rate(1) / h_rps);
        f.ratios.push(rate(2) / h_rps);
        eprintln!(
            "round {}: /health {:.0}/s, cached {:.0}/s ({:.1} %), forged {:.0}/s ({:.1} %)",
            round + 1,
            h_rps,
            rate(1),
            rate(1) / h_rps * 100.0,
            rate(2),
            rate(2) / h_rps * 100.0
        );

        let before = metrics(&client, &server).await?;
        let mr = wrk(&server, &miss, conns, seconds)?;
        let after = metrics(&client, &server).await?;
        if let Some(p) = histogram_p50(
            &before,
            &after,
            "credgate_http_request_duration_seconds_bucket{route=\"/auth/verify\",status=\"204\",",
        ) {
            miss_server_p50.push(p * 1e6);
        }
        if let Some(p) = histogram_p50(
            &before,
            &after,
            "credgate_db_query_duration_seconds_bucket{op=\"state\",",
        ) {
            miss_db_p50.push(p * 1e6);
        }
        let miss_rps = mr.rps;
        m.ratios.push(mr.rps / h_rps);
        m.runs.push(mr);

        // The same with one connection: latency without queueing behind other requests.
        let before = metrics(&client, &server).await?;
        let m1r = wrk(&server, &miss, 1, seconds)?;
        let after = metrics(&client, &server).await?;
        if let Some(p) = histogram_p50(
            &before,
            &after,
            "credgate_http_request_duration_seconds_bucket{route=\"/auth/verify\",status=\"204\",",
        ) {
            miss1_server_p50.push(p * 1e6);
        }
        let miss1_rps = m1r.rps;
        m1.ratios.push(m1r.rps / h_rps);
        m1.runs.push(m1r);

        let rr = wrk(&server, register_script, 64, seconds)?;
        eprintln!(
            "round {}: misses {:.0}/s, 1 connection {:.0}/s, registrations {:.0}/s (p99 {:.1} ms)",
            round + 1,
            miss_rps,
            miss1_rps,
            rr.rps,
            rr.p99_us / 1000.0
        );
        r.ratios.push(rr.rps / h_rps);
        r.runs.push(rr);
    }
    let hits_misses = metrics(&client, &server).await?;
    drop(server);

    // RSS with 100 000 cached credentials, on a fresh server with the default capacity.
    let server = start_server(d, &db, 100_000)?;
    let rss_idle = rss_kib(&server)?;
    let started = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..RSS_CACHED {
        let k = seed::bench_key(i);
        let s = secret(&k);
        let (client, url, sem) = (
            client.clone(),
            format!("{}/auth/verify", server.base),
            sem.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            client
                .get(url)
                .header("X-Api-Key", k.as_str())
                .header("X-Api-Secret", s)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    let mut ok = 0u64;
    for t in tasks {
        if matches!(t.await, Ok(Ok(204))) {
            ok += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cached_entries = metric(
        &metrics(&client, &server).await?,
        "credgate_auth_cache_entries",
    );
    let rss_full = rss_kib(&server)?;
    let prime_secs = started.elapsed().as_secs_f64();
    drop(server);

    let ms = |us: f64| format!("{:.2} ms", us / 1000.0);
    let line = |name: &str, case: &Case, target: &str| {
        println!(
            "| {name} | {:.0} | {} | {} | {:.1} % | {} | {target} |",
            case.med(|w| w.rps),
            ms(case.med(|w| w.p50_us)),
            ms(case.med(|w| w.p99_us)),
            median(case.ratios.clone()) * 100.0,
            case.runs.iter().map(|w| w.non_2xx).sum::<u64>(),
        )
    };
    println!(
        "\nwrk -t1 -c{conns} (registrations -c64); {rounds} rounds, each: {reps}× interleaved {short} s runs of the first three cases, then {seconds} s per other case; medians over runs, ratios = median over rounds of (case req/s ÷ /health req/s in that round)\n"
    );
    println!("| case | req/s | p50 | p99 | vs /health | non-2xx | target |");
    println!("|---|---|---|---|---|---|---|");
    line("GET /health", &h, "ceiling");
    line(
        "GET /auth/verify?scope=…, cached credential (owner, scopes, expiry)",
        &c,
        "≥ 97 %",
    );
    line(
        "GET /auth/verify, forged secret",
        &f,
        "≥ 97 %, 0 DB queries",
    );
    line(
        "GET /auth/verify, cache miss (1 M rows, 200 k keys, 10 k cache)",
        &m,
        "≥ 50 %",
    );
    line("same, 1 connection", &m1, "server p50 < 100 µs");
    line(
        "POST /credentials, durable, 64 connections",
        &r,
        "≥ 20 000/s",
    );
    println!();
    println!(
        "- forged: {forged_requests} requests, {forged_rejected} counted rejected_derivation, {forged_lookups} database lookups"
    );
    println!(
        "- cache miss, inside the server (from its histograms): request p50 {:.0} µs, SQLite lookup p50 {:.0} µs; cache hits {} / misses {} over the whole run",
        median(miss_server_p50),
        median(miss_db_p50),
        metric(&hits_misses, "credgate_auth_cache_hits_total"),
        metric(&hits_misses, "credgate_auth_cache_misses_total"),
    );
    let miss1_p50 = median(miss1_server_p50);
    println!(
        "- cache miss with 1 connection, inside the server: request p50 {:.0} µs",
        miss1_p50
    );
    let non2xx: u64 = r.runs.iter().map(|w| w.non_2xx).sum();
    let reg: u64 = r.runs.iter().map(|w| w.requests).sum();
    println!("- registrations: {reg} requests, {non2xx} not 2xx, synchronous = FULL");
    let errs: u64 = [&h, &c, &f, &m, &m1, &r]
        .iter()
        .flat_map(|c| c.runs.iter())
        .map(|w| w.socket_errors)
        .sum();
    println!("- socket errors over all runs: {errs}");
    println!(
        "- RSS: {:.1} MiB idle, {:.1} MiB with {cached_entries} cached credentials ({ok} authenticated in {prime_secs:.1} s)",
        rss_idle as f64 / 1024.0,
        rss_full as f64 / 1024.0
    );
    println!(
        "- seeding {ROWS} credentials: {:.2} s",
        seed_time.as_secs_f64()
    );

    // SPEC §6, target by target, on the medians above.
    let verdict = |met: bool| if met { "met" } else { "**missed**" };
    let (cached, forged) = (median(c.ratios.clone()), median(f.ratios.clone()));
    let misses = median(m.ratios.clone());
    let registrations = r.med(|w| w.rps);
    let rss_mib = rss_full as f64 / 1024.0;
    println!("\n| SPEC §6 target | measured (median) | verdict |\n|---|---|---|");
    println!(
        "| cached credential ≥ 97 % of /health | {:.1} % | {} |",
        cached * 100.0,
        verdict(cached >= 0.97)
    );
    println!(
        "| forged secret ≥ 97 % of /health, 0 database queries | {:.1} %, {forged_lookups} queries | {} |",
        forged * 100.0,
        verdict(forged >= 0.97 && forged_lookups == 0.0)
    );
    println!(
        "| cache misses, 32 connections, ≥ 50 % of /health | {:.1} % | {} |",
        misses * 100.0,
        verdict(misses >= 0.5)
    );
    println!(
        "| cache miss, 1 connection, server p50 < 100 µs (1 M rows) | {miss1_p50:.0} µs | {} |",
        verdict(miss1_p50 < 100.0)
    );
    println!(
        "| ≥ 20 000 durable registrations/s, 64 clients | {registrations:.0}/s | {} |",
        verdict(registrations >= 20_000.0)
    );
    println!(
        "| < 64 MiB RSS with 100 000 cached credentials | {rss_mib:.1} MiB | {} |",
        verdict(rss_mib < 64.0)
    );
    if let Some(kept) = kept {
        let _ = dir.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(())
}
