//! What a tenant of the service may grant: host directories only inside
//! its `allowed_host_dirs` (each bound to the allowed directory it lies in),
//! limits at or under its ceiling, and — for a policy being stored —
//! directories that exist now and are named by their real path.
//!
//! The service asks this module, and only this module, whether a policy
//! text is acceptable for a tenant: when it is stored, and again every time
//! it is used (config may have changed since; a policy that became invalid
//! is refused, never widened).

use super::{Policy, PolicyError, parse};
use airlock_guest::grants::{GrantSet, Limits};
use std::path::{Path, PathBuf};

/// A tenant's rules, from the server config.
#[derive(Debug, Clone, Copy)]
pub struct TenantRules<'a> {
    /// The tenant's name (for messages).
    pub tenant: &'a str,
    /// Directories its policies may grant from (canonical).
    pub allowed_host_dirs: &'a [PathBuf],
    /// The highest limits its policies may ask for.
    pub ceiling: &'a Limits,
    /// Its state volumes: name → its own directory of each (canonical).
    pub volumes: &'a std::collections::BTreeMap<String, PathBuf>,
}

/// How much [`check`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// A policy being stored: its directories must exist now, by their real path.
    Store,
    /// A stored policy being read or used: the checks that need no
    /// filesystem (the runner opens each directory safely at call time).
    Use,
}

/// A policy accepted for a tenant, with the grant set its calls get.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The parsed policy.
    pub policy: Policy,
    /// Its grants, each directory bound to its allowed root.
    pub grants: GrantSet,
}

