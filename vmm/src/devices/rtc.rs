//! CMOS real-time clock (MC146818) at ports 0x70 (index) / 0x71 (data),
//! read-only: it gives the guest the host's UTC wall time at boot.
//!
//! Why it exists: without it the guest kernel polls a port that reads
//! 0xff — "update in progress" for ever — until it gives up ("Unable to read
//! current time from RTC"), which cost about 40 % of a boot in the nested
//! harness, and the guest then believes it is 1970.
//!
//! Invariants: values are BCD in 24-hour mode (what Linux on x86 expects),
//! "update in progress" is never set, writes are ignored except the index.

use chrono::{Datelike, Timelike, Utc};

/// Index port.
pub const RTC_INDEX: u16 = 0x70;
/// Data port.
pub const RTC_DATA: u16 = 0x71;

/// The CMOS clock of one VM.
#[derive(Debug, Default)]
pub struct Rtc {
    index: u8,
}

fn bcd(v: u32) -> u8 {
    // Every caller passes 0..=99.
    (((v / 10) << 4) | (v % 10)) as u8
}

impl Rtc {
    /// A write to `port` (0x70 selects the register; bit 7 is the NMI mask).
    pub fn write(&mut self, port: u16, value: u8) {
        if port == RTC_INDEX {
            self.index = value & 0x7f;
        }
    }

    /// A read of `port`.
    pub fn read(&self, port: u16) -> u8 {
        if port != RTC_DATA {
            return 0xff;
        }
        let now = Utc::now();
        match self.index {
            0x00 => bcd(now.second().min(59)),
            0x02 => bcd(now.minute()),
            0x04 => bcd(now.hour()),
            0x06 => bcd(now.weekday().number_from_sunday()),
            0x07 => bcd(now.day()),
            0x08 => bcd(now.month()),
            0x09 => bcd(now.year().rem_euclid(100) as u32),
            0x32 => bcd(now.year().div_euclid(100).clamp(0, 99) as u32),
            0x0a => 0x26, // 32.768 kHz time base, 1024 Hz rate, no update in progress
            0x0b => 0x02, // 24-hour, BCD, no interrupts
            0x0c => 0x00, // no interrupt flags
            0x0d => 0x80, // battery good: time valid
            _ => 0x00,
        }
    }
}

impl super::BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = Rtc::read(self, RTC_INDEX.wrapping_add(offset as u16));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            Rtc::write(self, RTC_INDEX.wrapping_add(offset as u16), b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_bcd(b: u8) -> u32 {
        u32::from(b >> 4) * 10 + u32::from(b & 0xf)
    }

    #[test]
    fn reads_the_host_date_in_bcd_without_update_in_progress() {
        let mut rtc = Rtc::default();
        let read = |rtc: &mut Rtc, reg: u8| {
            rtc.write(RTC_INDEX, reg | 0x80); // NMI mask bit set, as Linux does
            rtc.read(RTC_DATA)
        };
        assert_eq!(read(&mut rtc, 0x0a) & 0x80, 0, "update in progress");
        assert_eq!(read(&mut rtc, 0x0b) & 0x04, 0, "must be BCD");
        let year = 2000 + from_bcd(read(&mut rtc, 0x09));
        let month = from_bcd(read(&mut rtc, 0x08));
        let now = Utc::now();
        assert!(year.abs_diff(now.year() as u32) <= 1);
        assert!((1..=12).contains(&month));
        assert!(from_bcd(read(&mut rtc, 0x04)) < 24);
        assert_eq!(rtc.read(RTC_INDEX), 0xff);
    }
}
