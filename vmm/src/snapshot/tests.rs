//! The state file's checks, on files written and then damaged here: no KVM
//! needed (the nested scenarios restore real guests).

use super::kvm_state::{VcpuState, VmState};
use super::*;
use kvm_bindings::{CpuId, Msrs, kvm_msr_entry};

fn identity() -> Identity {
    Identity {
        vmm: "ab".repeat(32),
        kernel: "cd".repeat(32),
        initrd: "ef".repeat(32),
        memory_mib: 256,
        vcpus: 1,
        cmdline: "console=ttyS0 airlock.port=1024".into(),
        weights: None,
        shares: vec![],
    }
}

fn state() -> SnapshotState {
    let regs = kvm_bindings::kvm_regs {
        rip: 0xffff_ffff_8100_0000,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: 0x10,
        data: 12345,
        ..Default::default()
    }])
    .unwrap();
    SnapshotState {
        identity: identity(),
        memory: MemoryImage {
            len: 256 << 20,
            sha256: [7; 32],
        },
        vm: VmState {
            pit: Default::default(),
            clock: Default::default(),
            irqchips: vec![Default::default(); 3],
            vcpus: vec![VcpuState {
                cpuid: CpuId::new(2).unwrap(),
                msrs,
                mp_state: Default::default(),
                regs,
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debug_regs: Default::default(),
                lapic: Default::default(),
                events: Default::default(),
            }],
        },
        devices: vec![("serial".into(), vec![1, 2, 3])],
    }
}

fn written() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("vm.snap");
    write_state(&p, &state()).unwrap();
    (d, p)
}

#[test]
fn a_state_file_reads_back_as_written() {
    let (_d, p) = written();
    let back = read_state(&p, &identity()).unwrap();
    // The KVM structs have no `==`: compare their encodings.
    assert_eq!(
        postcard::to_allocvec(&back).unwrap(),
        postcard::to_allocvec(&state()).unwrap()
    );
    assert_eq!(back.vm.vcpus[0].regs.rip, 0xffff_ffff_8100_0000);
    assert_eq!(back.vm.vcpus[0].msrs.as_slice()[0].data, 12345);
}

#[test]
fn a_truncated_state_file_is_refused() {
    let (_d, p) = written();
    let bytes = std::fs::read(&p).unwrap();
    for keep in [bytes.len() - 1, bytes.len() / 2, HEADER_LEN, 30, 10] {
        std::fs::write(&p, &bytes[..keep]).unwrap();
        assert!(
            matches!(
                read_state(&p, &identity()),
                Err(SnapshotError::Length { .. })
            ),
            "kept {keep}: {:?}",
            read_state(&p, &identity())
        );
    }
    std::fs::write(&p, [&bytes[..], b"x"].concat()).unwrap();
    assert!(matches!(
        read_state(&p, &identity()),
        Err(SnapshotError::Length { .. })
    ));
}

#[test]
fn an_edited_state_file_fails_its_checksum() {
    let (_d, p) = written();
    let mut bytes = std::fs::read(&p).unwrap();
    // Flip one bit in each part of the body in turn.
    for at in [HEADER_LEN, HEADER_LEN + 40, bytes.len() - 1] {
        bytes[at] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let r = read_state(&p, &identity());
        assert!(matches!(r, Err(SnapshotError::Checksum { .. })), "{r:?}");
        bytes[at] ^= 1;
    }
}

#[test]
fn a_foreign_file_or_another_version_is_refused_before_its_body_is_read() {
    let (_d, p) = written();
    let bytes = std::fs::read(&p).unwrap();
    for foreign in [&b""[..], b"\x7fELF\x02\x01\x01", b"AIRLKSN"] {
        std::fs::write(&p, foreign).unwrap();
        let r = read_state(&p, &identity());
        assert!(matches!(r, Err(SnapshotError::Foreign { .. })), "{r:?}");
    }
    let mut other = bytes.clone();
    let v = FORMAT_VERSION + 1;
    other[8..12].copy_from_slice(&v.to_le_bytes());
    std::fs::write(&p, &other).unwrap();
    let r = read_state(&p, &identity());
    assert!(
        matches!(r, Err(SnapshotError::Version { found, .. }) if found == v),
        "{r:?}"
    );
    // A header that claims a huge body is refused before allocating it.
    let mut huge = bytes;
    huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, &huge).unwrap();
    let r = read_state(&p, &identity());
    assert!(matches!(r, Err(SnapshotError::Decode { .. })), "{r:?}");
}

#[test]
fn a_snapshot_of_another_vmm_kernel_initramfs_or_shape_is_refused_naming_it() {
    let (_d, p) = written();
    type Change = fn(&mut Identity);
    let cases: [(&str, Change); 7] = [
        ("VMM build", |i| i.vmm = "00".repeat(32)),
        ("kernel", |i| i.kernel = "00".repeat(32)),
        ("initramfs", |i| i.initrd = "00".repeat(32)),
        ("memory size (MiB)", |i| i.memory_mib = 512),
        ("vCPU count", |i| i.vcpus = 2),
        ("weights image", |i| i.weights = Some("11".repeat(32))),
        ("shares", |i| i.shares = vec!["grant0".into()]),
    ];
    for (field, change) in cases {
        let mut expected = identity();
        change(&mut expected);
        match read_state(&p, &expected) {
            Err(SnapshotError::Mismatch { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
}

#[test]
fn a_memory_image_keeps_untouched_pages_as_holes_and_is_checked() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("vm.mem");
    let mut ram = vec![0u8; 64 << 20];
    ram[5 << 20] = 9;
    ram[(40 << 20) + 17] = 3;
    // Page 3 is "resident" but zero: no data written for it either.
    let image = write_memory(&p, &ram, |i| i == 3 || i == 1280 || i == 10240).unwrap();
    assert_eq!(image.len, 64 << 20);
    let m = std::fs::metadata(&p).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(m.blocks() * 512 <= 64 << 10, "{} blocks", m.blocks());
    assert_eq!(std::fs::read(&p).unwrap(), ram);
    check_memory(&p, &image).unwrap();
    // Another image, or a changed byte, is not this snapshot's.
    let mut edited = ram.clone();
    edited[1] = 1;
    std::fs::write(&p, &edited).unwrap();
    assert!(matches!(
        check_memory(&p, &image),
        Err(SnapshotError::Memory { .. })
    ));
    std::fs::write(&p, &ram[..4096]).unwrap();
    let r = check_memory(&p, &image);
    assert!(
        matches!(&r, Err(SnapshotError::Memory { reason, .. }) if reason.contains("bytes")),
        "{r:?}"
    );
}
