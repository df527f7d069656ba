//! Per-thread seccomp filters for the VMM process (`airlock-vmm`).
//!
//! The filters are data in the repository (`vmm/seccomp/x86_64.json`, the
//! `seccompiler` JSON format), compiled when the process starts: one for
//! the main thread (installed once the vCPUs run), one for vCPU threads
//! (`KVM_RUN` and little else), one for device threads (their epoll loop
//! and the host sockets vsock bridges to), one for the thread that
//! watches the parent's stop pipe, and one for the jail's keeper process
//! (`crate::jail`: it only waits, and is killed by anything else).
//!
//! **Invariants:**
//! * Each thread installs its own filter first thing, before it touches
//!   guest-controlled data; threads are only created before the filters of
//!   their creators are installed (device workers start with their device,
//!   before any vCPU runs), so no thread inherits another role's filter.
//! * A forbidden syscall traps: the `SIGSYS` handler writes one line naming
//!   the thread's role and the syscall number to stderr and ends the
//!   process with [`TRAPPED_EXIT`] — never a silent hang, never a
//!   half-running VMM. The parent's run report carries that line.
//! * A filter that cannot be installed ends the process too: the VMM never
//!   runs a guest unconfined when filters were asked for.

use std::cell::Cell;
use std::sync::Arc;

pub use seccompiler::BpfProgram;

/// The filters, as data.
const FILTERS_JSON: &str = include_str!("../seccomp/x86_64.json");

/// Exit status of a VMM stopped by a forbidden syscall (128 + SIGSYS).
pub const TRAPPED_EXIT: i32 = 159;

/// Errors loading the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter data does not compile.
    #[error("The seccomp filters do not compile: {0}.")]
    Compile(String),
    /// A filter the VMM needs is missing from the data.
    #[error("The seccomp filters have no {0:?} filter.")]
    Missing(&'static str),
}

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The VMM's main thread.
    Main = 1,
    /// A vCPU thread.
    Vcpu = 2,
    /// A device worker thread.
    Device = 3,
    /// The thread watching the parent's stop pipe.
    Watcher = 4,
    /// A virtio-fs worker thread (file syscalls beneath its shares).
    Fs = 5,
}

impl Role {
    fn name(code: u8) -> &'static [u8] {
        match code {
            1 => b"main",
            2 => b"vcpu",
            3 => b"device",
            4 => b"watcher",
            5 => b"fs",
            _ => b"unfiltered",
        }
    }
}

/// What a forbidden syscall does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Trap: the process ends with a message (the default).
    Enforce,
    /// Allow and log through the kernel audit log (for finding what a
    /// filter lacks; never for production).
    Log,
}

/// The compiled filters, one per role.
#[derive(Debug, Clone)]
pub struct Filters {
    /// The main thread's.
    pub main: Arc<BpfProgram>,
    /// The vCPU threads'.
    pub vcpu: Arc<BpfProgram>,
    /// The device threads'.
    pub device: Arc<BpfProgram>,
    /// The stop-pipe watcher's.
    pub watcher: Arc<BpfProgram>,
    /// The virtio-fs workers'.
    pub fs: Arc<BpfProgram>,
    /// The jail keeper's (a process of its own: it kills, not traps).
    pub keeper: Arc<BpfProgram>,
}

impl Filters {
    /// Compile the filters for this machine.
    ///
    /// # Errors
    /// [`SeccompError`] when the data does not compile or lacks a role.
    pub fn load(mode: Mode) -> Result<Self, SeccompError> {
        // The data as it is; in log mode, rewritten with every filter's
        // default action set to `log`.
        let logged;
        let text = match mode {
            Mode::Enforce => FILTERS_JSON,
            Mode::Log => {
                let mut json: serde_json::Value = serde_json::from_str(FILTERS_JSON)
                    .map_err(|e| SeccompError::Compile(e.to_string()))?;
                if let Some(map) = json.as_object_mut() {
                    for f in map.values_mut() {
                        f["default_action"] = "log".into();
                    }
                }
                logged = json.to_string();
                logged.as_str()
            }
        };
        let mut map =
            seccompiler::compile_from_json(text.as_bytes(), seccompiler::TargetArch::x86_64)
                .map_err(|e| SeccompError::Compile(e.to_string()))?;
        let mut take = |name: &'static str| {
            map.remove(name)
                .map(Arc::new)
                .ok_or(SeccompError::Missing(name))
        };
        Ok(Self {
            main: take("main")?,
            vcpu: take("vcpu")?,
            device: take("device")?,
            watcher: take("watcher")?,
            fs: take("fs")?,
            keeper: take("keeper")?,
        })
    }
}

thread_local! {
    static ROLE: Cell<u8> = const { Cell::new(0) };
}

/// Install `filter` on this thread for `role`. A filter that cannot be
/// installed ends the process (see the module invariants).
pub fn enter(role: Role, filter: &BpfProgram) {
    ROLE.with(|r| r.set(role as u8));
    if let Err(e) = seccompiler::apply_filter(filter) {
        eprintln!("airlock-vmm: the {role:?} thread's seccomp filter cannot be installed: {e}");
        std::process::exit(2);
    }
}

/// Install the `SIGSYS` handler that reports a forbidden syscall and ends
/// the process. Call once, before any filter.
///
/// # Errors
/// The handler cannot be installed.
pub fn install_trap_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value of the C struct; we
    // set the handler and flags below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act` is a valid sigaction whose handler only calls
    // async-signal-safe functions (write, _exit).
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Decimal digits of `n` into `buf`, returning the used tail.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    // For SIGSYS on 64-bit Linux its union holds `{ void *call_addr; int
    // syscall; unsigned arch; }` right after the three leading ints and
    // padding, i.e. the syscall number is the int at byte offset 24.
    let nr = unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) };
    let role = Role::name(ROLE.with(Cell::get));
    let mut digits = [0u8; 20];
    let nr = decimal(u64::try_from(nr).unwrap_or(0), &mut digits);
    let parts: [&[u8]; 5] = [
        b"airlock-vmm: seccomp: the ",
        role,
        b" thread made syscall ",
        nr,
        b", which its filter forbids; the VMM stops.\n",
    ];
    for p in parts {
        // SAFETY: write(2) on stderr with a valid buffer is
        // async-signal-safe; a failed write changes nothing.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
    // SAFETY: _exit is async-signal-safe and ends the whole process.
    unsafe { libc::_exit(TRAPPED_EXIT) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_data_compiles_for_every_role_in_both_modes() {
        for mode in [Mode::Enforce, Mode::Log] {
            let f = Filters::load(mode).unwrap();
            for p in [&f.main, &f.vcpu, &f.device, &f.watcher, &f.keeper] {
                assert!(!p.is_empty());
            }
        }
    }

    #[test]
    fn the_trap_message_prints_numbers_without_allocating() {
        let mut b = [0u8; 20];
        assert_eq!(decimal(0, &mut b), b"0");
        assert_eq!(decimal(41, &mut b), b"41");
        assert_eq!(decimal(u64::MAX, &mut b), b"18446744073709551615");
        assert_eq!(Role::name(Role::Vcpu as u8), b"vcpu");
    }
}
