//! `cargo xtask nested`: the outer VM that gives us real KVM on hosts whose
//! `/dev/kvm` is PVM (see ../shared/NESTED-KVM.md). It is QEMU TCG with an
//! emulated AMD CPU with SVM, Debian's cloud kernel and its kvm-amd module;
//! its initramfs holds busybox, the static musl `airlock`, the guest kernel
//! and initramfs images, and `vm-tests.sh`, which runs the VM scenarios and
//! prints each result between `NESTED-RESULT-BEGIN/END` markers.
//!
//! Writes `<cache>/nested.json` with the outer kernel and initramfs paths;
//! `tests/vm_nested.rs` boots it and checks every scenario.

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const RECIPE: &str = "airlock-nested-recipe/1";

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Debian's cloud kernel package: download once, extract into the cache.
fn outer_kernel(cache: &Path) -> anyhow::Result<PathBuf> {
    let dep = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()?;
    let text = String::from_utf8_lossy(&dep.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .context("apt-cache does not know linux-image-cloud-amd64 (run apt-get update)")?
        .to_string();
    let dir = cache.join("outer").join(&pkg);
    let done = dir.join(".extracted");
    if !done.exists() {
        eprintln!("nested: downloading {pkg}");
        std::fs::create_dir_all(&dir)?;
        run(Command::new("apt-get")
            .args(["download", &pkg])
            .current_dir(&dir))?;
        let deb = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download produced no .deb")?;
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("x")))?;
        std::fs::write(&done, b"")?;
    }
    Ok(dir.join("x"))
}

fn build_musl_airlock() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "x86_64-unknown-linux-musl",
            "-p",
            "airlock",
            "--bin",
            "airlock",
        ])
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .current_dir(super::root()))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::root().join("target"));
    super::image::strip(&target_dir.join("x86_64-unknown-linux-musl/release/airlock"))
}

const OUTER_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp && mount -t tmpfs tmp /tmp
for m in irqbypass kvm kvm-amd; do
  insmod /lib/modules/$m.ko || echo "NESTED-ERROR insmod $m failed"
done
[ -e /dev/kvm ] || echo "NESTED-ERROR /dev/kvm missing after loading kvm-amd"
echo NESTED-START
sh /vm-tests.sh
echo NESTED-END
poweroff -f
"#;

const VM_TESTS: &str = r#"# Each scenario: its name, then an `airlock` subcommand and its arguments.
# `airlock_only=<name>` on the outer kernel command line runs just that one.
G=/guest
E=/examples
scenario() {
  name=$1; shift
  if [ -n "$airlock_only" ] && [ "$airlock_only" != "$name" ]; then return; fi
  echo "NESTED-RESULT-BEGIN $name"
  /airlock "$@" 2>&1
  echo "NESTED-RESULT-END $name $?"
}
BOOT="vm boot --kernel $G/vmlinux"
VMRUN="--isolation vm --kernel $G/vmlinux --initrd $G/initramfs.cpio.gz"
printf 'version = 1\n[limits]\nfuel = 2000000\n' > /tmp/small-fuel.toml
scenario vm-invoke run $E/kitchen.wasm --tool recipes_summarize --args '{"values": [12, 30, 45, 8]}' $VMRUN
scenario vm-escape-spin run $E/escape.wasm --tool spin --policy /tmp/small-fuel.toml $VMRUN
scenario vm-escape-socket run $E/escape.wasm --tool open-socket --args '{"addr": "10.0.2.2:80"}' $VMRUN
scenario selftest $BOOT --initrd $G/initramfs-selftest.cpio.gz --cmdline airlock.selftest=1 --timeout-secs 900
scenario panic $BOOT --initrd $G/initramfs-selftest.cpio.gz --cmdline airlock.selftest=panic --timeout-secs 300
scenario never-ready $BOOT --initrd $G/initramfs.cpio.gz --timeout-secs 20
scenario pvm-free-check $BOOT --initrd /nonexistent.cpio.gz
scenario twenty-boots vm soak --kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz --cmdline airlock.selftest=panic --count 20 --timeout-secs 120
"#;

