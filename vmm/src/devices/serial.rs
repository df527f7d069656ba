//! 8250 UART at the legacy COM1 ports (the [`super::COM1`] row), built on
//! vm-superio. The guest console goes to a capped per-VM log and to tracing.

use std::io::Write;
use std::sync::{Arc, Mutex};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial interrupt through a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The console log: keeps at most `cap` bytes (the first ones: boot messages
/// and the reason for a failure are at the start or are the last line, which
/// `tail` keeps separately).
#[derive(Clone)]
pub struct ConsoleLog {
    inner: Arc<Mutex<LogInner>>,
}

struct LogInner {
    buf: Vec<u8>,
    cap: usize,
    dropped: u64,
    line: Vec<u8>,
}

impl ConsoleLog {
    /// A log capped at `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(LogInner {
                buf: Vec::new(),
                cap,
                dropped: 0,
                line: Vec::new(),
            })),
        }
    }

    /// Everything kept so far, lossy UTF-8, with a note if bytes were dropped.
    pub fn text(&self) -> String {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = String::from_utf8_lossy(&g.buf).into_owned();
        if g.dropped > 0 {
            s.push_str(&format!(
                "\n[airlock: {} console bytes dropped over the cap]\n",
                g.dropped
            ));
        }
        s
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for &b in data {
            if g.buf.len() < g.cap {
                g.buf.push(b);
            } else {
                g.dropped += 1;
            }
            if b == b'\n' {
                let line = std::mem::take(&mut g.line);
                tracing::debug!(target: "airlock::guest_console", "{}", String::from_utf8_lossy(&line).trim_end());
            } else if g.line.len() < 4096 {
                g.line.push(b);
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The COM1 device.
pub type Com1 = Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleLog>;

/// COM1's registers and receive buffer, for a snapshot: the nine
/// register bytes, then the buffer.
pub fn save(serial: &Com1) -> Vec<u8> {
    let st = serial.state();
    let mut out = vec![
        st.baud_divisor_low,
        st.baud_divisor_high,
        st.interrupt_enable,
        st.interrupt_identification,
        st.line_control,
        st.line_status,
        st.modem_control,
        st.modem_status,
        st.scratch,
    ];
    out.extend_from_slice(&st.in_buffer);
    out
}

/// COM1 as [`save`] left it, raising the same interrupt and writing to the
/// same log as `now`.
///
/// # Errors
/// The state is too short, its buffer too long, or the eventfd cannot be
/// cloned.
pub fn restored(now: &Com1, state: &[u8]) -> Result<Com1, String> {
    let [a, b, c, d, e, f, g, h, i, rest @ ..] = state else {
        return Err(format!("COM1 state of {} bytes, fewer than 9", state.len()));
    };
    let st = vm_superio::serial::SerialState {
        baud_divisor_low: *a,
        baud_divisor_high: *b,
        interrupt_enable: *c,
        interrupt_identification: *d,
        line_control: *e,
        line_status: *f,
        modem_control: *g,
        modem_status: *h,
        scratch: *i,
        in_buffer: rest.to_vec(),
    };
    let irq = now
        .interrupt_evt()
        .0
        .try_clone()
        .map_err(|e| format!("COM1 interrupt: {e}"))?;
    Serial::from_state(
        &st,
        IrqTrigger(irq),
        vm_superio::serial::NoEvents,
        now.writer().clone(),
    )
    .map_err(|e| format!("COM1 state: {e:?}"))
}

/// Create COM1 writing to `log`, raising `irq`.
pub fn com1(irq: EventFd, log: ConsoleLog) -> Com1 {
    Serial::new(IrqTrigger(irq), log)
}

impl super::BusDevice for Com1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = Serial::read(self, offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            // A full console log is not the guest's error to see.
            let _ = Serial::write(self, offset as u8, b);
        }
    }
}
