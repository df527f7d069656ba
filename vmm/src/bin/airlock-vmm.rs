//! `airlock-vmm`: the VMM alone, as a small process — one per microVM when
//! the host runs calls in VMs (`airlock_vmm::process::VmProcess`), and what
//! `airlock vm bench-boot` measures against QEMU (process against process).
//! It links no Wasm engine, HTTP server or database.
//!
//! ```text
//! airlock-vmm --kernel vmlinux --initrd initramfs.cpio.gz [--cmdline "…"]
//!             [--memory-mib 256] [--vcpus 1] [--timeout-secs 60] [--pmem image]
//!             [--vsock-uds PATH --guest-cid N] [--console-cap BYTES]
//!             [--stop-on-stdin-eof [--park [--park-cpu GRACE_MS,PER_MILLE]]]
//! ```
//! Prints one JSON object: exit, wall_ms, stages, peak_rss_kib,
//! guest_resident_kib, console. Exit status 0 when the VM ran (whatever its
//! exit), 2 on bad input or when the VM cannot start (stderr says why).
//! With `--stop-on-stdin-eof` the VM is stopped (exit `stopped`) when stdin
//! closes: the parent's way to stop it, and what happens if the parent dies.
//! With `--park` as well, the VM runs at once (a restore: its guest waits
//! for the host in its agent) but `--timeout-secs` counts only from the
//! first byte on stdin, the word that a call has taken it (EOF first: it
//! ends `stopped`). Until the word the process may use `--park-cpu`'s CPU
//! (default 10000 ms, then 50‰ of one CPU; `airlock_vmm::ParkCpu`): past
//! it the VM ends with an error.
//! The process confines itself first (no core dumps, not dumpable, at most
//! `MAX_OPEN_FILES` descriptors). With `--jail-root/--jail-uid/--jail-gid`
//! (run as root) it then enters its jail (`airlock_vmm::jail`: cgroup,
//! namespaces, pivot_root, its own uid) before anything else, and its
//! report says so under `"jail"`. Every thread runs under its seccomp filter (`airlock_vmm::seccomp`)
//! unless `--seccomp off`; a forbidden syscall ends the process with
//! status 159 and a line on stderr naming the thread and the syscall.

use airlock_vmm::process::{USAGE, from_args};
use airlock_vmm::seccomp::{self, Filters, Role};
use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn main() -> ExitCode {
    let main_ns = airlock_vmm::monotonic_ns();
    let args = match from_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("airlock-vmm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let open_files = airlock_vmm::process::open_files_for(&args.cfg);
    if let Err(e) = airlock_vmm::process::confine_self(open_files) {
        eprintln!("airlock-vmm: cannot confine this process: {e}");
        return ExitCode::from(2);
    }
    let (mut cfg, stop_on_eof) = (args.cfg, args.stop_on_stdin_eof);
    let filters = match args.seccomp.map(Filters::load).transpose() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("airlock-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    let mut jail_report = None;
    if let Some(spec) = &args.jail {
        if let Err(e) = airlock_vmm::refuse_pvm() {
            eprintln!("airlock-vmm: {e}");
            return ExitCode::from(2);
        }
        let keeper = filters.as_ref().map(|f| f.keeper.as_ref());
        match airlock_vmm::jail::enter(spec, &mut cfg, keeper) {
            Ok(r) => jail_report = Some(r),
            Err(e) => {
                eprintln!("airlock-vmm: {e}");
                return ExitCode::from(2);
            }
        }
        // A new uid makes the process dumpable again.
        if let Err(e) = airlock_vmm::process::confine_self(open_files) {
            eprintln!("airlock-vmm: cannot confine the jailed process: {e}");
            return ExitCode::from(2);
        }
        if let Some(t) = cfg.jail_selftest {
            return match airlock_vmm::jail::run_selftest(t) {
                Some(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!(
                        "airlock-vmm: jail selftest {}: the jail did not hold",
                        t.name()
                    );
                    ExitCode::from(4)
                }
            };
        }
    }
    if let Some(f) = filters {
        if let Err(e) = seccomp::install_trap_handler() {
            eprintln!("airlock-vmm: cannot install the SIGSYS handler: {e}");
            return ExitCode::from(2);
        }
        cfg.seccomp = Some(f);
    }
    if let Some(cpu) = args.park {
        cfg.park = Some(Arc::new(airlock_vmm::Park::new(cpu)));
    }
    if stop_on_eof {
        let park = cfg.park.clone();
        let filter = cfg.seccomp.as_ref().map(|f| f.watcher.clone());
        let stop = Arc::new(AtomicBool::new(false));
        cfg.stop = Some(stop.clone());
        let watcher = std::thread::Builder::new()
            .name("airlock-vmm-stdin".into())
            .stack_size(airlock_vmm::devices::THREAD_STACK)
            .spawn(move || {
                // Started before the shares' threads: it must not keep
                // what the jail kept for them.
                if let Err(e) = airlock_vmm::jail::end_file_server_setup() {
                    eprintln!("airlock-vmm: {e}");
                    std::process::exit(2);
                }
                if let Some(f) = filter {
                    seccomp::enter(Role::Watcher, &f);
                }
                let mut stdin = std::io::stdin().lock();
                if let Some(park) = &park {
                    // A parked VM's first byte is the word that begins its
                    // life; EOF before it stops it.
                    let mut word = [0u8; 1];
                    match stdin.read(&mut word) {
                        Ok(1) => park.go(),
                        _ => park.cancel(),
                    }
                }
                let _ = std::io::copy(&mut stdin, &mut std::io::sink());
                stop.store(true, Ordering::SeqCst);
                if let Some(park) = &park {
                    park.cancel();
                }
            });
        if let Err(e) = watcher {
            eprintln!("airlock-vmm: cannot watch stdin: {e}");
            return ExitCode::from(2);
        }
    }
    let run_ns = airlock_vmm::monotonic_ns();
    let report = match airlock_vmm::run(&cfg) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("airlock-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    let mut json = report.to_json();
    // When this process began and when it started the VM (`run`), on the
    // clock the daemon shares (the start benchmark's exec and pre-run times).
    json["clock_ns"] = serde_json::json!({"main": main_ns, "run": run_ns});
    if let Some(j) = jail_report {
        json["jail"] = j;
    }
    println!("{json}");
    ExitCode::SUCCESS
}
