//! KVM's part of a snapshot: each vCPU's registers and the VM's in-kernel
//! irqchip, PIT and clock, read from a paused VM and written into a new one
//! in the order KVM needs (CPUID before MSRs, LAPIC before events).
//!
//! **Invariant:** state is only read from vCPUs outside `KVM_RUN` (the
//! caller has stopped them) and only written before the new VM's vCPUs
//! first run.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// A KVM call that failed while saving or restoring.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    /// The ioctl failed.
    #[error("KVM {what} failed while {doing} a snapshot: {source}.")]
    Ioctl {
        /// Which state.
        what: &'static str,
        /// Saving or restoring.
        doing: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// KVM took fewer MSRs than were saved.
    #[error("KVM restored {set} of the snapshot's {saved} MSRs.")]
    Msrs {
        /// Restored.
        set: usize,
        /// Saved.
        saved: usize,
    },
    /// This host's XSAVE area is larger than the fixed `kvm_xsave` (dynamic
    /// XSTATE features on): the snapshot would lose state.
    #[error("This host's XSAVE area is {0} bytes, larger than the 4096 a snapshot holds.")]
    XsaveTooLarge(i32),
    /// The snapshot has another number of vCPUs than the VM.
    #[error("The snapshot has {saved} vCPUs, the VM {have}.")]
    VcpuCount {
        /// In the snapshot.
        saved: usize,
        /// In the VM.
        have: usize,
    },
}

fn saving(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Ioctl {
        what,
        doing: "saving",
        source,
    }
}

fn restoring(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Ioctl {
        what,
        doing: "restoring",
        source,
    }
}

/// One vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as the VMM set it.
    pub cpuid: CpuId,
    /// MSRs (every one KVM lists that it could read).
    pub msrs: Msrs,
    /// Running, halted, waiting for SIPI…
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
}

/// The VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// Each vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
}

/// The MSRs to save: every index KVM lists.
fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, KvmStateError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(saving("MSR index list"))?
        .as_slice()
        .to_vec())
}

/// Read the MSRs of `indices` that this vCPU has: KVM stops a batch at the
/// first it cannot read, which is skipped.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Msrs, KvmStateError> {
    let mut kept: Vec<kvm_msr_entry> = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut batch = Msrs::from_entries(&entries).map_err(|_| KvmStateError::Msrs {
            set: 0,
            saved: entries.len(),
        })?;
        let n = vcpu.get_msrs(&mut batch).map_err(saving("MSRs"))?;
        kept.extend_from_slice(&batch.as_slice()[..n]);
        // The n-th could not be read: skip it.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Msrs::from_entries(&kept).map_err(|_| KvmStateError::Msrs {
        set: 0,
        saved: kept.len(),
    })
}

fn check_xsave_size(vm: &VmFd) -> Result<(), KvmStateError> {
    let size = vm.check_extension_int(Cap::Xsave2);
    if size > 4096 {
        return Err(KvmStateError::XsaveTooLarge(size));
    }
    Ok(())
}

/// Save the state of a paused VM and its vCPUs.
///
/// # Errors
/// A KVM call fails, or the XSAVE area does not fit.
pub fn save(kvm: &Kvm, vm: &VmFd, vcpus: &[VcpuFd]) -> Result<VmState, KvmStateError> {
    check_xsave_size(vm)?;
    let indices = msr_indices(kvm)?;
    let mut states = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        states.push(VcpuState {
            cpuid: vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(saving("CPUID"))?,
            msrs: read_msrs(vcpu, &indices)?,
            mp_state: vcpu.get_mp_state().map_err(saving("MP state"))?,
            regs: vcpu.get_regs().map_err(saving("registers"))?,
            sregs: vcpu.get_sregs().map_err(saving("special registers"))?,
            xsave: vcpu.get_xsave().map_err(saving("XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(saving("XCRs"))?,
            debug_regs: vcpu.get_debug_regs().map_err(saving("debug registers"))?,
            lapic: vcpu.get_lapic().map_err(saving("LAPIC"))?,
            events: vcpu.get_vcpu_events().map_err(saving("vCPU events"))?,
        });
    }
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(saving("irqchip"))?;
        irqchips.push(chip);
    }
    Ok(VmState {
        pit: vm.get_pit2().map_err(saving("PIT"))?,
        clock: vm.get_clock().map_err(saving("clock"))?,
        irqchips,
        vcpus: states,
    })
}

