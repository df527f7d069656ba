//! `cargo xtask rootfs` / `cargo xtask guest-image`: the guest initramfs
//! (static musl `airlock-init` + directory skeleton, optionally the self-test
//! components), built reproducibly — same inputs, same bytes — and cached by
//! a hash of its inputs.

use airlock_guest::{EngineConfig, Runner};
use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the layout below changes.
const RECIPE: &str = "airlock-rootfs-recipe/2";

/// A file to put in the image.
struct Input {
    path_in_image: String,
    bytes: Vec<u8>,
    mode: u32,
}

/// Build the static musl init (release) and return its path.
pub fn build_init() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "x86_64-unknown-linux-musl",
            "-p",
            "airlock-guest",
            "--bin",
            "airlock-init",
            "--no-default-features",
        ])
        .current_dir(super::root())
        .env("CARGO_ENCODED_RUSTFLAGS", baseline_rustflags())
        // wasmtime's build script compiles a little C; Debian's musl-tools
        // names its compiler musl-gcc.
        .env(
            "CC_x86_64_unknown_linux_musl",
            std::env::var("CC_x86_64_unknown_linux_musl").unwrap_or_else(|_| "musl-gcc".into()),
        )
        .status()?;
    if !status.success() {
        bail!(
            "building airlock-init for x86_64-unknown-linux-musl failed (`rustup target add x86_64-unknown-linux-musl`?)"
        );
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::root().join("target"));
    strip(&target_dir.join("x86_64-unknown-linux-musl/release/airlock-init"))
}

/// Rust flags for native code built here to run elsewhere (the in-VM init,
/// the static `airlock` of the outer VM): the CPU baseline compiled Wasm
/// uses too (`airlock_guest::runner::baseline`). Set as
/// `CARGO_ENCODED_RUSTFLAGS`, which wins over `RUSTFLAGS` and any cargo
/// config, so a `-C target-cpu=native` there never reaches these binaries.
/// (With `--target`, build scripts and proc macros do not get them.)
pub fn baseline_rustflags() -> String {
    format!(
        "-Ctarget-cpu={}",
        airlock_guest::runner::baseline::RUSTC_TARGET_CPU
    )
}

/// A copy without symbols or debug info (`<path>.stripped`): the guest has no
/// use for them and they would be most of the initramfs.
pub fn strip(path: &Path) -> anyhow::Result<PathBuf> {
    let out = path.with_extension("stripped");
    // Strip into a private file and rename it into place, so two builds
    // sharing a target directory never see a half-written or missing file.
    let tmp = path.with_extension(format!("stripped.{}", std::process::id()));
    let status = Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&tmp)
        .arg(path)
        .status()?;
    if !status.success() {
        bail!("strip {} failed", path.display());
    }
    std::fs::rename(&tmp, &out)?;
    Ok(out)
}

/// Build (or find) the initramfs. With `selftest`, the example components the
/// init's self-test runs are included under /selftest.
pub fn build_rootfs(init: &Path, selftest: bool) -> anyhow::Result<PathBuf> {
    let mut inputs = vec![Input {
        path_in_image: "init".into(),
        bytes: std::fs::read(init).with_context(|| format!("reading {}", init.display()))?,
        mode: 0o100_755,
    }];
    // The self-test components go in compiled, as the host would send them:
    // the init has no compiler. The cache key takes the Wasm and the engine
    // fingerprint, so nothing is compiled when the image is already cached.
    let mut components = Vec::new();
    if selftest {
        for name in ["kitchen", "escape"] {
            let p = super::examples_out().join(format!("{name}.wasm"));
            let bytes = std::fs::read(&p).with_context(|| {
                format!("{} is missing: run `cargo xtask examples`", p.display())
            })?;
            components.push((name, bytes));
        }
    }
    let engine = EngineConfig {
        pooling: false,
        ..EngineConfig::default()
    };
    let mut h = Sha256::new();
    h.update(RECIPE);
    for i in &inputs {
        h.update(i.path_in_image.as_bytes());
        h.update(i.mode.to_le_bytes());
        h.update(Sha256::digest(&i.bytes));
    }
    for (name, wasm) in &components {
        h.update(engine.fingerprint());
        h.update(name.as_bytes());
        h.update(Sha256::digest(wasm));
    }
    let key = hex::encode(&h.finalize()[..8]);
    let name = if selftest {
        "initramfs-selftest.cpio.gz"
    } else {
        "initramfs.cpio.gz"
    };
    let out = super::kernel::cache_dir()
        .join("rootfs")
        .join(&key)
        .join(name);
    let dir = out.parent().expect("has parent").to_path_buf();
    if !out.exists() {
        if !components.is_empty() {
            let runner =
                Runner::new(engine).context("starting a runner to compile the self-test")?;
            for (name, wasm) in components {
                inputs.push(Input {
                    path_in_image: format!("selftest/{name}.cwasm"),
                    bytes: runner
                        .precompile(&wasm)
                        .with_context(|| format!("compiling {name}.wasm"))?,
                    mode: 0o100_644,
                });
            }
        }
        let bytes = cpio_gz(&inputs, selftest)?;
        std::fs::create_dir_all(&dir)?;
        let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &out)?;
    }
    // Two entries are in use at a time (the image and its self-test twin).
    super::cache::use_and_prune(&dir, 6)?;
    Ok(out)
}

