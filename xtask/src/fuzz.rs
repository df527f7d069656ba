//! `cargo xtask fuzz [--seconds N] [--target NAME]`: every fuzz target in
//! `fuzz/` (cargo-fuzz, libFuzzer, AddressSanitizer, on the nightly
//! toolchain) for N seconds each. Installs what it lacks (the nightly
//! toolchain, cargo-fuzz). The corpus grows under `<cache>/fuzz/corpus/`
//! between runs; `fuzz/seeds/<target>/` holds inputs kept in the repo —
//! every crash found, once fixed, goes there and runs first on every run
//! (a regression test). A crash fails the command and names the input.

use anyhow::{Context, bail};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// The targets, in the order they run.
pub const TARGETS: &[&str] = &[
    "frames",
    "egress_serve",
    "egress_rules",
    "policy",
    "vsock_tx",
    "vsock_rx",
    "virtio_mmio",
    "component_values",
    "fuse",
];

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The nightly toolchain and cargo-fuzz, installed when missing.
fn tools() -> anyhow::Result<()> {
    if !ok(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        eprintln!("fuzz: installing the nightly toolchain (rustup)");
        super::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    if !ok(Command::new("cargo").args(["fuzz", "--version"])) {
        eprintln!("fuzz: installing cargo-fuzz");
        super::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// `cargo +nightly fuzz …` in the repo, with the fuzz build's own target
/// directory under the cache (its flags differ from every other build's).
fn cargo_fuzz(root: &Path, cache: &Path) -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"])
        .current_dir(root)
        .env("CARGO_TARGET_DIR", cache.join("target"))
        // The product's own build settings must not leak in.
        .env_remove("RUSTFLAGS");
    c
}

/// Run `only` (or every target) for `seconds` each; `quick` builds without
/// optimizations (minutes faster to build on a fresh machine, slower to
/// run: for smoke runs such as CI's).
pub fn run(seconds: u64, only: Option<String>, quick: bool) -> anyhow::Result<()> {
    let mode = if quick { "--dev" } else { "--release" };
    let targets: Vec<&str> = match &only {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!(
            "unknown fuzz target {t:?}; available: {}",
            TARGETS.join(", ")
        ),
        None => TARGETS.to_vec(),
    };
    tools()?;
    let root = super::root();
    let cache = super::kernel::cache_dir().join("fuzz");
    let start = Instant::now();
    eprintln!("fuzz: building the targets (nightly, sanitizer: address, {mode})");
    super::run(cargo_fuzz(&root, &cache).args(["build", mode]))
        .context("building the fuzz targets")?;
    eprintln!("fuzz: built in {}s", start.elapsed().as_secs());
    // Each build with new dependencies leaves ~3 GB of binaries behind.
    super::cache::prune_target_logged(&cache.join("target"))?;
    for t in targets {
        let corpus = cache.join("corpus").join(t);
        let artifacts = cache.join("artifacts").join(t);
        let seeds = root.join("fuzz/seeds").join(t);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        // What a target makes on disk (the fuse target's share) goes in a
        // directory of its own, emptied before each run.
        let tmp = cache.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let begun = Instant::now();
        let mut cmd = cargo_fuzz(&root, &cache);
        cmd.env("TMPDIR", &tmp).args(["run", mode, t]).arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args(["-rss_limit_mb=2048", "-timeout=20", "-print_final_stats=1"]);
        let status = cmd.status().context("running cargo fuzz")?;
        if !status.success() {
            bail!(
                "fuzz target {t} failed: the input is in {} (fix it, then keep it in fuzz/seeds/{t}/)",
                artifacts.display()
            );
        }
        eprintln!("fuzz: {t}: no crash in {}s", begun.elapsed().as_secs());
    }
    Ok(())
}
