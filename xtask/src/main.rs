//! `cargo xtask`: build orchestration.
//!
//! * `cargo xtask examples` — build the example components for wasm32-wasip2
//!   into `examples/out/`, with their WIT (doc comments) embedded as an
//!   `airlock-wit` custom section.
//! * `cargo xtask kernel` — build the guest kernel, cached under the cache dir.
//! * `cargo xtask rootfs [--selftest]` — build the initramfs, reproducibly.
//! * `cargo xtask guest-image` — all of the above, paths in `<cache>/guest-image.json`.
//! * `cargo xtask bench service` — HTTP invocations/s and p50/p99 at
//!   concurrency 1/8/64 next to the CLI runner, in one run; `--cluster`:
//!   calls/s and p50/p99 with 1, 2 and 3 nodes sharing a real PostgreSQL
//!   and S3-compatible server, beside the embedded default
//! * `cargo xtask bench load` — N (1,000) invocations at once through the
//!   service: no errors, p50/p99 against one call at a time, same run;
//!   `--isolation vm` runs the service in VM isolation inside the nested
//!   harness (`--max-vms`)
//! * `cargo xtask bench boot` — inside the nested harness, boot of our VMM
//!   against QEMU `-M microvm` (same vmlinux + initramfs), ratio of medians,
//!   plus the VMM's own RSS overhead
//! * `cargo xtask bench fs [--rounds N]` — inside the nested harness, a
//!   64 MiB read and 10,000 stats through virtio-fs against process
//!   isolation on the same directory, and boots with and without a share.
//! * `cargo xtask bench models [--rounds N]` — inside the nested harness,
//!   host memory per VM of 4 running the `embed` tool at once (the model a
//!   capability) against `embed-inline` (weights copied into the
//!   component), and embeddings/s in VM against process isolation.
//! * `cargo xtask bench runner` — per-call latency of the runner's fast path
//!   against instantiate-from-bytes, printed as a ratio.
//! * `cargo xtask fuzz [--seconds N] [--target NAME] [--quick-build]` — every fuzz target in
//!   `fuzz/` for N seconds (cargo-fuzz on nightly; see docs/fuzzing.md).
//! * `cargo xtask prune-cache` — remove the stale builds (older generations
//!   of a crate) from the cached cargo target directories.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod bench_service;
mod cache;
mod cpio;
mod fuzz;
mod image;
mod kernel;
mod nested;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the example components into examples/out/.
    Examples,
    /// Build the guest kernel (vmlinux + bzImage), cached by source version + config.
    Kernel,
    /// Build the guest initramfs (static musl init), reproducibly, cached.
    Rootfs {
        /// Include the self-test components (examples/out) under /selftest.
        #[arg(long)]
        selftest: bool,
    },
    /// Kernel + init + both initramfs images; writes <cache>/guest-image.json.
    GuestImage,
    /// The nested-KVM harness (outer QEMU TCG VM); writes <cache>/nested.json.
    Nested,
    /// Run the fuzz targets in fuzz/ (cargo-fuzz on nightly; installs
    /// what it lacks).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Build without optimizations: faster to build, slower to run
        /// (smoke runs).
        #[arg(long)]
        quick_build: bool,
    },
    /// Remove stale builds from the cargo target directories under the
    /// cache (the shared target and the fuzz build's): what a rebuild with
    /// new dependencies left behind.
    PruneCache,
    /// Benchmarks that print ratios measured in one run.
    Bench {
        /// Which benchmark: `runner`, `service`, `load`, `boot`, `fs`, `start` or
        /// `models`.
        which: String,
        /// Calls per measurement.
        #[arg(long, default_value_t = 2000)]
        iterations: u32,
        /// Rounds for `boot` (each boots both VMMs once).
        #[arg(long, default_value_t = 7)]
        rounds: u32,
        /// Invocations at once for `load`.
        #[arg(long, default_value_t = 1000)]
        concurrency: u32,
        /// For `load`: `process` (here) or `vm` (the service in VM
        /// isolation inside the nested harness).
        #[arg(long, default_value = "process")]
        isolation: String,
        /// For `load --isolation vm`: the service's `isolation.max_vms`.
        #[arg(long, default_value_t = 4)]
        max_vms: u32,
        /// For `boot`: compare with this `airlock-vmm` build (static musl)
        /// instead of QEMU — an A/B of two VMMs in one run.
        #[arg(long)]
        reference_vmm: Option<PathBuf>,
        /// For `service`: cluster mode (PostgreSQL + S3) with 1, 2 and 3
        /// nodes beside the embedded default.
        #[arg(long)]
        cluster: bool,
        /// For `fs`: boot pairs (with and without a share); default three
        /// a round. Boots under the harness move by hundreds of ms, so a
        /// ratio near its goal needs many pairs to be placed.
        #[arg(long)]
        boot_pairs: Option<u32>,
    },
}

/// Example crates and their output names.
pub const EXAMPLES: &[&str] = &[
    "kitchen",
    "files",
    "fetch",
    "escape",
    "notes",
    "embed",
    "embed-inline",
];

