//! Boot-stage marker: a one-byte I/O port ([`super::MARKER`]) the
//! guest's init writes stage codes to. Each write is stamped with the time
//! since the VM was created, on the host's clock, so boot is timed from
//! outside the guest (the guest's own stage times come in its Hello).
//!
//! Invariants: the guest cannot grow host memory through the port (at most
//! [`MAX_MARKS`] are kept; later writes are counted, not stored), and codes
//! that name no stage are kept with their number, never dropped silently.

use airlock_abi::boot_stage_name;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Marks kept per VM.
pub const MAX_MARKS: usize = 32;

/// One marker write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageMark {
    /// The byte the guest wrote.
    pub code: u8,
    /// Its stage name, if it is a known stage.
    pub stage: Option<&'static str>,
    /// Time since the VM was created.
    pub after: Duration,
}

/// The marker port of one VM.
#[derive(Debug)]
pub struct BootMarker {
    start: Instant,
    marks: Mutex<(Vec<StageMark>, u64)>,
    pause: Option<(u8, Arc<AtomicBool>)>,
}

impl BootMarker {
    /// A marker whose times count from `start` (the VM's creation).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            marks: Mutex::new((Vec::new(), 0)),
            pause: None,
        }
    }

    /// Set `flag` when the guest writes `code` (the VM is to pause there
    /// for a snapshot).
    pub fn pause_at(&mut self, code: u8, flag: Arc<AtomicBool>) {
        self.pause = Some((code, flag));
    }

    /// The guest wrote `code` to the port.
    pub fn record(&self, code: u8) {
        let after = self.start.elapsed();
        if let Some((at, flag)) = &self.pause
            && *at == code
        {
            flag.store(true, Ordering::SeqCst);
        }
        let mut m = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if m.0.len() < MAX_MARKS {
            m.0.push(StageMark {
                code,
                stage: boot_stage_name(code),
                after,
            });
        } else {
            m.1 += 1;
        }
    }

    /// The marks so far, in the order written, and how many writes past
    /// [`MAX_MARKS`] were not kept.
    pub fn marks(&self) -> (Vec<StageMark>, u64) {
        let m = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        (m.0.clone(), m.1)
    }
}

impl super::BusDevice for BootMarker {
    /// Write-only: reads see no device.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            self.record(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_named_ordered_and_capped() {
        let m = BootMarker::new(Instant::now());
        m.record(1);
        m.record(2);
        m.record(200);
        let (marks, dropped) = m.marks();
        assert_eq!(dropped, 0);
        let names: Vec<_> = marks.iter().map(|s| s.stage).collect();
        assert_eq!(names, [Some("init"), Some("mounts"), None]);
        assert_eq!(marks[2].code, 200);
        assert!(marks.windows(2).all(|w| w[0].after <= w[1].after));
        for _ in 0..100 {
            m.record(4);
        }
        let (marks, dropped) = m.marks();
        assert_eq!(marks.len(), MAX_MARKS);
        assert_eq!(dropped, 103 - MAX_MARKS as u64);
    }
}
