//! `cargo xtask kernel`: the guest kernel from Debian's linux-source-6.1,
//! `make tinyconfig` + `kernel/airlock.config`, cached by a hash of the source
//! package version and the config fragment.

use anyhow::bail;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the kernel source tarball comes from (`apt-get install linux-source-6.1`).
const TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// Bump when the build recipe below changes.
const RECIPE: &str = "airlock-kernel-recipe/1";

/// A built kernel.
pub struct Kernel {
    /// Uncompressed ELF (what Airlock's VMM and QEMU's PVH loader boot).
    pub vmlinux: PathBuf,
    /// Compressed image (for size reports and bzImage loaders).
    pub bzimage: PathBuf,
}

/// The cache directory: `$AIRLOCK_CACHE` or `~/.cache/airlock`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("AIRLOCK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/airlock")
        })
}

fn fragment() -> PathBuf {
    super::root().join("kernel/airlock.config")
}

fn source_version() -> anyhow::Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "linux-source-6.1"])
        .output();
    match out {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        }
        _ => bail!(
            "linux-source-6.1 is not installed; run `apt-get install linux-source-6.1` (scripts/test.sh does)"
        ),
    }
}

use super::run;

/// Build (or find in the cache) the guest kernel.
pub fn build() -> anyhow::Result<Kernel> {
    let version = source_version()?;
    let frag = std::fs::read(fragment())?;
    let mut h = Sha256::new();
    h.update(RECIPE);
    h.update(version.as_bytes());
    h.update(&frag);
    let key = hex::encode(&h.finalize()[..8]);
    let cache = cache_dir().join("kernel");
    let out = cache.join(&key);
    let kernel = Kernel {
        vmlinux: out.join("vmlinux"),
        bzimage: out.join("bzImage"),
    };
    if kernel.vmlinux.exists() && kernel.bzimage.exists() {
        eprintln!("kernel: cached ({key}, linux-source {version})");
        return Ok(kernel);
    }

    let src_root = cache.join(format!("src-{}", version.replace(['/', ':'], "_")));
    let src = src_root.join("linux-source-6.1");
    if !src.join("Makefile").exists() {
        eprintln!("kernel: unpacking {TARBALL}");
        std::fs::create_dir_all(&src_root)?;
        run(Command::new("tar")
            .args(["-xJf", TARBALL, "-C"])
            .arg(&src_root))?;
    }
    let build = cache.join(format!("build-{key}"));
    std::fs::create_dir_all(&build)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(&src)
            .arg(format!("O={}", build.display()))
            .args(args);
        c
    };
    eprintln!("kernel: configuring (tinyconfig + kernel/airlock.config)");
    run(&mut make(&["-s", "tinyconfig"]))?;
    run(Command::new(src.join("scripts/kconfig/merge_config.sh"))
        .args(["-m", "-O"])
        .arg(&build)
        .arg(build.join(".config"))
        .arg(fragment()))?;
    run(&mut make(&["-s", "olddefconfig"]))?;
    verify_config(&build.join(".config"), &String::from_utf8_lossy(&frag))?;
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    eprintln!(
        "kernel: building vmlinux and bzImage with {jobs} jobs (a few minutes; cached afterwards)"
    );
    run(&mut make(&[&format!("-j{jobs}"), "vmlinux", "bzImage"]))?;
    std::fs::create_dir_all(&out)?;
    std::fs::copy(build.join("vmlinux"), &kernel.vmlinux)?;
    std::fs::copy(build.join("arch/x86/boot/bzImage"), &kernel.bzimage)?;
    std::fs::copy(build.join(".config"), out.join("config"))?;
    let _ = std::fs::remove_dir_all(&build);
    eprintln!(
        "kernel: done: bzImage {} bytes, vmlinux {} bytes",
        std::fs::metadata(&kernel.bzimage)?.len(),
        std::fs::metadata(&kernel.vmlinux)?.len()
    );
    Ok(kernel)
}

/// Every `CONFIG_X=y|n|value` line of the fragment must be in the final config.
fn verify_config(config: &Path, fragment: &str) -> anyhow::Result<()> {
    let cfg = std::fs::read_to_string(config)?;
    let mut missing = Vec::new();
    for line in fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
    {
        if !cfg.lines().any(|l| l.trim() == line) {
            missing.push(line.to_string());
        }
    }
    if !missing.is_empty() {
        bail!(
            "the kernel config dropped these options (unmet dependencies?): {}",
            missing.join(", ")
        );
    }
    Ok(())
}
