//! vCPUs: their boot state (CPUID, LAPIC, long-mode registers) and the
//! threads that run them, dispatching every exit through the buses.
//!
//! **Invariant:** [`run`] returns only after every vCPU thread has left
//! `KVM_RUN` and been joined, so guest memory may be unmapped afterwards.

use crate::devices::{Bus, THREAD_STACK};
use crate::seccomp::{self, Role};
use crate::{VmConfig, VmExit, VmmError, kvm_err, layout};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Set up every vCPU: CPUID (APIC id, TSC deadline, hypervisor bit), the
/// LAPIC's LINT pins, and for the boot vCPU long mode at `entry`.
pub(crate) fn configure(
    kvm: &Kvm,
    vcpus: &[VcpuFd],
    mem: &GuestMemoryMmap,
    entry: GuestAddress,
) -> Result<(), VmmError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get supported CPUID"))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    for (id, vcpu) in vcpus.iter().enumerate() {
        let id = id as u8;
        let mut c = cpuid.clone();
        for e in c.as_mut_slice() {
            if e.function == 1 {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24); // initial APIC id
                // KVM emulates the TSC-deadline timer but leaves the CPUID
                // bit to userspace. With it (and the TSC frequency from the
                // command line) the guest's LAPIC timer needs no calibration
                // against the PIT, a step that fails on a busy nested host
                // ("APIC timer disabled due to verification failure").
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                // Tell the guest it runs on a hypervisor. With KVM's own
                // leaves (0x4000_0000.., passed through from the supported
                // CPUID) it then uses kvm-clock, x2APIC through MSRs
                // instead of xAPIC MMIO (each access an emulated
                // instruction), PV EOI and no I/O port delays: about 10 %
                // off a boot in the nested harness. (This once looked like
                // it hung nested guests; that was the two-vCPU outer-VM
                // emulation bug, see xtask's OUTER_QEMU.)
                e.ecx |= 1 << 31;
            }
        }
        vcpu.set_cpuid2(&c).map_err(kvm_err("set CPUID"))?;
        set_lint(vcpu)?;
        if id == 0 {
            let mut sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
            layout::setup_long_mode(mem, &mut sregs).map_err(VmmError::BootData)?;
            vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
            vcpu.set_regs(&layout::boot_regs(entry.0))
                .map_err(kvm_err("set regs"))?;
            vcpu.set_fpu(&layout::boot_fpu())
                .map_err(kvm_err("set FPU"))?;
        }
    }
    Ok(())
}

/// LINT0 as ExtINT and LINT1 as NMI, as a PC's BIOS would leave them.
fn set_lint(vcpu: &VcpuFd) -> Result<(), VmmError> {
    const LINT0: usize = 0x350;
    const LINT1: usize = 0x360;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("get LAPIC"))?;
    for (off, mode) in [(LINT0, 7u32), (LINT1, 4u32)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as i8;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))
}

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The port-I/O and MMIO buses every vCPU thread dispatches to.
#[derive(Clone)]
pub(crate) struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// Run every vCPU on its own thread until one of them ends the VM, the
/// `timeout` passes (for a parked VM: counted from its word to go) or
/// `external_stop` is set; then stop and join them all.
///
/// # Errors
/// A vCPU thread cannot be started (the ones already started are stopped
/// and joined first).
/// `pause`, when set (by the boot marker at a snapshot's stage), ends the
/// run as [`VmExit::Paused`]. The vCPUs come back with the exit, each
/// having completed any I/O it was in the middle of, so their state can
/// be saved.
pub(crate) fn run(
    vcpus: Vec<VcpuFd>,
    buses: &Buses,
    cfg: &VmConfig,
    pause: Option<Arc<AtomicBool>>,
) -> Result<(VmExit, Vec<VcpuFd>), VmmError> {
    let (timeout, external_stop) = (cfg.timeout, cfg.stop.as_deref());
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            tracing::warn!(error = %e, "cannot install the vCPU kick handler");
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<VmExit>();
    let mut threads = Vec::new();
    let mut spawn_error = None;
    for (i, mut vcpu) in vcpus.into_iter().enumerate() {
        let stop = stop.clone();
        let pause = pause.clone();
        let tx = tx.clone();
        let buses = buses.clone();
        let filter = cfg.seccomp.as_ref().map(|f| f.vcpu.clone());
        let selftest = cfg.seccomp_selftest;
        let spawned = std::thread::Builder::new()
            .name(format!("airlock-vcpu{i}"))
            .stack_size(THREAD_STACK)
            .spawn(move || {
                if let Some(f) = filter {
                    seccomp::enter(Role::Vcpu, &f);
                    if selftest {
                        forbidden_syscall();
                    }
                }
                let exit = vcpu_loop(&mut vcpu, &buses, &stop, pause.as_deref());
                stop.store(true, Ordering::SeqCst);
                let _ = tx.send(exit);
                // Handed back, so the main thread closes it: a vCPU thread's
                // filter has no close(2).
                vcpu
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                spawn_error = Some(VmmError::Thread(e));
                break;
            }
        }
    }
    drop(tx);
    // Every thread of this VM exists now: the main thread takes its own
    // filter for the rest of the process's life — unless it is to save
    // the VM when it pauses (KVM's get ioctls, writing the snapshot), which
    // its filter does not allow.
    if let Some(f) = &cfg.seccomp
        && pause.is_none()
    {
        seccomp::enter(Role::Main, &f.main);
    }
    let exit = if spawn_error.is_some() {
        VmExit::Stopped
    } else {
        wait_for_exit(
            &rx,
            timeout,
            external_stop,
            pause.as_deref(),
            cfg.park.as_deref(),
        )
    };
    stop.store(true, Ordering::SeqCst);
    let mut back = Vec::with_capacity(threads.len());
    for t in threads {
        // Kick every vCPU until it leaves KVM_RUN and sees `stop`.
        while !t.is_finished() {
            use vmm_sys_util::signal::Killable;
            let _ = t.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(5));
        }
        // The vCPU fds close on this thread when the caller drops them.
        if let Ok(vcpu) = t.join() {
            back.push(vcpu);
        }
    }
    match spawn_error {
        Some(e) => Err(e),
        None => Ok((exit, back)),
    }
}

