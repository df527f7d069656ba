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

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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

/// Split a cargo artifact name at its 16-hex-digit metadata hash:
/// `libfoo-0123456789abcdef.rlib` → (`libfoo`, `.rlib`). `None` for names
/// without one (the uplifted `policy`, `.cargo-lock`, …): never pruned.
fn artifact_kind(name: &str) -> Option<(&str, &str)> {
    let b = name.as_bytes();
    (0..b.len()).rev().find_map(|i| {
        let hash = b.get(i + 1..i + 17)?;
        if b[i] != b'-' || !hash.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        // ASCII up to here: `i + 17` is a character boundary.
        let after = &name[i + 17..];
        (after.is_empty() || after.starts_with('.')).then(|| (&name[..i], after))
    })
}

/// How much a prune removed.
#[derive(Default, Debug)]
pub struct Pruned {
    pub files: u64,
    pub bytes: u64,
}

fn size_of(path: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !m.is_dir() {
        return m.len();
    }
    std::fs::read_dir(path)
        .map(|d| d.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0)
}

/// Remove `path` (a file or a directory), counting what it freed.
fn remove(path: &Path, out: &mut Pruned) {
    let bytes = size_of(path);
    let gone = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match gone {
        Ok(()) => {
            out.files += 1;
            out.bytes += bytes;
        }
        Err(e) => eprintln!("cache: could not remove {}: {e}", path.display()),
    }
}

/// One build of one crate in `deps/`: the files sharing a name and hash.
#[derive(Default)]
struct Unit {
    /// The build's main output (an executable, or a workspace crate's
    /// `.rlib`): its time, and whether cargo uplifted it (a hard link).
    main: Option<(SystemTime, bool)>,
    files: Vec<PathBuf>,
}

/// In one `deps/` directory: the builds of each executable and of each
/// workspace library (`libs`, e.g. `libairlock_host`), grouped by name;
/// each build older than the newest of its group by more than `window` is
/// removed with every file of its hash (`.rlib`, `.rmeta`, `.d`, …). A
/// crate rebuilt with other dependencies gets a new hash and leaves the old
/// build behind — what a target directory shared by many commits fills up
/// with (a fuzz target is 0.5 GB per build). Builds all in use (features
/// differing between two builds of one run) were made within the window of
/// each other and stay; an uplifted binary (hard-linked) always stays.
/// Third-party crates are left alone: their variants (a `cargo check`'s
/// metadata-only build beside a full one) are made at unrelated times, and
/// one removed by mistake is a slow rebuild.
fn prune_deps(
    dir: &Path,
    libs: &HashSet<String>,
    window: Duration,
    out: &mut Pruned,
) -> std::io::Result<()> {
    let mut units: HashMap<(String, String), Unit> = HashMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((stem, suffix)) = artifact_kind(&name) else {
            continue;
        };
        let hash = name[stem.len() + 1..stem.len() + 17].to_owned();
        let unit = units.entry((stem.to_owned(), hash)).or_default();
        unit.files.push(e.path());
        let m = e.metadata()?;
        if m.is_file() && (suffix.is_empty() || (suffix == ".rlib" && libs.contains(stem))) {
            unit.main = Some((m.modified()?, m.nlink() > 1));
        }
    }
    let mut newest: HashMap<&str, SystemTime> = HashMap::new();
    for ((stem, _), u) in &units {
        if let Some((when, _)) = u.main {
            let n = newest.entry(stem.as_str()).or_insert(when);
            *n = (*n).max(when);
        }
    }
    for ((stem, _), u) in &units {
        let Some((when, linked)) = u.main else {
            continue;
        };
        if !linked
            && newest[stem.as_str()]
                .duration_since(when)
                .unwrap_or_default()
                > window
        {
            for f in &u.files {
                remove(f, out);
            }
        }
    }
    Ok(())
}

/// In one `incremental/` directory: each crate's session directories
/// (`<crate>-<hash>/`) older than its newest by more than `window` go —
/// rustc's own cleanup only looks inside one of them. (One removed by
/// mistake costs one slower compile, never a wrong one.)
fn prune_incremental(dir: &Path, window: Duration, out: &mut Pruned) -> std::io::Result<()> {
    let mut groups: HashMap<String, Vec<(SystemTime, PathBuf)>> = HashMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((stem, "")) = artifact_kind(&name) {
            groups
                .entry(stem.to_owned())
                .or_default()
                .push((e.metadata()?.modified()?, e.path()));
        }
    }
    for entries in groups.values() {
        let newest = entries.iter().map(|e| e.0).max();
        for (when, path) in entries {
            if newest.is_some_and(|n| n.duration_since(*when).unwrap_or_default() > window) {
                remove(path, out);
            }
        }
    }
    Ok(())
}

/// Prune the stale builds out of a cargo target directory: every profile
/// directory (`debug/`, `x86_64-unknown-linux-musl/release/`, …) whose
/// build lock is free — a cargo building there right now is left alone
/// (its lock is held), so a prune never races a build.
pub fn prune_target(
    target: &Path,
    libs: &HashSet<String>,
    window: Duration,
) -> std::io::Result<Pruned> {
    let mut out = Pruned::default();
    let mut profiles = Vec::new();
    for e in std::fs::read_dir(target)?.flatten() {
        let p = e.path();
        if p.join(".cargo-lock").exists() {
            profiles.push(p);
        } else if p.is_dir() {
            for e in std::fs::read_dir(&p)?.flatten() {
                if e.path().join(".cargo-lock").exists() {
                    profiles.push(e.path());
                }
            }
        }
    }
    for profile in profiles {
        let lock = std::fs::File::open(profile.join(".cargo-lock"))?;
        if lock.try_lock().is_err() {
            eprintln!("cache: {} is being built; not pruned", profile.display());
            continue;
        }
        if profile.join("deps").is_dir() {
            prune_deps(&profile.join("deps"), libs, window, &mut out)?;
        }
        if profile.join("incremental").is_dir() {
            prune_incremental(&profile.join("incremental"), window, &mut out)?;
        }
    }
    Ok(out)
}

