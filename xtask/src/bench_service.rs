//! `cargo xtask bench service`: a trivial tool (`kitchen__greet`) over HTTP
//! at concurrency 1, 8 and 64 against a real `airlock serve` on 127.0.0.1,
//! and the same call through the CLI runner (`airlock run`, one process per
//! call), printed side by side. Everything is measured in this run.

use anyhow::{Context, bail};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-admin-token-0000000";

pub(crate) struct Stats {
    pub per_sec: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// Throughput over `wall` and latency quantiles of `lat`.
pub(crate) fn stats(mut lat: Vec<Duration>, wall: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Stats {
        per_sec: lat.len() as f64 / wall.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
    }
}

/// Build `airlock` in the profile xtask itself was built with; return its path.
fn airlock_binary(root: &Path) -> anyhow::Result<PathBuf> {
    let release = !cfg!(debug_assertions);
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args(["build", "-q", "-p", "airlock"]);
    if release {
        cmd.arg("--release");
    }
    if !cmd.status()?.success() {
        bail!("building airlock failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join("airlock"))
}

pub fn run(requests: u32) -> anyhow::Result<()> {
    with_server(64, |bin, url, kitchen| measure(bin, url, kitchen, requests))
}

/// `cargo xtask bench load`: `concurrency` invocations at once (one
/// connection each, released together) against the same call made one at
/// a time in the same run. Fails on any error: a burst past the engine's
/// instance pool must queue, not fail.
pub fn load(concurrency: u32) -> anyhow::Result<()> {
    with_server(concurrency, |_bin, url, kitchen| {
        let call = upload_and_caller(url, kitchen)?;
        let http = reqwest::blocking::Client::new();
        let mut one = Vec::new();
        let start = Instant::now();
        for _ in 0..200 {
            one.push(call(&http)?);
        }
        let alone = stats(one, start.elapsed());
        let barrier = std::sync::Barrier::new(concurrency as usize);
        let start = Instant::now();
        let results: Vec<anyhow::Result<Duration>> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (call, barrier) = (&call, &barrier);
                    sc.spawn(move || {
                        let client = reqwest::blocking::Client::builder()
                            .timeout(Duration::from_secs(600))
                            .build()?;
                        barrier.wait();
                        call(&client)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
                })
                .collect()
        });
        let wall = start.elapsed();
        let (ok, errors): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
        let lat: Vec<Duration> = ok.into_iter().filter_map(Result::ok).collect();
        println!(
            "bench load: kitchen__greet, {} build, {concurrency} invocations at once (process isolation)",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        );
        println!("  errors: {} of {concurrency}", errors.len());
        if let Some(e) = errors.first().and_then(|r| r.as_ref().err()) {
            println!("  first error: {e:#}");
        }
        if !lat.is_empty() {
            let burst = stats(lat, wall);
            println!(
                "  one at a time: p50 {:.3} ms, p99 {:.3} ms ({:.1} calls/s)",
                alone.p50.as_secs_f64() * 1e3,
                alone.p99.as_secs_f64() * 1e3,
                alone.per_sec
            );
            println!(
                "  burst:         p50 {:.3} ms, p99 {:.3} ms ({:.1} calls/s); p99 / alone p50 = {:.1}",
                burst.p50.as_secs_f64() * 1e3,
                burst.p99.as_secs_f64() * 1e3,
                burst.per_sec,
                burst.p99.as_secs_f64() / alone.p50.as_secs_f64()
            );
        }
        if !errors.is_empty() {
            bail!("{} of {concurrency} invocations failed", errors.len());
        }
        Ok(())
    })
}

/// A server allowing `per_tenant` calls at once, with `f` run against it
/// (its binary, URL and the kitchen component); the server is killed and
/// its directory removed after.
fn with_server(
    per_tenant: u32,
    f: impl FnOnce(&Path, &str, &Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let root = crate::root();
    let kitchen = crate::examples_out().join("kitchen.wasm");
    if !kitchen.exists() {
        crate::examples()?;
    }
    let bin = airlock_binary(&root)?;
    let dir = std::env::temp_dir().join(format!("airlock-bench-service-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[limits]\nmax_concurrent_calls_per_tenant = {per_tenant}\n\n[[tokens]]\nname = \"bench\"\ntoken = \"{TOKEN}\"\ntenant = \"bench\"\nrole = \"admin\"\n"
        ),
    )?;
    let mut server = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .spawn()
        .context("start airlock serve")?;
    let result = (|| {
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().context("server stdout")?)
            .read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("airlock: listening on ")
            .with_context(|| format!("unexpected server output {line:?}"))?
            .to_string();
        f(&bin, &url, &kitchen)
    })();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Upload kitchen.wasm and return a function making one `greet` call.
fn upload_and_caller(
    url: &str,
    kitchen: &Path,
) -> anyhow::Result<impl Fn(&reqwest::blocking::Client) -> anyhow::Result<Duration> + Sync> {
    let http = reqwest::blocking::Client::new();
    let up = http
        .post(format!("{url}/v1/components?name=kitchen"))
        .bearer_auth(TOKEN)
        .body(std::fs::read(kitchen)?)
        .send()?;
    if !up.status().is_success() {
        bail!("upload failed: {}", up.text()?);
    }
    let invoke_url = format!("{url}/v1/tools/kitchen__greet:invoke");
    let body = serde_json::json!({"arguments": {"name": "bench", "excited": false}});
    Ok(
        move |client: &reqwest::blocking::Client| -> anyhow::Result<Duration> {
            let t = Instant::now();
            let r = client
                .post(&invoke_url)
                .bearer_auth(TOKEN)
                .json(&body)
                .send()?;
            let status = r.status();
            let v: serde_json::Value = r.json()?;
            if !status.is_success() || v["result"]["ok"].is_null() {
                bail!("call failed: {status} {v}");
            }
            Ok(t.elapsed())
        },
    )
}

fn measure(bin: &Path, url: &str, kitchen: &Path, requests: u32) -> anyhow::Result<()> {
    let call = upload_and_caller(url, kitchen)?;
    let http = reqwest::blocking::Client::new();
    // Warm-up: compiled component cached, connections open.
    for _ in 0..50 {
        call(&http)?;
    }
    let mut rows = Vec::new();
    for conc in [1u32, 8, 64] {
        let per_worker = (requests / conc).max(5);
        let start = Instant::now();
        let lat: Vec<Duration> = std::thread::scope(|sc| {
            let handles: Vec<_> = (0..conc)
                .map(|_| {
                    let call = &call;
                    sc.spawn(move || {
                        // One client (connection) per worker, like separate agents.
                        let client = reqwest::blocking::Client::new();
                        (0..per_worker)
                            .map(|_| call(&client))
                            .collect::<anyhow::Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("worker thread"))
                .collect::<anyhow::Result<Vec<Vec<_>>>>()
        })?
        .into_iter()
        .flatten()
        .collect();
        rows.push((
            format!("HTTP, concurrency {conc}"),
            stats(lat, start.elapsed()),
        ));
    }
    // The CLI runner: one `airlock run` process per call (compiles each time).
    let cli_calls = 10;
    let mut lat = Vec::new();
    let start = Instant::now();
    for _ in 0..cli_calls {
        let t = Instant::now();
        let o = Command::new(bin)
            .arg("run")
            .arg(kitchen)
            .args([
                "--tool",
                "greet",
                "--args",
                r#"{"name":"bench","excited":false}"#,
                // The service below runs calls in process (its default), so
                // the CLI side does too: the same wall on both sides.
                "--isolation",
                "process",
            ])
            .output()?;
        if !o.status.success() {
            bail!("airlock run failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        lat.push(t.elapsed());
    }
    rows.push((
        "CLI runner (airlock run, process per call)".into(),
        stats(lat, start.elapsed()),
    ));

    let reference = rows.last().map(|(_, s)| s.p50).unwrap_or_default();
    println!(
        "bench service: kitchen__greet, {} build, {requests} requests per HTTP row, {cli_calls} CLI calls",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!(
        "  {:<44} {:>10} {:>11} {:>11} {:>14}",
        "path", "calls/s", "p50 ms", "p99 ms", "p50 / CLI p50"
    );
    for (name, s) in &rows {
        println!(
            "  {:<44} {:>10.1} {:>11.3} {:>11.3} {:>14.4}",
            name,
            s.per_sec,
            s.p50.as_secs_f64() * 1e3,
            s.p99.as_secs_f64() * 1e3,
            s.p50.as_secs_f64() / reference.as_secs_f64()
        );
    }
    Ok(())
}