/// Wait for the first vCPU's exit, a stop, a pause or the deadline: at
/// `timeout` from now, or for a parked VM from its word to go (none before
/// it; cancelled instead, the VM stops). Before its word a parked VM is
/// held to its CPU allowance ([`crate::ParkCpu`]), measured here from now.
fn wait_for_exit(
    rx: &mpsc::Receiver<VmExit>,
    timeout: Duration,
    external_stop: Option<&AtomicBool>,
    pause: Option<&AtomicBool>,
    park: Option<&crate::Park>,
) -> VmExit {
    let poll = Duration::from_millis(50);
    let mut deadline = park.is_none().then(|| Instant::now() + timeout);
    // Where a parked VM's allowance counts from (only a parked one reads
    // the process's CPU time).
    let start = park.map(|_| (Instant::now(), crate::cpu_used()));
    loop {
        if deadline.is_none() {
            match park.and_then(crate::Park::word) {
                Some((true, at)) => deadline = Some(at + timeout),
                Some((false, _)) => return VmExit::Stopped,
                None => {}
            }
        }
        if deadline.is_none()
            && let (Some(park), Some((parked_at, cpu_at))) = (park, start)
        {
            let (parked, used) = (
                parked_at.elapsed(),
                crate::cpu_used().saturating_sub(cpu_at),
            );
            let allowed = park.cpu().allowed(parked);
            if used > allowed {
                return VmExit::Error(format!(
                    "the parked VM used {} ms of CPU in {} ms before its call, more than the {} ms it may \
                     (a grace of {} ms, then {}‰ of one CPU)",
                    used.as_millis(),
                    parked.as_millis(),
                    allowed.as_millis(),
                    park.cpu().grace.as_millis(),
                    park.cpu().per_mille
                ));
            }
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return VmExit::Timeout;
        }
        if external_stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return VmExit::Stopped;
        }
        if pause.is_some_and(|s| s.load(Ordering::SeqCst)) {
            return VmExit::Paused;
        }
        match rx.recv_timeout(left.map_or(poll, |l| l.min(poll))) {
            Ok(e) => return e,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return VmExit::Error("vCPU threads ended without a report".into());
            }
        }
    }
}

/// The seccomp test's debug hook: a syscall no vCPU filter allows (an
/// IPv4 socket). Under the filter it never returns.
fn forbidden_syscall() {
    // SAFETY: socket(2) with constant arguments; a descriptor it might
    // return (only without a filter) is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` is the descriptor socket(2) just returned.
        unsafe { libc::close(fd) };
    }
}

/// Let KVM finish the I/O instruction of the last exit (an OUT or MMIO
/// write completes, RIP moves past it) without entering the guest, so
/// state saved now never replays it.
fn finish_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

