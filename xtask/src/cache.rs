//! Housekeeping for the content-addressed cache under `cache_dir()`: each
//! kind (`rootfs/`, `nested/`) holds one directory per input hash, and every
//! change to an input adds one. Using an entry marks it (its mtime); after a
//! build, all but the most recently used entries of that kind are removed,
//! so the cache does not grow without bound on a developer machine or a CI
//! runner that keeps it.
//!
//! Invariants: only directories named like a key (16 hex digits) are ever
//! removed; the entry just used is always among those kept; an entry another
//! build is using right now was marked when it was used, so it is recent.

use std::path::Path;
use std::time::SystemTime;

fn is_key(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Mark `entry` (a key directory) as used now.
fn mark_used(entry: &Path) -> std::io::Result<()> {
    std::fs::File::open(entry)?.set_modified(SystemTime::now())
}

/// Mark `entry` used, then keep it and the `keep − 1` other most recently
/// used key directories next to it; remove the rest. Failures to remove are
/// reported, not fatal: a cache that stays too big is not a build error.
pub fn use_and_prune(entry: &Path, keep: usize) -> std::io::Result<()> {
    mark_used(entry)?;
    let Some(kind) = entry.parent() else {
        return Ok(());
    };
    let mut entries = Vec::new();
    for e in std::fs::read_dir(kind)? {
        let e = e?;
        let name = e.file_name();
        if !e.file_type()?.is_dir() || !is_key(&name.to_string_lossy()) {
            continue;
        }
        let used = e.metadata()?.modified()?;
        entries.push((used, e.path()));
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, path) in entries.into_iter().skip(keep.max(1)) {
        if path == entry {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(&path) {
            eprintln!("cache: could not remove {}: {e}", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn keeps_the_used_and_most_recent_entries_and_nothing_else_is_touched() {
        let dir = std::env::temp_dir().join(format!("airlock-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let base = SystemTime::now() - Duration::from_secs(1000);
        let names = [
            "0000000000000001",
            "0000000000000002",
            "0000000000000003",
            "0000000000000004",
        ];
        for (i, n) in names.iter().enumerate() {
            let p = dir.join(n);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("f"), b"x").unwrap();
            std::fs::File::open(&p)
                .unwrap()
                .set_modified(base + Duration::from_secs(i as u64 * 10))
                .unwrap();
        }
        // Not key-shaped: never removed, however old.
        std::fs::create_dir_all(dir.join("src-6.1")).unwrap();
        // Use the oldest entry: it and the newest other one stay.
        use_and_prune(&dir.join(names[0]), 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["0000000000000001", "0000000000000004", "src-6.1"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