/// The workspace root. Read from the environment `cargo run` sets, not from
/// the compile-time value: clones that share a cached target directory reuse
/// this binary, and it must act on the clone it is run from.
pub fn root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Examples => examples(),
        Cmd::Rootfs { selftest } => {
            let init = image::build_init()?;
            let p = image::build_rootfs(&init, selftest)?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::GuestImage => image::guest_image(),
        Cmd::Nested => nested::build(),
        Cmd::Fuzz {
            seconds,
            target,
            quick_build,
        } => fuzz::run(seconds, target, quick_build),
        Cmd::PruneCache => {
            let mut targets = vec![kernel::cache_dir().join("fuzz/target")];
            if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
                targets.push(PathBuf::from(t));
            }
            for t in targets.iter().filter(|t| t.is_dir()) {
                cache::prune_target_logged(t)?;
            }
            Ok(())
        }
        Cmd::Kernel => kernel::build().map(|k| {
            println!("vmlinux {}", k.vmlinux.display());
            println!("bzImage {}", k.bzimage.display());
        }),
        Cmd::Bench {
            which,
            iterations,
            rounds,
            concurrency,
            isolation,
            max_vms,
            reference_vmm,
            cluster,
            boot_pairs,
        } => match which.as_str() {
            "runner" => bench_runner(iterations),
            "service" if cluster => bench_service::cluster(iterations),
            "service" => bench_service::run(iterations),
            "load" => match isolation.as_str() {
                "process" => bench_service::load(concurrency),
                "vm" => nested::bench_load_vm(concurrency, max_vms),
                other => bail!("--isolation: expected process or vm, got {other:?}"),
            },
            "boot" => nested::bench_boot(rounds, reference_vmm),
            "fs" => nested::bench_fs(rounds, boot_pairs.unwrap_or(rounds.saturating_mul(3))),
            "start" => nested::bench_start(rounds),
            "models" => nested::bench_models(rounds),
            other => {
                bail!(
                    "unknown benchmark {other:?}; available: runner, service, load, boot, fs, start, models"
                )
            }
        },
    }
}

/// Where built example components end up (with their WIT embedded).
pub fn examples_out() -> PathBuf {
    root().join("examples/out")
}

pub fn examples() -> anyhow::Result<()> {
    let dir = root().join("examples");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .current_dir(&dir)
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!(
            "building the examples failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`)"
        );
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.join("target"));
    let built = target_dir.join("wasm32-wasip2/release");
    let out = examples_out();
    std::fs::create_dir_all(&out)?;
    for name in EXAMPLES {
        // Cargo names a library's artifact with `_` for `-`.
        let src = built.join(format!("{}.wasm", name.replace('-', "_")));
        let dst = out.join(format!("{name}.wasm"));
        let bytes = std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        let bytes = embed_wit(bytes, &dir.join(name).join("wit"))?;
        std::fs::write(&dst, bytes)?;
        eprintln!("built {}", dst.display());
    }
    Ok(())
}

/// Append the crate's WIT source as an `airlock-wit` custom section.
fn embed_wit(mut bytes: Vec<u8>, wit_dir: &Path) -> anyhow::Result<Vec<u8>> {
    use wasm_encoder::{CustomSection, Encode, Section};
    let mut files: Vec<PathBuf> = std::fs::read_dir(wit_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wit"))
        .collect();
    files.sort();
    if files.len() != 1 {
        bail!(
            "{} must hold exactly one .wit file to embed",
            wit_dir.display()
        );
    }
    let text = std::fs::read_to_string(&files[0])?;
    let section = CustomSection {
        name: airlock_wasm_tools::docs::WIT_SECTION.into(),
        data: text.as_bytes().into(),
    };
    bytes.push(section.id());
    section.encode(&mut bytes);
    Ok(bytes)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Per-call latency of a trivial tool: precompiled + InstancePre + pooling
/// (fresh store per call) vs compiling and instantiating from bytes each call.
fn bench_runner(iterations: u32) -> anyhow::Result<()> {
    use airlock_guest::{EngineConfig, GrantSet, Runner};
    let wasm_path = examples_out().join("kitchen.wasm");
    if !wasm_path.exists() {
        examples()?;
    }
    let wasm = std::fs::read(&wasm_path)?;
    let args = serde_json::json!({"name": "bench", "excited": false});
    let grants = GrantSet::default();

    let fast = Runner::new(EngineConfig::default())?;
    let artifact = fast.precompile(&wasm)?;
    let loaded = fast.load_precompiled(&artifact, &Default::default())?;
    let slow = Runner::new(EngineConfig {
        pooling: false,
        ..EngineConfig::default()
    })?;

    let call = |runner: &Runner, loaded: &airlock_guest::Loaded| {
        let out = runner.invoke(loaded, "greet", &args, &grants);
        assert!(
            matches!(out.result, airlock_guest::CallResult::Ok(_)),
            "{out:?}"
        );
    };
    for _ in 0..50 {
        call(&fast, &loaded);
    }
    let slow_iters = (iterations / 20).max(10);
    let mut fast_t = Vec::new();
    let mut slow_t = Vec::new();
    // Alternate rounds so both see the same machine conditions.
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..iterations / 5 {
            call(&fast, &loaded);
        }
        fast_t.push(t.elapsed() / (iterations / 5));
        let t = Instant::now();
        for _ in 0..slow_iters / 5 {
            let l = slow.load_wasm(&wasm)?;
            call(&slow, &l);
        }
        slow_t.push(t.elapsed() / (slow_iters / 5).max(1));
    }
    let (f, s) = (median(fast_t), median(slow_t));
    println!("bench runner: trivial tool `greet` of kitchen.wasm, median of 5 rounds");
    println!(
        "  fast path (precompiled, InstancePre, pooling, fresh store): {:>10.1} us/call",
        f.as_secs_f64() * 1e6
    );
    println!(
        "  reference (compile + instantiate from bytes, fresh store): {:>10.1} us/call",
        s.as_secs_f64() * 1e6
    );
    println!(
        "  ratio fast/reference: {:.4}  (reference is {:.0}x slower)",
        f.as_secs_f64() / s.as_secs_f64(),
        s.as_secs_f64() / f.as_secs_f64()
    );
    Ok(())
}

/// Run `cmd` to its end; fail naming it unless it succeeds.
fn run(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
