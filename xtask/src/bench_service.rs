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
/// A running `airlock serve`, killed on drop.
struct Node {
    child: std::process::Child,
    url: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `airlock serve` in `dir` with the bench token, `per_tenant` calls
/// at once, and `extra` config lines first (top-level keys, then tables).
fn start_node(bin: &Path, dir: &Path, per_tenant: u32, extra: &str) -> anyhow::Result<Node> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}\n[limits]\nmax_concurrent_calls_per_tenant = {per_tenant}\n\n[[tokens]]\nname = \"bench\"\ntoken = \"{TOKEN}\"\ntenant = \"bench\"\nrole = \"admin\"\n"
        ),
    )?;
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .spawn()
        .context("start airlock serve")?;
    let mut line = String::new();
    let read = child
        .stdout
        .take()
        .context("server stdout")
        .and_then(|o| Ok(std::io::BufReader::new(o).read_line(&mut line)?));
    let node = Node {
        child,
        url: line
            .trim()
            .strip_prefix("airlock: listening on ")
            .unwrap_or_default()
            .to_string(),
    };
    read?;
    if node.url.is_empty() {
        bail!("unexpected server output {line:?}");
    }
    Ok(node)
}

/// The example and the `airlock` binary the service benches use.
fn kitchen_and_binary() -> anyhow::Result<(PathBuf, PathBuf)> {
    let kitchen = crate::examples_out().join("kitchen.wasm");
    if !kitchen.exists() {
        crate::examples()?;
    }
    Ok((kitchen, airlock_binary(&crate::root())?))
}