/// `pause` (set by the boot marker on the writing vCPU's own thread) stops
/// this vCPU right after the exit that set it, before the guest runs on.
fn vcpu_loop(
    vcpu: &mut VcpuFd,
    buses: &Buses,
    stop: &AtomicBool,
    pause: Option<&AtomicBool>,
) -> VmExit {
    loop {
        if pause.is_some_and(|p| p.load(Ordering::SeqCst)) {
            finish_pending_io(vcpu);
            return VmExit::Paused;
        }
        if stop.load(Ordering::SeqCst) {
            finish_pending_io(vcpu);
            return VmExit::Timeout;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                buses.pio.write(port.into(), data);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !buses.pio.read(port.into(), data) {
                    data.fill(0xff); // no device
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !buses.mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                // Writes outside every device window (including the guest
                // writing to its read-only pmem region) are dropped.
                buses.mmio.write(addr, data);
            }
            Ok(VcpuExit::Shutdown) => return VmExit::Reset,
            Ok(VcpuExit::Hlt) => return VmExit::Halted,
            Ok(VcpuExit::SystemEvent(..)) => return VmExit::Reset,
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VmExit::Error(format!("entry failed: reason {reason:#x} on cpu {cpu}"));
            }
            Ok(VcpuExit::InternalError) => return VmExit::Error("KVM internal error".into()),
            Ok(other) => tracing::debug!(exit = ?other, "unhandled vCPU exit"),
            Err(e) if e.errno() == 4 || e.errno() == 11 => {} // EINTR/EAGAIN: kicked
            Err(e) => return VmExit::Error(format!("KVM_RUN: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_vms_life_begins_at_its_word() {
        let (_tx, rx) = mpsc::channel::<VmExit>();
        let life = Duration::from_millis(20);
        // Not parked: its life runs from now.
        let t = Instant::now();
        assert!(matches!(
            wait_for_exit(&rx, life, None, None, None),
            VmExit::Timeout
        ));
        assert!(t.elapsed() < Duration::from_millis(200));
        // Parked: no deadline before the word, then the whole life.
        let park = Arc::new(crate::Park::default());
        let word = {
            let park = park.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                park.go();
            })
        };
        let t = Instant::now();
        assert!(matches!(
            wait_for_exit(&rx, life, None, None, Some(&park)),
            VmExit::Timeout
        ));
        word.join().unwrap();
        let (_, at) = park.word().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(at.elapsed() < t.elapsed());
        assert!(Instant::now() >= at + life);
        // Cancelled before any word: stopped, not timed out.
        let cancelled = crate::Park::default();
        cancelled.cancel();
        assert!(matches!(
            wait_for_exit(&rx, life, None, None, Some(&cancelled)),
            VmExit::Stopped
        ));
    }

    /// A thread of this process that burns CPU until told to stop (what a
    /// parked guest that spins costs its VMM process).
    fn spinner() -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let mut x = 0u64;
            while !s.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        });
        (stop, t)
    }

    #[test]
    fn a_parked_vm_that_spins_before_its_word_is_ended() {
        let (_tx, rx) = mpsc::channel::<VmExit>();
        let cpu = crate::ParkCpu {
            grace: Duration::from_millis(100),
            per_mille: 0,
        };
        let park = Arc::new(crate::Park::new(cpu));
        let (stop, t) = spinner();
        // Without the allowance it would wait for ever: a cancel after 5 s
        // makes that a failure here, not a hang.
        let (ended, ended_rx) = mpsc::channel::<()>();
        let give_up = {
            let park = park.clone();
            std::thread::spawn(move || {
                if ended_rx.recv_timeout(Duration::from_secs(5)).is_err() {
                    park.cancel();
                }
            })
        };
        let start = Instant::now();
        let exit = wait_for_exit(&rx, Duration::from_secs(1), None, None, Some(&park));
        let took = start.elapsed();
        let _ = ended.send(());
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        give_up.join().unwrap();
        let VmExit::Error(e) = exit else {
            panic!("a spinning parked VM was not ended: {exit:?}");
        };
        assert!(
            e.contains("the parked VM used") && e.contains("before its call"),
            "{e}"
        );
        // Ended once past its grace, not at some later deadline.
        assert!(took < Duration::from_secs(4), "{took:?}");
        // Given its word, the same VM's CPU is its call's: no such end.
        let park = crate::Park::new(cpu);
        park.go();
        let (stop, t) = spinner();
        let exit = wait_for_exit(&rx, Duration::from_millis(500), None, None, Some(&park));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        assert!(matches!(exit, VmExit::Timeout), "{exit:?}");
    }

    #[test]
    fn park_cpu_reads_its_flag_and_allows_grace_then_a_share() {
        let c = crate::ParkCpu::from_arg("10000,50").unwrap();
        assert_eq!(c, crate::ParkCpu::default());
        assert_eq!(crate::ParkCpu::from_arg(&c.to_arg()).unwrap(), c);
        assert_eq!(c.allowed(Duration::ZERO), Duration::from_secs(10));
        assert_eq!(c.allowed(Duration::from_secs(100)), Duration::from_secs(15));
        for bad in ["", "10", "a,5", "10,b", "10,1001", "-1,5"] {
            let e = crate::ParkCpu::from_arg(bad).unwrap_err();
            assert!(e.contains("--park-cpu"), "{bad:?}: {e}");
        }
    }
}
