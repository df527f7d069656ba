//! `airlock-init`: PID 1 of the Airlock microVM.
//!
//! Mounts proc/sys/dev/tmp, makes sure the RNG is ready, mounts virtio-fs
//! tags and the weights device named on the kernel command line, then serves
//! the host↔guest protocol on a vsock port and runs each call with the
//! wasmtime runner. It never leaves the VM hanging: on shutdown, on the end
//! of the host connection and on any fatal error it says why on the serial
//! console and reboots (the VMM, run with `reboot=t`, treats that as exit).
//!
//! Kernel command line (all optional):
//! * `airlock.port=N` — vsock port to listen on (default 1024).
//! * `airlock.fs=tag:/path[:ro][,tag:/path[:ro]]` — virtio-fs mounts,
//!   always `nosuid,nodev,noexec`, read-only with `:ro`.
//! * `airlock.weights=/dev/pmem0:/weights` — read-only erofs with DAX.
//! * `airlock.selftest=1` — run the built-in self-test (example components
//!   under /selftest), print `AIRLOCK-SELFTEST ...` lines, reboot.
//! * `airlock.selftest=panic` — end PID 1 on purpose (guest kernel panic).
//! * `airlock.selftest=share` — list and read what `/share` holds, try to
//!   change it, print `AIRLOCK-SHARE ...` lines, power off.

/// musl's allocator gives freed memory back to the kernel at once, so a
/// guest reading a file (wasmtime allocates a 64 KiB buffer per read)
/// faulted fresh pages in for every read — each fault a trip through the
/// hypervisor when guest memory is not yet backed. mimalloc keeps and
/// reuses what was freed.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(target_os = "linux")]
fn main() {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("airlock-init runs only as PID 1 of a Linux guest");
    std::process::exit(2);
}

#[cfg(target_os = "linux")]
mod linux {
    use airlock_guest::agent::{self, SessionEnd};
    use airlock_guest::proto::BootStage;
    use airlock_guest::{CallResult, EngineConfig, GrantSet, Runner};
    use nix::mount::{MsFlags, mount};
    use nix::sys::reboot::{RebootMode, reboot};
    use nix::time::{ClockId, clock_gettime};
    use std::collections::BTreeMap;
    use std::io::Write;

    const DEFAULT_PORT: u32 = 1024;

