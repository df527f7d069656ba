//! `airlock-vmm`: the VMM alone, as a small process — what `airlock vm boot`
//! does, without the Wasm engine, the service or a CLI framework linked in.
//! It is what `airlock vm bench-boot` measures against QEMU (process against
//! process), and the shape a per-VM jailed process would take.
//!
//! ```text
//! airlock-vmm --kernel vmlinux --initrd initramfs.cpio.gz [--cmdline "…"]
//!             [--memory-mib 256] [--vcpus 1] [--timeout-secs 60] [--pmem image]
//! ```
//! Prints one JSON object: exit, wall_ms, peak_rss_kib, guest_resident_kib,
//! console. Exit status 0 when the VM ran (whatever its exit), 2 on bad input.

use airlock_vmm::{self as vmm, VmConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "airlock-vmm: {msg}\nusage: airlock-vmm --kernel FILE --initrd FILE [--cmdline TEXT] [--memory-mib N] [--vcpus N] [--timeout-secs N] [--pmem FILE]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut cfg = VmConfig {
        kernel: PathBuf::new(),
        initrd: PathBuf::new(),
        cmdline_extra: String::new(),
        memory_mib: 256,
        vcpus: 1,
        timeout: Duration::from_secs(60),
        console_cap: 1 << 20,
        vsock: None,
        stop: None,
        pmem: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            return usage(&format!("{flag} needs a value"));
        };
        let number = |what: &str| -> Result<u64, ExitCode> {
            value
                .parse()
                .map_err(|_| usage(&format!("{what} must be a number, got {value:?}")))
        };
        match flag.as_str() {
            "--kernel" => cfg.kernel = value.into(),
            "--initrd" => cfg.initrd = value.into(),
            "--cmdline" => cfg.cmdline_extra = value,
            "--pmem" => cfg.pmem = Some(value.into()),
            "--memory-mib" => match number("--memory-mib") {
                Ok(n) => cfg.memory_mib = n.try_into().unwrap_or(u32::MAX),
                Err(c) => return c,
            },
            "--vcpus" => match number("--vcpus") {
                Ok(n) => cfg.vcpus = n.try_into().unwrap_or(u8::MAX),
                Err(c) => return c,
            },
            "--timeout-secs" => match number("--timeout-secs") {
                Ok(n) => cfg.timeout = Duration::from_secs(n),
                Err(c) => return c,
            },
            other => return usage(&format!("unknown flag {other}")),
        }
    }
    if cfg.kernel.as_os_str().is_empty() || cfg.initrd.as_os_str().is_empty() {
        return usage("--kernel and --initrd are required");
    }
    let report = match vmm::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("airlock-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    println!("{}", report.to_json());
    ExitCode::SUCCESS
}