/// Build everything and write `<cache>/nested.json`.
pub fn build() -> anyhow::Result<()> {
    let cache = super::kernel::cache_dir();
    let kernel = super::kernel::build()?;
    let init = super::image::build_init()?;
    let rootfs = super::image::build_rootfs(&init, false)?;
    let selftest = super::image::build_rootfs(&init, true)?;
    let airlock = build_musl_airlock()?;
    let outer = outer_kernel(&cache)?;
    let vmlinuz = std::fs::read_dir(outer.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the cloud kernel package")?;
    let modules = std::fs::read_dir(outer.join("lib/modules"))?
        .next()
        .context("no modules")??
        .path();
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing: apt-get install busybox-static");
    }

    let files: Vec<(String, PathBuf, u32)> = vec![
        ("init".into(), PathBuf::new(), 0o100_755),
        ("vm-tests.sh".into(), PathBuf::new(), 0o100_644),
        ("bin/busybox".into(), busybox, 0o100_755),
        ("airlock".into(), airlock, 0o100_755),
        (
            "examples/kitchen.wasm".into(),
            super::examples_out().join("kitchen.wasm"),
            0o100_644,
        ),
        (
            "examples/escape.wasm".into(),
            super::examples_out().join("escape.wasm"),
            0o100_644,
        ),
        (
            "lib/modules/irqbypass.ko".into(),
            modules.join("kernel/virt/lib/irqbypass.ko"),
            0o100_644,
        ),
        (
            "lib/modules/kvm.ko".into(),
            modules.join("kernel/arch/x86/kvm/kvm.ko"),
            0o100_644,
        ),
        (
            "lib/modules/kvm-amd.ko".into(),
            modules.join("kernel/arch/x86/kvm/kvm-amd.ko"),
            0o100_644,
        ),
        ("guest/vmlinux".into(), kernel.vmlinux.clone(), 0o100_644),
        ("guest/initramfs.cpio.gz".into(), rootfs, 0o100_644),
        (
            "guest/initramfs-selftest.cpio.gz".into(),
            selftest,
            0o100_644,
        ),
    ];
    let mut h = Sha256::new();
    h.update(RECIPE);
    h.update(OUTER_INIT);
    h.update(VM_TESTS);
    let mut contents = Vec::new();
    for (name, path, mode) in &files {
        let bytes = match name.as_str() {
            "init" => OUTER_INIT.as_bytes().to_vec(),
            "vm-tests.sh" => VM_TESTS.as_bytes().to_vec(),
            _ => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        };
        h.update(name.as_bytes());
        h.update(Sha256::digest(&bytes));
        contents.push((name.clone(), bytes, *mode));
    }
    let key = hex::encode(&h.finalize()[..8]);
    let out = cache.join("nested").join(key).join("outer.cpio.gz");
    if !out.exists() {
        std::fs::create_dir_all(out.parent().expect("parent"))?;
        let bytes = outer_cpio(&contents)?;
        std::fs::write(&out, bytes)?;
    }
    let manifest = serde_json::json!({ "outer_kernel": vmlinuz, "outer_initramfs": out });
    let path = cache.join("nested.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?)?;
    eprintln!("nested harness: {}", path.display());
    println!("{}", path.display());
    Ok(())
}

fn outer_cpio(files: &[(String, Vec<u8>, u32)]) -> anyhow::Result<Vec<u8>> {
    use cpio::newc::Builder;
    let mut cpio = Vec::new();
    let mut ino = 1;
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "lib",
        "lib/modules",
        "guest",
        "examples",
    ] {
        ino += 1;
        Builder::new(d)
            .ino(ino)
            .mode(0o040_755)
            .nlink(2)
            .write(&mut cpio, 0)
            .finish()?;
    }
    ino += 1;
    Builder::new("dev/console")
        .ino(ino)
        .mode(0o020_600)
        .nlink(1)
        .rdev_major(5)
        .rdev_minor(1)
        .write(&mut cpio, 0)
        .finish()?;
    for (name, bytes, mode) in files {
        ino += 1;
        let mut w = Builder::new(name)
            .ino(ino)
            .mode(*mode)
            .nlink(1)
            .write(&mut cpio, u32::try_from(bytes.len())?);
        w.write_all(bytes)?;
        w.finish()?;
    }
    cpio::newc::trailer(&mut cpio)?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::fast());
    gz.write_all(&cpio)?;
    Ok(gz.finish()?)
}
