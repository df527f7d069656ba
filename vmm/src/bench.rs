//! Boot benchmark: our VMM against QEMU `-M microvm` booting the same ELF
//! `vmlinux` (PVH entry) and initramfs with the same command line, in the
//! same run, alternating, each in its own process.
//!
//! What is timed is process start → process exit, with a guest whose init
//! ends at once (`airlock.selftest=panic`: PID 1 exits, `panic=-1` resets,
//! `reboot=t` triple-faults, both VMMs exit). The peak RSS of each process
//! comes from `wait4`; ours also reports how much of that is guest memory
//! the guest touched, so the VMM's own footprint is the difference.
//!
//! **Invariants:** both sides get identical kernel, initramfs, memory size,
//! vCPU count and kernel command line; one warm-up boot of each is not
//! recorded; rounds alternate (ours first in odd rounds, QEMU first in even
//! ones) so drift in the host affects both.

use super::BASE_CMDLINE;

/// Errors of the boot benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A VMM process could not be started or waited for.
    #[error("bench: {what}: {source}")]
    Process {
        /// The command.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A VMM process ran past its limit and was killed.
    #[error("bench: {what} did not finish within {limit:?}")]
    Timeout {
        /// The command.
        what: String,
        /// The limit.
        limit: Duration,
    },
    /// A VMM's guest did not end the way the benchmark's guest must.
    #[error("bench: {0}")]
    Guest(String),
}
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What to compare.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Our VMM binary (`airlock-vmm`; `airlock vm boot` takes the same flags).
    pub vmm: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// ELF vmlinux with a PVH note.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Extra command line for both (after [`BASE_CMDLINE`]).
    pub cmdline_extra: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Rounds (each boots both once).
    pub rounds: u32,
    /// Compare with this `airlock-vmm` build instead of QEMU (an A/B of
    /// two VMM builds in one run).
    pub reference_vmm: Option<PathBuf>,
    /// Run our `airlock-vmm` boots in their jail, as the daemon does (the
    /// jail's setup, the parent's side too, counts in the wall time). A
    /// reference build runs unjailed: with `--reference-vmm` naming our own
    /// binary, the ratio is the jail's cost.
    pub jail: Option<crate::jail::JailConfig>,
}

/// One measured boot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Process start to exit, milliseconds.
    pub wall_ms: f64,
    /// Peak RSS of the process, KiB (`ru_maxrss`).
    pub peak_rss_kib: u64,
    /// Guest pages resident at the end, KiB (ours only).
    pub guest_resident_kib: Option<u64>,
}

/// The result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Our VMM, one sample per round.
    pub ours: Vec<Sample>,
    /// The reference (QEMU microvm, or another VMM build), one sample per
    /// round.
    pub qemu: Vec<Sample>,
    /// What the reference was.
    pub reference: String,
    /// Median wall of ours / median wall of the reference.
    pub ratio: f64,
    /// Median of (our peak RSS − guest resident), KiB.
    pub vmm_overhead_kib: u64,
    /// The kernel command line both used.
    pub cmdline: String,
    /// Whether our boots ran jailed.
    pub jailed: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Run `cmd` to its end; return its stdout, wall time and peak RSS.
/// Run `cmd` to its end; return its stdout, the end of its stderr, wall
/// time and peak RSS.
fn measure(
    mut cmd: Command,
    limit: Duration,
) -> Result<(String, String, Duration, u64), BenchError> {
    let what = format!("{cmd:?}");
    let io = |source| BenchError::Process {
        what: what.clone(),
        source,
    };
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io)?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        let cut = s.len().saturating_sub(4096);
        s[s.ceil_char_boundary(cut)..].to_string()
    });
    let pid = child.id() as libc::pid_t;
    // Block until the child exits; polling would take CPU from the VMM
    // being measured (the harness has one CPU). A watchdog kills it at the
    // limit. The child is waited for with WNOWAIT first, so it stays a
    // zombie — its pid cannot be reused — until the watchdog has stopped.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            // SAFETY: `pid` is our child and not yet reaped (see above), so
            // the signal can only reach it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let waited = loop {
        // SAFETY: an all-zero siginfo_t is a valid value of the C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our own unreaped child; `info` is valid for
        // writes. WNOWAIT leaves it waitable for wait4 below.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break Ok(start.elapsed());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            break Err(e);
        }
    };
    let _ = done_tx.send(());
    let killed = watchdog.join().unwrap_or(false);
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, exited and not yet reaped; `status`
    // and `ru` are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = waited.map_err(io)?;
    if rc != pid {
        return Err(io(std::io::Error::last_os_error()));
    }
    let stdout = reader.join().unwrap_or_default();
    let mut stderr = err_reader.join().unwrap_or_default();
    // How it ended, for errors that only have its output to go on.
    if libc::WIFSIGNALED(status) {
        stderr.push_str(&format!("(killed by signal {})", libc::WTERMSIG(status)));
    } else if libc::WEXITSTATUS(status) != 0 {
        stderr.push_str(&format!("(exit status {})", libc::WEXITSTATUS(status)));
    }
    if killed {
        return Err(BenchError::Timeout { what, limit });
    }
    Ok((stdout, stderr, wall, ru.ru_maxrss as u64))
}

fn ours(cfg: &BenchConfig) -> Result<Sample, BenchError> {
    vmm_at(&cfg.vmm, cfg, cfg.jail.as_ref())
}

