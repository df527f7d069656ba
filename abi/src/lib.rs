//! The VMM ⇄ guest-init contract that is not a message: values both sides
//! must agree on, kept in one place so neither side has to depend on the
//! other (the VMM crate links no Wasm engine, the init no KVM crates).
//!
//! The host ⇄ guest *messages* (frames over vsock) are `airlock-guest`'s
//! `proto` module; they are not the VMM's business.

#![deny(missing_docs)]

/// The I/O port the guest's init writes boot-stage markers to: one byte,
/// the stage's code. The VMM stamps each write with the host's clock (time
/// since the VM was created), so boot is timed from outside the guest.
pub const BOOT_MARKER_PORT: u16 = 0x440;

/// Boot stages in the order init reaches them; a stage's marker code is
/// its index here plus one.
/// `listening`: the agent listens on vsock and waits for the host (where
/// VM snapshots are taken); `ready`: the host has connected.
pub const BOOT_STAGES: [&str; 5] = ["init", "mounts", "runner", "listening", "ready"];

/// The marker code of `stage` (see [`BOOT_STAGES`]).
pub fn boot_stage_code(stage: &str) -> Option<u8> {
    BOOT_STAGES
        .iter()
        .position(|s| *s == stage)
        .and_then(|i| u8::try_from(i + 1).ok())
}

/// The stage name of a marker code, if it is one.
pub fn boot_stage_name(code: u8) -> Option<&'static str> {
    BOOT_STAGES.get(usize::from(code).checked_sub(1)?).copied()
}

/// What making one entry (a file, directory or link) in a writable grant
/// costs of a call's write limit (`limits.max_write`), in both walls: the
/// runner charges it, and in a VM the host's file server charges it again
/// against the share's cap, so a call cannot fill a volume with empty
/// files. A state volume measures each entry at least this much too, so
/// the charge within a call and the measure between calls agree.
pub const ENTRY_WRITE_BYTES: u64 = 4096;

/// Directories (virtio-fs devices) one VM can share at most.
pub const MAX_SHARES: usize = 4;

/// The longest virtio-fs tag (the device's config space holds 36 bytes).
pub const SHARE_TAG_LEN: usize = 36;

/// Whether `tag` can name a share: 1..=[`SHARE_TAG_LEN`] ASCII letters,
/// digits, `-` or `_`. The VMM refuses a configuration with another, and
/// the guest a mount that names one.
pub fn is_share_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= SHARE_TAG_LEN
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_stage_codes_name_the_stages_in_order() {
        for (i, name) in BOOT_STAGES.iter().enumerate() {
            let code = boot_stage_code(name).unwrap();
            assert_eq!(usize::from(code), i + 1);
            assert_eq!(boot_stage_name(code), Some(*name));
        }
        assert_eq!(boot_stage_code("nope"), None);
        assert_eq!(boot_stage_name(0), None);
        assert_eq!(boot_stage_name(200), None);
    }

    #[test]
    fn share_tags_are_device_shaped() {
        for ok in ["grant0", "a", "A-b_9", &"x".repeat(SHARE_TAG_LEN)] {
            assert!(is_share_tag(ok), "{ok}");
        }
        for bad in ["", "a b", "a/b", "a\0", "é", &"x".repeat(SHARE_TAG_LEN + 1)] {
            assert!(!is_share_tag(bad), "{bad:?}");
        }
    }
}
