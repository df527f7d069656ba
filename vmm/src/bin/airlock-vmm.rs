//! `airlock-vmm`: the VMM alone, as a small process — one per microVM when
//! the host runs calls in VMs (`airlock_vmm::process::VmProcess`), and what
//! `airlock vm bench-boot` measures against QEMU (process against process).
//! It links no Wasm engine, HTTP server or database.
//!
//! ```text
//! airlock-vmm --kernel vmlinux --initrd initramfs.cpio.gz [--cmdline "…"]
//!             [--memory-mib 256] [--vcpus 1] [--timeout-secs 60] [--pmem image]
//!             [--vsock-uds PATH --guest-cid N] [--console-cap BYTES]
//!             [--stop-on-stdin-eof]
//! ```
//! Prints one JSON object: exit, wall_ms, stages, peak_rss_kib,
//! guest_resident_kib, console. Exit status 0 when the VM ran (whatever its
//! exit), 2 on bad input or when the VM cannot start (stderr says why).
//! With `--stop-on-stdin-eof` the VM is stopped (exit `stopped`) when stdin
//! closes: the parent's way to stop it, and what happens if the parent dies.

use airlock_vmm::process::{USAGE, from_args};
use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn main() -> ExitCode {
    let (mut cfg, stop_on_eof) = match from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("airlock-vmm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if stop_on_eof {
        let stop = Arc::new(AtomicBool::new(false));
        cfg.stop = Some(stop.clone());
        let watcher = std::thread::Builder::new()
            .name("airlock-vmm-stdin".into())
            .stack_size(airlock_vmm::devices::THREAD_STACK)
            .spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock().by_ref(), &mut std::io::sink());
                stop.store(true, Ordering::SeqCst);
            });
        if let Err(e) = watcher {
            eprintln!("airlock-vmm: cannot watch stdin: {e}");
            return ExitCode::from(2);
        }
    }
    let report = match airlock_vmm::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("airlock-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    println!("{}", report.to_json());
    ExitCode::SUCCESS
}