    fn boot_us() -> u64 {
        clock_gettime(ClockId::CLOCK_BOOTTIME)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0)
    }

    /// Reach a boot stage: record it for the Hello and write its marker to
    /// the VMM's boot-stage port, which time-stamps it on the host's clock.
    /// Without port access (a kernel built without ioperm, or a VMM without
    /// the port: the write is then ignored) the marker is skipped.
    fn stage(boot: &mut Vec<BootStage>, name: &str) {
        use airlock_guest::proto::{BOOT_MARKER_PORT, boot_stage_code};
        use std::sync::OnceLock;
        static PORT: OnceLock<bool> = OnceLock::new();
        boot.push(BootStage {
            stage: name.into(),
            at_us: boot_us(),
        });
        let usable = *PORT.get_or_init(|| {
            // SAFETY: ioperm only changes this process's I/O permission
            // bitmap for one port; it touches no memory of ours.
            let rc = unsafe { nix::libc::ioperm(nix::libc::c_ulong::from(BOOT_MARKER_PORT), 1, 1) };
            if rc != 0 {
                console(&format!(
                    "airlock-init: no boot-stage marker ({})",
                    std::io::Error::last_os_error()
                ));
            }
            rc == 0
        });
        if let (true, Some(code)) = (usable, boot_stage_code(name)) {
            // SAFETY: ioperm above granted this process the marker port; an
            // `out` to it is a VM exit the VMM handles, with no effect on
            // guest memory, the stack or flags.
            unsafe {
                std::arch::asm!("out dx, al", in("dx") BOOT_MARKER_PORT, in("al") code,
                    options(nomem, nostack, preserves_flags));
            }
        }
    }

    /// Print to the serial console (stdout is /dev/console for PID 1).
    fn console(line: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Say why on the console, then reboot (never returns).
    fn power_off(reason: &str) -> ! {
        console(&format!("airlock-init: {reason}; powering off"));
        nix::unistd::sync();
        let _ = reboot(RebootMode::RB_AUTOBOOT);
        // reboot(2) returned: nothing else can be done; never spin.
        std::process::exit(1);
    }

    fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
        power_off(&format!("fatal: {what}: {e}"))
    }

    fn mount_fs(
        src: &str,
        target: &str,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), String> {
        std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
        mount(Some(src), target, Some(fstype), flags, data)
            .map_err(|e| format!("mount {fstype} {src} on {target}: {e}"))
    }

    /// Readahead for a virtio-fs share: one FUSE read of up to 1 MiB (the
    /// VMM's request queue holds 256 descriptors, so the guest may send
    /// 252 pages at once) instead of the kernel's 128 KiB default, so a
    /// large sequential read costs a quarter of the guest→VMM round trips.
    const SHARE_READAHEAD_KB: u32 = 1024;

    /// Set the readahead of the filesystem mounted at `path` (its backing
    /// device info, named by its device number, in sysfs).
    fn readahead(path: &str, kb: u32) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        // The stat of the share's root is a FUSE request, so it waits for
        // the session's FUSE_INIT answer — which must come first: the
        // kernel takes the smaller of the bdi's readahead and the
        // server's `max_readahead` when that answer arrives, so a knob
        // written before it would be undone. (Tried on 2026-12-03: the
        // device number from /proc/self/mountinfo, no wait; reverted.)
        let dev = std::fs::metadata(path)
            .map_err(|e| format!("stat {path}: {e}"))?
            .dev();
        let knob = format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev)
        );
        std::fs::write(&knob, kb.to_string()).map_err(|e| format!("write {knob}: {e}"))
    }

    /// Mount the virtio-fs device `tag` at `path` (`nodev,nosuid,noexec`,
    /// plus `ro`): at boot (the command line's `airlock.fs`) or when a
    /// restored VM's host says so (its refresh). A read-only share is
    /// mounted with DAX: its files are read straight from the host's page
    /// cache through the device's window (the VMM maps them read-only;
    /// writable mappings it refuses), so the guest's readahead never
    /// applies to them and is left alone — setting it would wait for the
    /// session's FUSE_INIT answer and cost a GETATTR at every boot. A
    /// read-write share goes through the guest's page cache and FUSE
    /// reads and writes, and gets the large readahead.
    fn mount_share(tag: &str, path: &str, read_only: bool) -> Result<(), String> {
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        mount_fs(
            tag,
            path,
            "virtiofs",
            flags,
            read_only.then_some("dax=always"),
        )?;
        if !read_only && let Err(e) = readahead(path, SHARE_READAHEAD_KB) {
            tracing::warn!(share = tag, error = %e, "virtio-fs readahead left at the default");
        }
        Ok(())
    }

    fn cmdline() -> BTreeMap<String, String> {
        let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        text.split_whitespace()
            .filter_map(|w| w.strip_prefix("airlock."))
            .map(|w| match w.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (w.to_string(), "1".to_string()),
            })
            .collect()
    }

    /// Block until the kernel's RNG is initialized (getrandom without
    /// GRND_NONBLOCK), reporting if it was not ready at once.
    fn ensure_rng() {
        let mut buf = [0u8; 16];
        // SAFETY: buf is a valid writable buffer of buf.len() bytes for the
        // duration of the call; flags are valid getrandom flags.
        let ready = unsafe {
            nix::libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), nix::libc::GRND_NONBLOCK)
        };
        if ready < 0 {
            console("airlock-init: RNG not ready yet; waiting");
            // SAFETY: as above, with blocking flags (0).
            let r = unsafe { nix::libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
            if r < 0 {
                fatal("getrandom", std::io::Error::last_os_error());
            }
        }
    }

    pub fn main() {
        if std::process::id() != 1 {
            eprintln!("airlock-init must run as PID 1 inside the Airlock guest");
            std::process::exit(2);
        }
        let mut boot = Vec::new();
        stage(&mut boot, "init");
        let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        for (src, target, fstype, flags) in [
            ("proc", "/proc", "proc", nodev),
            ("sysfs", "/sys", "sysfs", nodev),
            (
                "devtmpfs",
                "/dev",
                "devtmpfs",
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            ),
            ("tmpfs", "/tmp", "tmpfs", nodev),
        ] {
            if let Err(e) = mount_fs(src, target, fstype, flags, None) {
                fatal("mounting the base filesystems", e);
            }
        }
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(std::io::stderr)
            .without_time()
            .init();
        ensure_rng();
        let params = cmdline();
        if let Some(spec) = params.get("fs") {
            for m in spec.split(',').filter(|s| !s.is_empty()) {
                let Some((tag, rest)) = m.split_once(':') else {
                    fatal("airlock.fs", format!("{m:?} is not tag:/path[:ro]"))
                };
                let (path, read_only) = match rest.strip_suffix(":ro") {
                    Some(p) => (p, true),
                    None => (rest, false),
                };
                if let Err(e) = mount_share(tag, path, read_only) {
                    fatal("virtio-fs", e);
                }
            }
        }
        if let Some(spec) = params.get("weights") {
            let Some((dev, path)) = spec.split_once(':') else {
                fatal(
                    "airlock.weights",
                    format!("{spec:?} is not /dev/pmemN:/path"),
                )
            };
            if let Err(e) = mount_fs(dev, path, "erofs", MsFlags::MS_RDONLY, Some("dax")) {
                fatal("weights", e);
            }
        }
        stage(&mut boot, "mounts");

        match params.get("selftest").map(String::as_str) {
            Some("panic") => {
                console("airlock-init: self-test: ending PID 1 on purpose");
                std::process::exit(3); // the kernel panics: "Attempted to kill init"
            }
            Some("weights") => weights_check(),
            Some("share") => share_check(),
            Some(_) => selftest(&boot),
            None => {}
        }

        // Allowed outgoing HTTP goes to the host's egress proxy over vsock.
        let runner = Runner::new(EngineConfig {
            pool_instances: 8,
            ..EngineConfig::default()
        })
        .unwrap_or_else(|e| fatal("starting the runner", e))
        .with_egress(std::sync::Arc::new(
            airlock_guest::egress::VsockEgress::default(),
        ));
        stage(&mut boot, "runner");
        let port = params
            .get("port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_PORT);
        // Open before a snapshot is taken: a restored guest's refresh
        // finds it open.
        let random = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/urandom")
            .unwrap_or_else(|e| fatal("/dev/urandom", e));
        let listener = vsock_listen(port).unwrap_or_else(|e| fatal("vsock listen", e));
        console(&format!("airlock-init: ready on vsock port {port}"));
        // Snapshots are taken here: a restored VM resumes in accept.
        stage(&mut boot, "listening");
        let mut conn = vsock_accept(&listener).unwrap_or_else(|e| fatal("vsock accept", e));
        stage(&mut boot, "ready");
        let refresh = |fresh: &agent::Fresh<'_>| refresh(&random, fresh);
        match agent::serve_with(&mut conn, &runner, boot, &refresh) {
            Ok(SessionEnd::Shutdown) => power_off("shutdown requested by the host"),
            Ok(SessionEnd::Closed) => power_off("the host closed the control connection"),
            Err(e) => fatal("control connection", e),
        }
    }

    /// The host's [`Message::Refresh`](airlock_guest::proto::Message):
    /// through `random` (`/dev/urandom`, opened for writing) credit `seed`
    /// to the kernel's entropy pool (RNDADDENTROPY), force the CRNG to
    /// reseed from it (RNDRESEEDCRNG) — so VMs restored from
    /// one snapshot draw different random numbers from then on — and set
    /// the wall clock, which a restored guest would otherwise take from
    /// the time of its snapshot; then mount the shares a restored VM with
    /// shares is given (its snapshot was made before any mount).
    fn refresh(random: &std::fs::File, fresh: &agent::Fresh<'_>) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let (seed, unix_ns) = (fresh.seed, fresh.unix_ns);
        // _IOW('R', 0x03, int[2]) and _IO('R', 0x07); the request's type
        // differs between libcs (musl: int, glibc: unsigned long).
        const RNDADDENTROPY: nix::libc::Ioctl = 0x4008_5203 as nix::libc::Ioctl;
        const RNDRESEEDCRNG: nix::libc::Ioctl = 0x5207 as nix::libc::Ioctl;
        // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
        let mut info = Vec::with_capacity(8 + seed.len());
        info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
        info.extend_from_slice(seed);
        // SAFETY: `info` is a rand_pool_info header followed by `buf_size`
        // bytes, alive for the call; the kernel only reads it.
        if unsafe { nix::libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
            return Err(format!(
                "adding entropy: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: an argument-less ioctl on the descriptor we hold.
        if unsafe { nix::libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
            return Err(format!(
                "reseeding the RNG: {}",
                std::io::Error::last_os_error()
            ));
        }
        let t = nix::sys::time::TimeSpec::from_duration(std::time::Duration::from_nanos(unix_ns));
        nix::time::clock_settime(ClockId::CLOCK_REALTIME, t)
            .map_err(|e| format!("setting the clock: {e}"))?;
        // The agent checked them (tags, plain absolute paths, no twins).
        for m in fresh.mounts {
            mount_share(&m.tag, &m.path, m.read_only)?;
        }
        Ok(())
    }

    fn vsock_listen(port: u32) -> nix::Result<std::os::fd::OwnedFd> {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, VsockAddr, bind, listen, socket,
        };
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &VsockAddr::new(nix::libc::VMADDR_CID_ANY, port),
        )?;
        listen(&fd, Backlog::new(1)?)?;
        Ok(fd)
    }

    fn vsock_accept(listener: &std::os::fd::OwnedFd) -> nix::Result<std::fs::File> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let raw = nix::sys::socket::accept(listener.as_raw_fd())?;
        // SAFETY: accept(2) returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(std::fs::File::from(fd))
    }

    /// `Cached:` of /proc/meminfo, KiB (the guest's page cache).
    fn cached_kib() -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("Cached:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Weights self-test: read every file under /weights, print its size and
    /// sha256, and how much the guest's page cache grew meanwhile (with DAX
    /// the reads come straight from the host's pages, so it should not).
    fn weights_check() -> ! {
        use sha2::{Digest, Sha256};
        let mount = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains(" /weights "))
            .unwrap_or("(not mounted)")
            .to_string();
        console(&format!("AIRLOCK-WEIGHTS-MOUNT {mount}"));
        let before = cached_kib();
        let mut total = 0u64;
        let mut entries: Vec<_> = std::fs::read_dir("/weights")
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        for path in entries.iter().filter(|p| p.is_file()) {
            let mut f = std::fs::File::open(path).unwrap_or_else(|e| fatal("weights", e));
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0u64;
            loop {
                match std::io::Read::read(&mut f, &mut buf) {
                    Ok(0) => break,
                    Ok(k) => {
                        h.update(&buf[..k]);
                        n += k as u64;
                    }
                    Err(e) => fatal("reading weights", e),
                }
            }
            total += n;
            console(&format!(
                "AIRLOCK-WEIGHTS {} {n} {}",
                path.display(),
                hex::encode(h.finalize())
            ));
        }
        let growth = cached_kib().saturating_sub(before);
        console(&format!(
            "AIRLOCK-WEIGHTS-DONE bytes={total} cached_growth_kib={growth}"
        ));
        power_off("weights self-test finished")
    }

    /// Share self-test: the mount line of `/share`, every entry (name,
    /// kind, size), the content of `hello.txt`, then what writing,
    /// creating, removing and making a directory give — for the host to
    /// compare with what the share allows.
    fn share_check() -> ! {
        let mount = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains(" /share "))
            .unwrap_or("(not mounted)")
            .to_string();
        console(&format!("AIRLOCK-SHARE-MOUNT {mount}"));
        let mut entries: Vec<_> = std::fs::read_dir("/share")
            .map(|d| d.filter_map(Result::ok).collect())
            .unwrap_or_default();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in &entries {
            let kind = match std::fs::symlink_metadata(e.path()) {
                Ok(m) if m.is_dir() => "dir".to_string(),
                Ok(m) if m.is_file() => format!("file {}", m.len()),
                Ok(m) if m.file_type().is_symlink() => "symlink".to_string(),
                Ok(_) => "other".to_string(),
                Err(err) => format!("error {err}"),
            };
            console(&format!(
                "AIRLOCK-SHARE-ENTRY {} {kind}",
                e.file_name().to_string_lossy()
            ));
        }
        let said = |what: &str, r: std::io::Result<()>| {
            let v = match r {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("{:?}", e.kind()),
            };
            console(&format!("AIRLOCK-SHARE-TRY {what} {v}"));
        };
        said(
            "read",
            std::fs::read_to_string("/share/hello.txt").map(|t| {
                console(&format!("AIRLOCK-SHARE-HELLO {}", t.trim()));
            }),
        );
        said(
            "read-through-symlink",
            std::fs::read("/share/out").map(|_| ()),
        );
        said(
            "write",
            std::fs::OpenOptions::new()
                .append(true)
                .open("/share/hello.txt")
                .and_then(|mut f| f.write_all(b"changed\n")),
        );
        said(
            "create",
            std::fs::write("/share/made-in-guest.txt", "from the guest\n"),
        );
        said("mkdir", std::fs::create_dir("/share/guest-dir"));
        said("remove", std::fs::remove_file("/share/hello.txt"));
        power_off("share self-test finished")
    }

    /// Self-test: load and call the example components shipped under
    /// /selftest (compiled on the build host, like every component a VM
    /// runs: this init has no compiler), print the outcomes, reboot.
    fn selftest(boot: &[BootStage]) -> ! {
        let stages: Vec<String> = boot
            .iter()
            .map(|s| format!("{}={}us", s.stage, s.at_us))
            .collect();
        console(&format!(
            "AIRLOCK-SELFTEST-START boot: {}",
            stages.join(" ")
        ));
        let runner = Runner::new(EngineConfig {
            pool_instances: 4,
            ..EngineConfig::default()
        })
        .unwrap_or_else(|e| fatal("starting the runner", e));
        let cases: [(&str, &str, serde_json::Value); 3] = [
            ("kitchen", "greet", serde_json::json!({"name": "microVM"})),
            (
                "kitchen",
                "recipes_summarize",
                serde_json::json!({"values": [1, 2, 3, 4]}),
            ),
            ("escape", "spin", serde_json::json!({})),
        ];
        let mut all_ok = true;
        for (component, tool, args) in cases {
            let path = format!("/selftest/{component}.cwasm");
            let bytes = std::fs::read(&path).unwrap_or_else(|e| fatal(&path, e));
            let loaded = runner
                .load_precompiled(&bytes, &Default::default())
                .unwrap_or_else(|e| fatal(&path, e));
            let mut grants = GrantSet::default();
            grants.limits.fuel = 20_000_000;
            let out = runner.invoke(&loaded, tool, &args, &grants);
            let expected_error = tool == "spin";
            all_ok &= matches!(out.result, CallResult::Ok(_)) != expected_error;
            let json = serde_json::to_string(&serde_json::json!({
                "component": component, "tool": tool, "result": out.result, "audit": out.audit,
            }))
            .unwrap_or_default();
            console(&format!("AIRLOCK-SELFTEST {json}"));
        }
        console(&format!(
            "AIRLOCK-SELFTEST-DONE {}",
            if all_ok { "ok" } else { "failed" }
        ));
        power_off("self-test finished")
    }
}