fn field(field: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// Parse `text` and check it against `rules`.
///
/// # Errors
/// [`PolicyError`] naming the policy field.
pub fn check(text: &str, rules: &TenantRules<'_>, how: Check) -> Result<Checked, PolicyError> {
    let policy = parse(text, Path::new(""))?;
    for (i, fs) in policy.filesystem.iter().enumerate() {
        if fs.volume.is_none() && !fs.host.is_absolute() {
            return Err(field(
                format!("filesystem[{i}].host"),
                format!(
                    "{} is relative; the service needs absolute host paths",
                    fs.host.display()
                ),
            ));
        }
    }
    let grants = policy.grant_set_beneath(rules.allowed_host_dirs, rules.volumes)?;
    if let Some((name, asked, max)) = policy.over_ceiling(rules.ceiling) {
        return Err(field(
            name,
            format!(
                "{asked} is over this tenant's ceiling of {max} (tenants.{}.max_limits in the server config)",
                rules.tenant
            ),
        ));
    }
    if how == Check::Store {
        // Volumes are the service's own directories.
        for (i, fs) in policy
            .filesystem
            .iter()
            .enumerate()
            .filter(|(_, f)| f.volume.is_none())
        {
            let name = format!("filesystem[{i}].host");
            let real = std::fs::canonicalize(&fs.host).map_err(|e| {
                field(
                    name.clone(),
                    format!("{} cannot be granted: {e}", fs.host.display()),
                )
            })?;
            if !real.is_dir() {
                return Err(field(
                    name,
                    format!("{} is not a directory", fs.host.display()),
                ));
            }
            if real != fs.host {
                return Err(field(
                    name,
                    format!(
                        "{} is reached through a symbolic link; grant its real path {}",
                        fs.host.display(),
                        real.display()
                    ),
                ));
            }
        }
    }
    Ok(Checked { policy, grants })
}

#[cfg(test)]
mod tests {
    use super::*;

    static NO_VOLUMES: std::collections::BTreeMap<String, PathBuf> =
        std::collections::BTreeMap::new();

    fn rules<'a>(dirs: &'a [PathBuf], ceiling: &'a Limits) -> TenantRules<'a> {
        TenantRules {
            tenant: "acme",
            allowed_host_dirs: dirs,
            ceiling,
            volumes: &NO_VOLUMES,
        }
    }

    #[test]
    fn a_volume_is_granted_by_name_as_its_own_root_and_only_if_it_exists() {
        let allowed = tempfile::tempdir().unwrap();
        let allowed = std::fs::canonicalize(allowed.path()).unwrap();
        let vol = tempfile::tempdir().unwrap();
        let volumes =
            std::collections::BTreeMap::from([("notes".to_string(), vol.path().to_path_buf())]);
        let dirs = [allowed];
        let ceiling = Limits::default();
        let r = TenantRules {
            volumes: &volumes,
            ..rules(&dirs, &ceiling)
        };
        let text =
            "version = 1\n[[filesystem]]\nvolume = \"notes\"\nguest = \"/state\"\nmode = \"rw\"\n";
        let c = check(text, &r, Check::Store).unwrap();
        assert_eq!(c.grants.dirs[0].root, vol.path());
        assert_eq!(c.grants.dirs[0].host_path, vol.path());
        assert!(c.grants.dirs[0].writable);
        // A volume this server does not have; a host path inside a volume.
        let e = check(&text.replace("notes", "other"), &r, Check::Store).unwrap_err();
        assert!(
            matches!(&e, PolicyError::Field { field, message } if field == "filesystem[0].volume" && message.contains("notes")),
            "{e}"
        );
        let by_path = format!(
            "version = 1\n[[filesystem]]\nhost = {:?}\nguest = \"/state\"\nmode = \"rw\"\n",
            vol.path()
        );
        let e = check(&by_path, &r, Check::Use).unwrap_err();
        assert!(
            matches!(&e, PolicyError::Field { field, .. } if field == "filesystem[0].host"),
            "{e}"
        );
    }

    #[test]
    fn directories_only_inside_the_allowed_ones_limits_only_under_the_ceiling() {
        let allowed = tempfile::tempdir().unwrap();
        let allowed = std::fs::canonicalize(allowed.path()).unwrap();
        let inside = allowed.join("data");
        std::fs::create_dir(&inside).unwrap();
        let dirs = [allowed.clone()];
        let ceiling = Limits::default();
        let ok = format!(
            "version = 1\n[[filesystem]]\nhost = {:?}\nguest = \"/data\"\nmode = \"ro\"\n",
            inside.display().to_string()
        );
        let c = check(&ok, &rules(&dirs, &ceiling), Check::Store).unwrap();
        assert_eq!(c.grants.dirs[0].root, allowed);

        let outside =
            "version = 1\n[[filesystem]]\nhost = \"/etc\"\nguest = \"/e\"\nmode = \"ro\"\n";
        let e = check(outside, &rules(&dirs, &ceiling), Check::Use).unwrap_err();
        assert!(
            matches!(&e, PolicyError::Field { field, .. } if field == "filesystem[0].host"),
            "{e}"
        );

        let relative =
            "version = 1\n[[filesystem]]\nhost = \"data\"\nguest = \"/d\"\nmode = \"ro\"\n";
        let e = check(relative, &rules(&dirs, &ceiling), Check::Use).unwrap_err();
        assert!(e.to_string().contains("relative"), "{e}");

        let greedy = "version = 1\n[limits]\ntimeout = \"30m\"\n";
        let e = check(greedy, &rules(&dirs, &ceiling), Check::Use).unwrap_err();
        assert!(e.to_string().contains("tenants.acme.max_limits"), "{e}");
    }

    #[test]
    fn a_stored_policy_names_existing_directories_by_their_real_path() {
        let allowed = tempfile::tempdir().unwrap();
        let allowed = std::fs::canonicalize(allowed.path()).unwrap();
        let real = allowed.join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, allowed.join("link")).unwrap();
        let dirs = [allowed.clone()];
        let ceiling = Limits::default();
        let grant = |p: &Path| {
            format!(
                "version = 1\n[[filesystem]]\nhost = {:?}\nguest = \"/d\"\nmode = \"ro\"\n",
                p.display().to_string()
            )
        };
        let e = check(
            &grant(&allowed.join("link")),
            &rules(&dirs, &ceiling),
            Check::Store,
        )
        .unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = check(
            &grant(&allowed.join("gone")),
            &rules(&dirs, &ceiling),
            Check::Store,
        )
        .unwrap_err();
        assert!(e.to_string().contains("cannot be granted"), "{e}");
        // In use, the filesystem is not asked: the runner opens beneath the root.
        assert!(
            check(
                &grant(&allowed.join("gone")),
                &rules(&dirs, &ceiling),
                Check::Use
            )
            .is_ok()
        );
    }
}
