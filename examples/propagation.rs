//! Measures revocation propagation across instances on one PostgreSQL.
//!
//! Starts a throwaway PostgreSQL and three credgate instances (each with its own pool and
//! LISTEN connection), caches N credentials on every instance, then revokes them one at a
//! time — half through instance A's API, half by direct SQL — and times how long until every
//! other instance refuses the credential (polled over HTTP, back to back).
//!
//! `cargo run --release --example propagation -- [N]` (default N = 200).

// The test helpers are `pub` for the test crates that share them; here they are private.
#[allow(unreachable_pub)]
#[path = "../tests/helpers/pg.rs"]
mod pg;

use std::time::{Duration, Instant};

use credgate::credential::{ApiKey, MasterKey, SecretDeriver};
use credgate::store::DatabaseTarget;
use credgate::{Application, Config};
use sqlx::Connection;

struct Instance {
    base: String,
    _dir: tempfile::TempDir,
}

async fn start_instance(url: &str) -> anyhow::Result<Instance> {
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("master.hex");
    std::fs::write(&key_file, MASTER_HEX)?;
    let mut config = Config::new(dir.path().join("data"));
    config.listen = "127.0.0.1:0".parse()?;
    config.master_key_file = Some(key_file);
    config.database = Some(DatabaseTarget::Postgres(url.to_owned()));
    let app = Application::build(config).await?;
    let base = format!("http://{}", app.local_addr()?);
    tokio::spawn(app.run_until_stopped(std::future::pending()));
    Ok(Instance { base, _dir: dir })
}

const MASTER_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

async fn status(client: &reqwest::Client, base: &str, key: &str, secret: &str) -> u16 {
    match client
        .get(format!("{base}/auth/verify"))
        .header("X-Api-Key", key)
        .header("X-Api-Secret", secret)
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Polls `base` until it refuses the pair; returns the time since `t0`.
async fn until_refused(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    secret: &str,
    t0: Instant,
) -> Duration {
    loop {
        if status(client, base, key, secret).await == 401 {
            return t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Duration::from_secs(10);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
    format!(
        "| {name} | {} | {} | {} | {} |",
        v.len(),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        ms(*v.last().unwrap_or(&Duration::ZERO)),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(200);
    let server = pg::server();
    let url = server.fresh_database().await;
    let instances = [
        start_instance(&url).await?,
        start_instance(&url).await?,
        start_instance(&url).await?,
    ];
    let client = reqwest::Client::new();
    // Wait until every listener is up.
    for i in &instances {
        while client
            .get(format!("{}/ready", i.base))
            .send()
            .await?
            .status()
            != 200
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let deriver = SecretDeriver::new(&MasterKey::from_hex(MASTER_HEX)?);
    let pairs: Vec<(String, String)> = (0..n + 1)
        .map(|_| {
            let key = ApiKey::generate();
            let secret = deriver.secret_for(&key).expose();
            (key.into_string(), secret)
        })
        .collect();
    for (key, secret) in &pairs {
        let r = client
            .post(format!("{}/credentials", instances[0].base))
            .json(&serde_json::json!({ "api_key": key, "api_secret": secret }))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 201, "registration failed: {}", r.status());
        for i in &instances {
            for _ in 0..2 {
                anyhow::ensure!(status(&client, &i.base, key, secret).await == 204);
            }
        }
    }
    let (admin_key, admin_secret) = &pairs[n];
    let mut sql = sqlx::PgConnection::connect(&url).await?;
    let (mut via_api, mut via_sql) = (Vec::new(), Vec::new());
    for (i, (key, secret)) in pairs[..n].iter().enumerate() {
        let t0 = Instant::now();
        let others: &[Instance] = if i % 2 == 0 {
            let r = client
                .delete(format!("{}/credentials/{key}", instances[0].base))
                .header("X-Api-Key", admin_key)
                .header("X-Api-Secret", admin_secret)
                .send()
                .await?;
            anyhow::ensure!(r.status() == 200, "revocation failed: {}", r.status());
            &instances[1..]
        } else {
            sqlx::query("UPDATE api_credential SET active = false WHERE api_key = $1")
                .bind(key)
                .execute(&mut sql)
                .await?;
            &instances[..]
        };
        let waits = futures_util::future::join_all(
            others
                .iter()
                .map(|inst| until_refused(&client, &inst.base, key, secret, t0)),
        )
        .await;
        let worst = waits.into_iter().max().unwrap_or_default();
        if i % 2 == 0 {
            via_api.push(worst);
        } else {
            via_sql.push(worst);
        }
    }
    println!("Revocation propagation: 3 instances on one PostgreSQL, {n} cached credentials,");
    println!("time from the start of the revocation until every other instance answers 401 (ms)\n");
    println!("| revoked through | count | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    println!(
        "{}",
        row("API on instance A (B, C polled)", via_api.clone())
    );
    println!(
        "{}",
        row("direct SQL UPDATE (A, B, C polled)", via_sql.clone())
    );
    via_api.extend(via_sql);
    println!("{}", row("all", via_api));
    sql.close().await?;
    Ok(())
}
