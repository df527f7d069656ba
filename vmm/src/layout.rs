//! x86_64 guest physical memory layout and the CPU state for the 64-bit
//! Linux boot protocol (long mode, identity-mapped first GiB).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location (empty; the kernel installs its own).
pub const IDT_ADDR: u64 = 0x520;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page tables: PML4, PDPT, PD.
pub const PML4: u64 = 0x9000;
const PDPT: u64 = 0xa000;
const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line.
pub const CMDLINE_MAX: usize = 4096;
/// End of low RAM reported in e820 (the MP table lives just above).
pub const LOW_RAM_END: u64 = 0x9fc00;
/// Start of high RAM.
pub const HIGH_RAM_START: u64 = 0x10_0000;

// GDT access/flag words: G | L | P | S | type.
const CODE64: u16 = 0xa09b;
const DATA: u16 = 0xc093;
const TSS: u16 = 0x808b;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn segment(index: u16, flags: u16) -> kvm_segment {
    let bit = |n: u16| ((flags >> n) & 1) as u8;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: bit(7),
        dpl: ((flags >> 5) & 3) as u8,
        db: bit(14),
        s: bit(4),
        l: bit(13),
        g: bit(15),
        avl: bit(12),
        unusable: 0,
        padding: 0,
    }
}

/// Write GDT and page tables, and set the special registers for long mode.
///
/// # Errors
/// Guest memory too small for the tables.
pub fn setup_long_mode(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
) -> Result<(), vm_memory::GuestMemoryError> {
    let gdt = [
        0,
        gdt_entry(CODE64, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment(1, CODE64);
    let data = segment(2, DATA);
    let mut tss = segment(3, TSS);
    tss.limit = 0xfffff;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    // Identity-map the first GiB with 2 MiB pages; the kernel builds its own.
    mem.write_obj(PDPT | 0x03, GuestAddress(PML4))?;
    mem.write_obj(PD | 0x03, GuestAddress(PDPT))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))?;
    }
    sregs.cr3 = PML4;
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0001; // PG | PE
    sregs.efer |= 0x500; // LMA | LME
    Ok(())
}

/// General registers for the 64-bit boot protocol entry.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE,
        ..Default::default()
    }
}

/// Reset state of the x87/SSE unit.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// An Intel MultiProcessor table (spec 1.4) at `LOW_RAM_END`: one processor
/// entry per vCPU, an ISA bus, an IOAPIC with 24 pins wired 1:1 to ISA IRQs,
/// and LINT0/LINT1 as ExtINT/NMI. Linux finds the IOAPIC and the other vCPUs
/// through it without ACPI.
pub fn mptable(vcpus: u8) -> (u64, Vec<u8>) {
    const APIC_VERSION: u8 = 0x14;
    const IOAPIC_ADDR: u32 = 0xfec0_0000;
    const LAPIC_ADDR: u32 = 0xfee0_0000;
    let ioapic_id = vcpus + 1;
    let base = LOW_RAM_END;
    let table_addr = base + 16;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, if cpu == 0 { 0x3 } else { 0x1 }]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..24u8 {
        // type 3 (I/O interrupt), INT, conforming polarity/trigger, bus 0.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]); // LINT0: ExtINT
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]); // LINT1: NMI
    count += 2;

    let mut table: Vec<u8> = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"AIRLOCK ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp: Vec<u8> = Vec::new();
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    (base, out)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_architecture() {
        assert_eq!(gdt_entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let s = segment(1, CODE64);
        assert_eq!(
            (s.l, s.g, s.present, s.s, s.type_, s.selector),
            (1, 1, 1, 1, 0xb, 8)
        );
    }

    #[test]
    fn mptable_checksums_and_counts() {
        let (addr, t) = mptable(2);
        assert_eq!(addr, LOW_RAM_END);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(
            u16::from_le_bytes([table[34], table[35]]),
            2 + 1 + 1 + 24 + 2
        );
    }
}