/// `prune_target` with the window every caller uses, reporting what it
/// freed.
pub fn prune_target_logged(target: &Path) -> anyhow::Result<()> {
    let p = prune_target(target, &workspace_libs()?, PRUNE_WINDOW)?;
    eprintln!(
        "cache: {}: {} stale build artifacts removed ({} MiB)",
        target.display(),
        p.files,
        p.bytes >> 20
    );
    Ok(())
}

/// The file stems of the workspace's libraries (`libairlock_host`, …),
/// from `cargo metadata`.
fn workspace_libs() -> anyhow::Result<HashSet<String>> {
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(super::root())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut libs = HashSet::new();
    for target in meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
    {
        let is_lib = target["kind"].as_array().is_some_and(|k| {
            k.iter().any(|k| {
                k != "bin" && k != "test" && k != "bench" && k != "example" && k != "custom-build"
            })
        });
        if let (true, Some(name)) = (is_lib, target["name"].as_str()) {
            libs.insert(format!("lib{}", name.replace('-', "_")));
        }
    }
    Ok(libs)
}

/// Builds of one crate further apart than this are different generations:
/// one run of the test command takes well under it.
pub const PRUNE_WINDOW: Duration = Duration::from_secs(2 * 3600);

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

    #[test]
    fn artifact_names_split_at_their_hash() {
        assert_eq!(
            artifact_kind("libfoo_bar-0123456789abcdef.rlib"),
            Some(("libfoo_bar", ".rlib"))
        );
        assert_eq!(
            artifact_kind("policy-398abf3749ad10d2"),
            Some(("policy", ""))
        );
        assert_eq!(
            artifact_kind("a-b-0123456789abcdef.long-type-1.txt"),
            Some(("a-b", ".long-type-1.txt"))
        );
        assert_eq!(artifact_kind("policy"), None);
        assert_eq!(artifact_kind(".cargo-lock"), None);
        assert_eq!(artifact_kind("x-0123456789abcdeg.rlib"), None);
        assert_eq!(artifact_kind("x-0123456789abcdefa"), None);
    }

    #[test]
    fn stale_generations_go_variants_and_uplifted_binaries_stay() {
        let target =
            std::env::temp_dir().join(format!("airlock-prune-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&target);
        let profile = target.join("x86_64-unknown-linux-gnu/debug");
        let deps = profile.join("deps");
        let inc = profile.join("incremental");
        std::fs::create_dir_all(&deps).unwrap();
        std::fs::create_dir_all(inc.join("policy-00000000000000aa/s-1")).unwrap();
        std::fs::create_dir_all(inc.join("policy-00000000000000bb/s-2")).unwrap();
        std::fs::write(profile.join(".cargo-lock"), b"").unwrap();
        let now = SystemTime::now();
        let hours = |h: u64| now - Duration::from_secs(h * 3600);
        let put = |name: &str, when: SystemTime| {
            let p = deps.join(name);
            std::fs::write(&p, b"x").unwrap();
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(when)
                .unwrap();
        };
        put("policy-0000000000000001", hours(30)); // a stale build
        put("policy-0000000000000001.d", hours(30)); // its dep-info
        put("policy-0000000000000002", hours(10)); // stale too
        put("policy-0000000000000003", hours(0)); // the last one
        put("libairlock_host-00000000000000d1.rlib", hours(9)); // stale
        put("libairlock_host-00000000000000d1.rmeta", hours(9));
        put("libairlock_host-00000000000000d2.rlib", hours(0));
        put("libairlock_host-00000000000000d2.rmeta", hours(0));
        put("libairlock_host-00000000000000d3.rmeta", hours(30)); // a check build
        put("libserde-00000000000000a1.rlib", hours(50)); // third-party:
        put("libserde-00000000000000a2.rmeta", hours(1)); // never touched
        put("fuzz_x-0000000000000004", hours(20));
        put("fuzz_x-0000000000000005", hours(0));
        // The binary cargo uplifted to the profile directory: a hard link.
        std::fs::hard_link(deps.join("fuzz_x-0000000000000004"), profile.join("fuzz_x")).unwrap();
        std::fs::File::open(inc.join("policy-00000000000000aa"))
            .unwrap()
            .set_modified(hours(5))
            .unwrap();
        let libs: HashSet<String> = ["libairlock_host".to_owned()].into();

        // A cargo building in this profile holds the lock: nothing pruned.
        let held = std::fs::File::open(profile.join(".cargo-lock")).unwrap();
        held.lock().unwrap();
        let p = prune_target(&target, &libs, PRUNE_WINDOW).unwrap();
        assert_eq!(p.files, 0);
        drop(held);

        let p = prune_target(&target, &libs, PRUNE_WINDOW).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&deps)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "fuzz_x-0000000000000004",
                "fuzz_x-0000000000000005",
                "libairlock_host-00000000000000d2.rlib",
                "libairlock_host-00000000000000d2.rmeta",
                "libairlock_host-00000000000000d3.rmeta",
                "libserde-00000000000000a1.rlib",
                "libserde-00000000000000a2.rmeta",
                "policy-0000000000000003",
            ]
        );
        assert!(!inc.join("policy-00000000000000aa").exists());
        assert!(inc.join("policy-00000000000000bb").exists());
        assert_eq!(p.files, 6);
        std::fs::remove_dir_all(&target).unwrap();
    }
}