fn with_server(
    per_tenant: u32,
    f: impl FnOnce(&Path, &str, &Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (kitchen, bin) = kitchen_and_binary()?;
    let dir = std::env::temp_dir().join(format!("airlock-bench-service-{}", std::process::id()));
    let result =
        start_node(&bin, &dir, per_tenant, "").and_then(|node| f(&bin, &node.url, &kitchen));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `cargo xtask bench service --cluster`: `greet` calls at concurrency 8
/// through the embedded default (one node, SQLite, local blobs) and
/// through cluster mode (a real PostgreSQL and S3-compatible server on
/// loopback) with 1, 2 and 3 nodes, the workers spread over the nodes;
/// all in this run, on this machine's cores.
pub fn cluster(requests: u32) -> anyhow::Result<()> {
    use airlock_testkit::{postgres::Postgres, s3::S3};
    let (kitchen, bin) = kitchen_and_binary()?;
    let base = std::env::temp_dir().join(format!("airlock-bench-cluster-{}", std::process::id()));
    let pg = Postgres::start();
    let s3 = S3::start();
    let mut rows: Vec<(String, Stats)> = Vec::new();
    let result = (|| {
        rows.push((
            "embedded (SQLite + data_dir), 1 node".into(),
            spread(&bin, &kitchen, &base.join("embedded"), &[""], requests)?,
        ));
        for n in 1..=3usize {
            let url = pg.database(&format!("bench{n}"));
            let dir = base.join(format!("cluster{n}"));
            let extras: Vec<String> = (1..=n)
                .map(|i| {
                    let d = dir.join(format!("n{i}"));
                    format!(
                        "node = \"n{i}\"\n[storage]\nkind = \"postgres\"\nurl = \"{url}\"\n{}",
                        s3.config(&d)
                    )
                })
                .collect();
            let extras: Vec<&str> = extras.iter().map(String::as_str).collect();
            rows.push((
                format!(
                    "cluster (PostgreSQL + S3), {n} node{}",
                    if n > 1 { "s" } else { "" }
                ),
                spread(&bin, &kitchen, &dir, &extras, requests)?,
            ));
        }
        Ok::<_, anyhow::Error>(())
    })();
    let _ = std::fs::remove_dir_all(&base);
    result?;
    let reference = rows[0].1.per_sec;
    println!(
        "bench service --cluster: kitchen__greet at concurrency {CLUSTER_CONCURRENCY}, {} build, {requests} requests per row, process isolation, {} cores",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  reference: the embedded default (what one node runs without a cluster)");
    table("setup", "calls/s vs embedded", &rows, |s| {
        s.per_sec / reference
    });
    println!(
        "  cluster mode's single-node cost: {:.2}x the embedded default's time per call (goal <= 1.5)",
        reference / rows[1].1.per_sec
    );
    Ok(())
}

/// Workers at once in the cluster bench.
const CLUSTER_CONCURRENCY: usize = 8;

/// Start one node per `extras` entry under `dir`, upload kitchen through
/// the first, warm every node, then `requests` calls from
/// [`CLUSTER_CONCURRENCY`] workers, worker `i` on node `i % nodes`.
fn spread(
    bin: &Path,
    kitchen: &Path,
    dir: &Path,
    extras: &[&str],
    requests: u32,
) -> anyhow::Result<Stats> {
    let nodes: Vec<Node> = extras
        .iter()
        .enumerate()
        .map(|(i, extra)| start_node(bin, &dir.join(format!("n{}", i + 1)), 64, extra))
        .collect::<anyhow::Result<_>>()?;
    upload(&nodes[0].url, kitchen)?;
    let callers: Vec<_> = nodes.iter().map(|n| caller(&n.url)).collect();
    // Warm-up: each node reads the bytes (from the object store), compiles
    // them and opens its connections.
    let http = reqwest::blocking::Client::new();
    for c in &callers {
        for _ in 0..20 {
            c(&http)?;
        }
    }
    workers(
        CLUSTER_CONCURRENCY,
        (requests as usize / CLUSTER_CONCURRENCY).max(5),
        &callers,
    )
}

/// `n` workers at once, each with a client (connection) of its own, like
/// separate agents, each making `per_worker` calls with `callers[w % len]`.
fn workers<C>(n: usize, per_worker: usize, callers: &[C]) -> anyhow::Result<Stats>
where
    C: Fn(&reqwest::blocking::Client) -> anyhow::Result<Duration> + Sync,
{
    let start = Instant::now();
    let lat: Vec<Duration> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..n)
            .map(|w| {
                let call = &callers[w % callers.len()];
                sc.spawn(move || {
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
    Ok(stats(lat, start.elapsed()))
}

/// Upload kitchen.wasm and return a function making one `greet` call.
fn upload_and_caller(
    url: &str,
    kitchen: &Path,
) -> anyhow::Result<impl Fn(&reqwest::blocking::Client) -> anyhow::Result<Duration> + Sync> {
    upload(url, kitchen)?;
    Ok(caller(url))
}

/// Upload kitchen.wasm as `kitchen`.
fn upload(url: &str, kitchen: &Path) -> anyhow::Result<()> {
    let http = reqwest::blocking::Client::new();
    let up = http
        .post(format!("{url}/v1/components?name=kitchen"))
        .bearer_auth(TOKEN)
        .body(std::fs::read(kitchen)?)
        .send()?;
    if !up.status().is_success() {
        bail!("upload failed: {}", up.text()?);
    }
    Ok(())
}

/// A function making one `greet` call through the service at `url`.
fn caller(url: &str) -> impl Fn(&reqwest::blocking::Client) -> anyhow::Result<Duration> + Sync {
    let invoke_url = format!("{url}/v1/tools/kitchen__greet:invoke");
    let body = serde_json::json!({"arguments": {"name": "bench", "excited": false}});
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
    }
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
        let per_worker = (requests / conc).max(5) as usize;
        rows.push((
            format!("HTTP, concurrency {conc}"),
            workers(conc as usize, per_worker, std::slice::from_ref(&call))?,
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
    table("path", "p50 / CLI p50", &rows, |s| {
        s.p50.as_secs_f64() / reference.as_secs_f64()
    });
    Ok(())
}

/// Print `rows`: name (under `first`), calls/s, p50 and p99, and `ratio`
/// of each row against the run's reference (under `ratio_header`).
fn table(first: &str, ratio_header: &str, rows: &[(String, Stats)], ratio: impl Fn(&Stats) -> f64) {
    println!(
        "  {first:<44} {:>10} {:>11} {:>11} {ratio_header:>22}",
        "calls/s", "p50 ms", "p99 ms"
    );
    for (name, s) in rows {
        println!(
            "  {:<44} {:>10.1} {:>11.3} {:>11.3} {:>22.4}",
            name,
            s.per_sec,
            s.p50.as_secs_f64() * 1e3,
            s.p99.as_secs_f64() * 1e3,
            ratio(s)
        );
    }
}
