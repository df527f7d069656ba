//! A warm pool of microVMs for the service: sandboxes are booted ahead of
//! calls so a call only pays for load + invoke, not for a boot.
//!
//! Besides them (or instead: `warm` 0), with VM snapshots the pool keeps
//! one VM *parked* ([`Sandbox::park`]): restored from the snapshot ahead
//! of any call, its guest's agent holding the host's connection, told
//! nothing yet. A call that finds no warm sandbox takes it and only pays
//! for the agent's refresh and Hello; a new one is parked behind it.
//!
//! **Invariants:** a sandbox serves exactly one call and is then shut down —
//! nothing a call leaves behind in a guest (files in its tmpfs, kernel
//! state, a compromised agent) can reach another call or tenant. A sandbox
//! whose VM has ended while it waited is discarded, never handed out.
//! A parked VM holds nothing of a call (no shares, no grant, no component;
//! its entropy and clock are refreshed when it goes, before anything
//! else reaches its agent, and its life begins then). [`Pool::shutdown`] (also
//! run on drop) stops the filler thread and reaps every waiting VM, parked
//! ones included.

use crate::sandbox::{Parked, Sandbox, SandboxConfig, SandboxError};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

struct Shared {
    cfg: SandboxConfig,
    warm: usize,
    ready: Mutex<VecDeque<Sandbox>>,
    /// Keep a VM parked (needs snapshots).
    park: bool,
    parked: Mutex<Option<Parked>>,
    /// A parked VM is going (taken, not yet ready): the next is parked
    /// after, not while it competes for the host's CPUs.
    going: AtomicBool,
    wake: Condvar,
    stop: AtomicBool,
    booted: AtomicU64,
}

/// The pool.
pub struct Pool {
    shared: Arc<Shared>,
    filler: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("warm", &self.shared.warm)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sandbox>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn boot(&self) -> Result<Sandbox, SandboxError> {
        let sb = Sandbox::boot(&self.cfg)?;
        self.booted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            ready_ms = sb.ready_after.as_millis() as u64,
            "sandbox booted"
        );
        Ok(sb)
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, Option<Parked>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a VM is to be parked now: asked for, and none is. One that
    /// ended while it waited is taken out and is the error, for the filler
    /// to reap (outside the pool's lock) and count as a failed park: a
    /// guest that keeps ending (e.g. past its parked CPU allowance,
    /// `ParkCpu`) is parked again only after a pause, not in a loop.
    fn wants_parked(&self) -> Result<bool, Box<Parked>> {
        if !self.park {
            return Ok(false);
        }
        let ended = {
            let mut slot = self.parked();
            // Read under the slot's lock, where `take` sets it.
            if self.going.load(Ordering::SeqCst) {
                return Ok(false);
            }
            if slot.as_ref().is_some_and(Parked::is_alive) {
                return Ok(false);
            }
            slot.take()
        };
        ended.map_or(Ok(true), |p| Err(Box::new(p)))
    }

