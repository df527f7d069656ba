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
//! The process confines itself first (no core dumps, not dumpable, at most
//! `MAX_OPEN_FILES` descriptors). Every thread runs under its seccomp filter (`airlock_vmm::seccomp`)
//! unless `--seccomp off`; a forbidden syscall ends the process with
//! status 159 and a line on stderr naming the thread and the syscall.

use airlock_vmm::process::{USAGE, from_args};
use airlock_vmm::seccomp::{self, Filters, Role};
use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn main() -> ExitCode {
    let args = match from_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("airlock-vmm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = airlock_vmm::process::confine_self() {
        eprintln!("airlock-vmm: cannot confine this process: {e}");
        return ExitCode::from(2);
    }
    let (mut cfg, stop_on_eof) = (args.cfg, args.stop_on_stdin_eof);
    if let Some(mode) = args.seccomp {
        let loaded = Filters::load(mode).and_then(|f| {
            seccomp::install_trap_handler()
                .map_err(|e| seccomp::SeccompError::Compile(format!("SIGSYS handler: {e}")))?;
            Ok(f)
        });
        match loaded {
            Ok(f) => cfg.seccomp = Some(f),
            Err(e) => {
                eprintln!("airlock-vmm: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if stop_on_eof {
        let filter = cfg.seccomp.as_ref().map(|f| f.watcher.clone());
        let stop = Arc::new(AtomicBool::new(false));
        cfg.stop = Some(stop.clone());
        let watcher = std::thread::Builder::new()
            .name("airlock-vmm-stdin".into())
            .stack_size(airlock_vmm::devices::THREAD_STACK)
            .spawn(move || {
                if let Some(f) = filter {
                    seccomp::enter(Role::Watcher, &f);
                }
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