/// The guest's archive: its directories, /dev/console, then the files, in
/// a fixed order with fixed inode numbers, owners and times.
fn cpio_gz(inputs: &[Input], selftest: bool) -> anyhow::Result<Vec<u8>> {
    let mut dirs = vec!["dev", "proc", "sys", "tmp", "run", "mnt"];
    if selftest {
        dirs.push("selftest");
    }
    let files: Vec<crate::cpio::Entry<'_>> = inputs
        .iter()
        .map(|f| (f.path_in_image.as_str(), f.bytes.as_slice(), f.mode))
        .collect();
    crate::cpio::initramfs(&dirs, &files, flate2::Compression::default())
}

/// Paths of a complete guest image, written to `<cache>/guest-image.json`
/// for tests and the demo.
pub fn guest_image() -> anyhow::Result<()> {
    let kernel = super::kernel::build()?;
    let init = build_init()?;
    let rootfs = build_rootfs(&init, false)?;
    let selftest = build_rootfs(&init, true)?;
    let manifest = serde_json::json!({
        "vmlinux": kernel.vmlinux,
        "bzimage": kernel.bzimage,
        "initramfs": rootfs,
        "initramfs_selftest": selftest,
        "init": init,
    });
    let path = super::kernel::cache_dir().join("guest-image.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?)?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    eprintln!("guest image ({}):", path.display());
    eprintln!(
        "  vmlinux            {:>10} bytes  {}",
        size(&kernel.vmlinux),
        kernel.vmlinux.display()
    );
    eprintln!(
        "  bzImage            {:>10} bytes  {}",
        size(&kernel.bzimage),
        kernel.bzimage.display()
    );
    eprintln!(
        "  initramfs          {:>10} bytes  {}",
        size(&rootfs),
        rootfs.display()
    );
    eprintln!(
        "  initramfs-selftest {:>10} bytes  {}",
        size(&selftest),
        selftest.display()
    );
    println!("{}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(init: &[u8]) -> Vec<Input> {
        vec![
            Input {
                path_in_image: "init".into(),
                bytes: init.to_vec(),
                mode: 0o100_755,
            },
            Input {
                path_in_image: "selftest/a.wasm".into(),
                bytes: b"\0asm".to_vec(),
                mode: 0o100_644,
            },
        ]
    }

    #[test]
    fn same_inputs_same_bytes() {
        let a = cpio_gz(&inputs(b"init-v1"), true).unwrap();
        let b = cpio_gz(&inputs(b"init-v1"), true).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, cpio_gz(&inputs(b"init-v2"), true).unwrap());
    }

    #[test]
    fn archive_has_the_skeleton_console_and_files() {
        use std::io::Read;
        let gz = cpio_gz(&inputs(b"init-v1"), true).unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_end(&mut raw)
            .unwrap();
        let mut names = Vec::new();
        let mut rest: &[u8] = &raw;
        loop {
            let r = cpio::newc::Reader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            names.push((
                r.entry().name().to_string(),
                r.entry().mode(),
                r.entry().mtime(),
            ));
            rest = r.finish().unwrap();
        }
        let find = |n: &str| {
            names
                .iter()
                .find(|(x, ..)| x == n)
                .unwrap_or_else(|| panic!("{n} missing: {names:?}"))
        };
        assert_eq!(find("init").1, 0o100_755);
        assert_eq!(find("dev/console").1, 0o020_600);
        assert_eq!(find("selftest/a.wasm").1, 0o100_644);
        for d in ["dev", "proc", "sys", "tmp", "run", "mnt", "selftest"] {
            assert_eq!(find(d).1, 0o040_755);
        }
        assert!(names.iter().all(|(_, _, mtime)| *mtime == 0));
    }
}