/// TSS descriptor types: available and busy 64-bit TSS.
const TSS_AVAILABLE: u8 = 9;
const TSS_BUSY: u8 = 11;

/// `sregs` with the task register as this host's CPU holds it. KVM on AMD
/// reports TR as busy (type 11) whatever the VMCB says — Intel's VM entry
/// requires it — while an AMD VMCB holds what `ltr` loaded: the available
/// type (9). Hardware ignores the type, but an emulated SVM CPU (QEMU's,
/// which runs the nested test harness) checks it on every user-mode port
/// access through the TSS I/O bitmap: restored busy, the guest's init
/// died of a #GP at its first boot-stage marker after a restore.
fn tr_for_this_host(mut sregs: kvm_sregs) -> kvm_sregs {
    if sregs.tr.type_ == TSS_BUSY && host_is_amd() {
        sregs.tr.type_ = TSS_AVAILABLE;
    }
    sregs
}

/// Whether this host's CPU is AMD's (CPUID leaf 0's vendor string).
fn host_is_amd() -> bool {
    let r = std::arch::x86_64::__cpuid(0);
    [r.ebx, r.edx, r.ecx]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .eq(*b"AuthenticAMD")
}

/// Write `state` into a new VM (irqchip and PIT created, memory mapped)
/// whose vCPUs have not run.
///
/// # Errors
/// A KVM call fails, KVM refuses some MSRs, or the vCPU count differs.
pub fn restore(vm: &VmFd, vcpus: &[VcpuFd], state: &VmState) -> Result<(), KvmStateError> {
    check_xsave_size(vm)?;
    if state.vcpus.len() != vcpus.len() {
        return Err(KvmStateError::VcpuCount {
            saved: state.vcpus.len(),
            have: vcpus.len(),
        });
    }
    vm.set_pit2(&state.pit).map_err(restoring("PIT"))?;
    // The guest's clock continues from where it was saved; the guest's
    // wall clock is set afresh through the agent protocol.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        flags: 0,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(restoring("clock"))?;
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(restoring("irqchip"))?;
    }
    for (vcpu, s) in vcpus.iter().zip(&state.vcpus) {
        vcpu.set_cpuid2(&s.cpuid).map_err(restoring("CPUID"))?;
        vcpu.set_mp_state(s.mp_state)
            .map_err(restoring("MP state"))?;
        vcpu.set_regs(&s.regs).map_err(restoring("registers"))?;
        vcpu.set_sregs(&tr_for_this_host(s.sregs))
            .map_err(restoring("special registers"))?;
        // SAFETY: `check_xsave_size` showed this host's XSAVE area fits
        // the fixed 4096-byte `kvm_xsave` (no dynamically enabled XSTATE
        // features), so KVM reads nothing beyond the struct.
        unsafe { vcpu.set_xsave(&s.xsave) }.map_err(restoring("XSAVE"))?;
        vcpu.set_xcrs(&s.xcrs).map_err(restoring("XCRs"))?;
        vcpu.set_debug_regs(&s.debug_regs)
            .map_err(restoring("debug registers"))?;
        vcpu.set_lapic(&s.lapic).map_err(restoring("LAPIC"))?;
        let set = vcpu.set_msrs(&s.msrs).map_err(restoring("MSRs"))?;
        if set != s.msrs.as_slice().len() {
            return Err(KvmStateError::Msrs {
                set,
                saved: s.msrs.as_slice().len(),
            });
        }
        vcpu.set_vcpu_events(&s.events)
            .map_err(restoring("vCPU events"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_busy_task_register_on_amd_is_restored_as_available() {
        let mut sregs = kvm_sregs::default();
        sregs.tr.type_ = TSS_BUSY;
        let want = if host_is_amd() {
            TSS_AVAILABLE
        } else {
            TSS_BUSY
        };
        assert_eq!(tr_for_this_host(sregs).tr.type_, want);
        // Nothing else changes.
        sregs.tr.type_ = 3;
        sregs.cs.type_ = TSS_BUSY;
        assert_eq!(tr_for_this_host(sregs).tr.type_, 3);
        assert_eq!(tr_for_this_host(sregs).cs.type_, TSS_BUSY);
    }
}