    /// Keep `warm` sandboxes ready, and one VM parked when asked, until
    /// told to stop.
    fn fill(&self) {
        let mut failures = 0u32;
        // A VM parked here that did not end on its own: when the slot is
        // found empty again a call took it, and the failures are over (a
        // park alone does not end them: a parked VM may end later).
        let mut parked_one = false;
        while !self.stop.load(Ordering::SeqCst) {
            let guard = self.lock();
            let boot = guard.len() < self.warm;
            let made = if boot {
                drop(guard);
                self.boot().map(|sb| self.lock().push_back(sb))
            } else {
                match self.wants_parked() {
                    Ok(false) => {
                        let _ = self
                            .wake
                            .wait_timeout(guard, Duration::from_millis(500))
                            .map_err(|_| ());
                        continue;
                    }
                    Ok(true) => {
                        drop(guard);
                        if std::mem::take(&mut parked_one) {
                            failures = 0;
                        }
                        Sandbox::park(&self.cfg).map(|p| {
                            *self.parked() = Some(p);
                            parked_one = true;
                        })
                    }
                    Err(ended) => {
                        drop(guard);
                        parked_one = false;
                        Err(ended.end())
                    }
                }
            };
            match made {
                Ok(()) => {
                    if boot {
                        failures = 0;
                    }
                    self.wake.notify_all();
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "warm pool: a boot (or a parked VM) failed");
                    // Back off, but stay responsive to shutdown.
                    for _ in 0..(failures.min(10) * 10) {
                        if self.stop.load(Ordering::SeqCst) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }
}

impl Pool {
    /// Start a pool that keeps `warm` sandboxes booted (0: boot per call)
    /// and, with `park` (when `cfg` has snapshots), one VM parked.
    ///
    /// # Errors
    /// The filler thread could not be started.
    pub fn start(cfg: SandboxConfig, warm: usize, park: bool) -> Result<Self, SandboxError> {
        let park = park && cfg.snapshots.is_some();
        let shared = Arc::new(Shared {
            cfg,
            warm,
            park,
            parked: Mutex::new(None),
            going: AtomicBool::new(false),
            ready: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            booted: AtomicU64::new(0),
        });
        let filler = if warm > 0 || park {
            let s = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("airlock-pool".into())
                    .spawn(move || s.fill())?,
            )
        } else {
            None
        };
        Ok(Self {
            shared,
            filler: Mutex::new(filler),
        })
    }

    /// A ready sandbox: a warm one if there is one, else the parked VM
    /// run now, else one started now (restored or booted).
    ///
    /// # Errors
    /// A boot failed.
    pub fn take(&self) -> Result<Sandbox, SandboxError> {
        loop {
            let next = self.shared.lock().pop_front();
            self.shared.wake.notify_all();
            match next {
                Some(sb) if sb.is_alive() => return Ok(sb),
                Some(dead) => {
                    tracing::warn!("warm pool: a waiting VM had ended; discarding it");
                    drop(dead);
                }
                None => break,
            }
        }
        let parked = {
            let mut slot = self.shared.parked();
            let p = slot.take();
            self.shared.going.store(p.is_some(), Ordering::SeqCst);
            p
        };
        if let Some(p) = parked.filter(Parked::is_alive) {
            let went = p.go(&self.shared.cfg);
            // The filler parks the next one now that this one is ready.
            self.shared.going.store(false, Ordering::SeqCst);
            self.shared.wake.notify_all();
            match went {
                Ok(sb) => {
                    self.shared.booted.fetch_add(1, Ordering::Relaxed);
                    return Ok(sb);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the parked VM failed to start; starting another");
                }
            }
        }
        self.shared.going.store(false, Ordering::SeqCst);
        self.shared.wake.notify_all();
        self.shared.boot()
    }

    /// Wait until a VM is parked and its agent has the host's connection
    /// (for benchmarks and tests that measure a parked start), at most
    /// `timeout`; whether one is.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self
                .shared
                .parked()
                .as_ref()
                .is_some_and(|p| p.is_alive() && p.is_parked())
            {
                return true;
            }
            if !self.shared.park || std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A ready sandbox with `artifact` loaded, retried on fresh sandboxes
    /// (up to the pool config's `boot_attempts`) like
    /// [`Sandbox::boot_and_load`]. Returns the sandbox and the digest.
    ///
    /// # Errors
    /// The last attempt's error.
    pub fn take_loaded(
        &self,
        artifact: &[u8],
        engine: &str,
        docs: &std::collections::BTreeMap<String, String>,
    ) -> Result<(Sandbox, String), SandboxError> {
        Sandbox::retry_before_call(
            || self.take(),
            self.shared.cfg.boot_attempts,
            artifact,
            engine,
            docs,
        )
    }

    /// A VM of its own for a call with `shares` (warm VMs have none;
    /// `write_limit` as [`Sandbox::boot_with`] takes it), loaded with
    /// `artifact`, with [`Pool::take_loaded`]'s retries; with no shares,
    /// [`Pool::take_loaded`] itself.
    ///
    /// # Errors
    /// As [`Pool::take_loaded`].
    pub fn take_loaded_with(
        &self,
        shares: &[crate::sandbox::OpenShare],
        write_limit: u64,
        artifact: &[u8],
        engine: &str,
        docs: &std::collections::BTreeMap<String, String>,
    ) -> Result<(Sandbox, String), SandboxError> {
        if shares.is_empty() {
            return self.take_loaded(artifact, engine, docs);
        }
        Sandbox::retry_before_call(
            || {
                let sb = Sandbox::boot_with(&self.shared.cfg, shares, write_limit)?;
                self.shared.booted.fetch_add(1, Ordering::Relaxed);
                Ok(sb)
            },
            self.shared.cfg.boot_attempts,
            artifact,
            engine,
            docs,
        )
    }

    /// Sandboxes waiting now.
    pub fn ready(&self) -> usize {
        self.shared.lock().len()
    }

    /// VMs booted so far (warm and on demand).
    pub fn booted(&self) -> u64 {
        self.shared.booted.load(Ordering::Relaxed)
    }

    /// Stop filling and reap every waiting VM.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        let filler = self.filler.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = filler {
            let _ = t.join();
        }
        let waiting: Vec<Sandbox> = self.shared.lock().drain(..).collect();
        for sb in waiting {
            let _ = sb.shutdown();
        }
        // Its VMM ends without running the guest.
        drop(self.shared.parked().take());
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}