/// One boot of the `airlock-vmm` at `vmm` (in a jail when given).
fn vmm_at(
    vmm: &std::path::Path,
    cfg: &BenchConfig,
    jail: Option<&crate::jail::JailConfig>,
) -> Result<Sample, BenchError> {
    let prepare_start = Instant::now();
    let jail = match jail {
        None => None,
        Some(j) => {
            let dir = JailDir::new()?;
            let vm = crate::VmConfig {
                memory_mib: cfg.memory_mib,
                ..crate::VmConfig::new(cfg.kernel.clone(), cfg.initrd.clone())
            };
            let jail = crate::jail::VmJail::prepare(j, &dir.0, &vm)
                .map_err(|e| BenchError::Guest(e.to_string()))?;
            // The jail is released before its directory.
            Some((jail, dir))
        }
    };
    let prepared = prepare_start.elapsed();
    let mut cmd = Command::new(vmm);
    if let Some((j, _)) = &jail {
        cmd.args(j.spec().to_args());
    }
    cmd.arg("--kernel")
        .arg(&cfg.kernel)
        .arg("--initrd")
        .arg(&cfg.initrd)
        .args(["--cmdline", &cfg.cmdline_extra])
        .args(["--memory-mib", &cfg.memory_mib.to_string()])
        .args(["--timeout-secs", "300"]);
    let (out, err, wall, rss) = measure(cmd, Duration::from_secs(330))?;
    let wall = wall + prepared;
    drop(jail);
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
        BenchError::Guest(format!(
            "`airlock-vmm` printed no JSON ({e}): {out}; its stderr: {err}"
        ))
    })?;
    if v["exit"] != "reset" {
        return Err(BenchError::Guest(format!(
            "our guest did not end with a reset: {v}"
        )));
    }
    Ok(Sample {
        wall_ms: wall.as_secs_f64() * 1e3,
        peak_rss_kib: rss,
        guest_resident_kib: v["guest_resident_kib"].as_u64(),
    })
}

/// A fresh directory for one jailed boot, removed on drop.
struct JailDir(PathBuf);

impl JailDir {
    fn new() -> Result<Self, BenchError> {
        crate::jail::fresh_dir("airlock-bench")
            .map(Self)
            .map_err(|source| BenchError::Process {
                what: "making a directory for a jailed boot".into(),
                source,
            })
    }
}

impl Drop for JailDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn qemu(cfg: &BenchConfig, cmdline: &str) -> Result<Sample, BenchError> {
    let mut cmd = Command::new(&cfg.qemu);
    cmd.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host"])
        .args(["-m", &format!("{}M", cfg.memory_mib), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&cfg.initrd)
        .args(["-append", cmdline]);
    let (out, _err, wall, rss) = measure(cmd, Duration::from_secs(330))?;
    if !out.contains("Kernel panic") {
        return Err(BenchError::Guest(format!(
            "the QEMU guest did not reach its init's end; console:\n{out}"
        )));
    }
    Ok(Sample {
        wall_ms: wall.as_secs_f64() * 1e3,
        peak_rss_kib: rss,
        guest_resident_kib: None,
    })
}

/// Run the benchmark.
///
/// # Errors
/// A boot failed, timed out, or did not end the way the guest is built to.
pub fn boot_bench(cfg: &BenchConfig) -> Result<BenchReport, BenchError> {
    let cmdline = format!("{BASE_CMDLINE} {}", cfg.cmdline_extra);
    // One unrecorded boot of each first: the first run of a binary pays for
    // reading it and the images into the page cache, whichever side it is.
    let reference = || match &cfg.reference_vmm {
        Some(r) => vmm_at(r, cfg, None),
        None => qemu(cfg, &cmdline),
    };
    ours(cfg)?;
    reference()?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..cfg.rounds {
        if round % 2 == 0 {
            a.push(ours(cfg)?);
            b.push(reference()?);
        } else {
            b.push(reference()?);
            a.push(ours(cfg)?);
        }
        tracing::info!(
            round,
            ours_ms = a[a.len() - 1].wall_ms,
            qemu_ms = b[b.len() - 1].wall_ms,
            "bench round"
        );
    }
    let ratio = median(a.iter().map(|s| s.wall_ms).collect())
        / median(b.iter().map(|s| s.wall_ms).collect());
    let overhead = median(
        a.iter()
            .map(|s| {
                s.peak_rss_kib
                    .saturating_sub(s.guest_resident_kib.unwrap_or(0)) as f64
            })
            .collect(),
    ) as u64;
    Ok(BenchReport {
        ours: a,
        qemu: b,
        reference: cfg.reference_vmm.as_ref().map_or_else(
            || "qemu microvm".to_string(),
            |r| format!("airlock-vmm {}", r.display()),
        ),
        ratio,
        jailed: cfg.jail.is_some(),
        vmm_overhead_kib: overhead,
        cmdline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn measure_reports_wall_and_peak_rss_of_a_child() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hi"]);
        let (out, _err, wall, rss) = measure(cmd, Duration::from_secs(10)).unwrap();
        assert_eq!(out, "hi\n");
        assert!(wall > Duration::ZERO);
        assert!(rss > 0);
    }

    #[test]
    fn measure_kills_a_child_at_the_limit() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let t = Instant::now();
        let err = measure(cmd, Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
