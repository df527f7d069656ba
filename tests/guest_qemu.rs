//! The guest image without our VMM: boot kernel + initramfs under
//! `qemu-system-x86_64 -accel tcg -M microvm` (no KVM needed) in self-test
//! mode and check what init prints on the serial console. Proves the kernel
//! config and the init before the VMM exists.
//!
//! Needs `cargo xtask guest-image` (scripts/test.sh runs it), which writes
//! `<cache>/guest-image.json`.

mod common;

use std::process::Command;
use std::time::Duration;

/// Boot under QEMU TCG microvm; returns (console output, exited by itself).
fn boot(initrd_key: &str, extra_cmdline: &str, timeout: Duration) -> (String, bool) {
    let img = common::manifest("guest-image.json", "guest-image");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,acpi=off,rtc=off",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        "512",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .arg("-kernel")
    .arg(img["vmlinux"].as_str().unwrap())
    .arg("-initrd")
    .arg(img[initrd_key].as_str().unwrap())
    .arg("-append")
    .arg(format!(
        "console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 random.trust_cpu=on quiet {extra_cmdline}"
    ));
    common::run_with_timeout(cmd, timeout)
}

#[test]
fn selftest_runs_components_in_the_guest_and_reboots() {
    let (out, exited) = boot(
        "initramfs_selftest",
        "airlock.selftest=1",
        Duration::from_secs(600),
    );
    assert!(
        exited,
        "the guest did not power off within the timeout; console:\n{out}"
    );
    assert!(
        out.contains("AIRLOCK-SELFTEST-START"),
        "init never started; console:\n{out}"
    );
    assert!(
        out.contains(r#""result":{"ok":"Hello, microVM."}"#),
        "console:\n{out}"
    );
    assert!(
        out.contains(r#""result":{"ok":{"count":4,"max":4.0,"mean":2.5,"min":1.0}}"#),
        "console:\n{out}"
    );
    assert!(
        out.contains(r#""kind":"cpu_limit""#),
        "the spin tool was not stopped; console:\n{out}"
    );
    assert!(out.contains("AIRLOCK-SELFTEST-DONE ok"), "console:\n{out}");
    assert!(
        out.contains("airlock-init: self-test finished; powering off"),
        "console:\n{out}"
    );
}

#[test]
fn a_dead_init_is_a_guest_kernel_panic_and_the_vm_exits() {
    let (out, exited) = boot(
        "initramfs_selftest",
        "airlock.selftest=panic",
        Duration::from_secs(300),
    );
    assert!(
        exited,
        "the guest did not exit after the panic; console:\n{out}"
    );
    assert!(out.contains("Kernel panic"), "console:\n{out}");
    assert!(out.contains("Attempted to kill init"), "console:\n{out}");
}
