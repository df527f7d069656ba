//! Policy text → [`Policy`], with errors that name the field.

use super::{
    EnvValue, FsRule, MAX_MEMORY_BYTES, MAX_OUTPUT_BYTES, MAX_RESULT_BYTES, MAX_TIMEOUT_MS,
    MAX_WRITE_BYTES, MIN_MEMORY_BYTES, Mode, Policy, PolicyError,
};
use airlock_guest::grants::{HttpGrant, HttpRule, Limits};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use toml::{Table, Value};

fn field(path: &str, message: impl Into<String>) -> PolicyError {
    PolicyError::Field {
        field: path.to_string(),
        message: message.into(),
    }
}

fn kind(v: &Value) -> &'static str {
    v.type_str()
}

/// Parse and validate policy text. `base` resolves relative host paths.
///
/// # Errors
/// [`PolicyError`] for the first problem found.
pub fn parse(text: &str, base: &Path) -> Result<Policy, PolicyError> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
        PolicyError::Syntax {
            line,
            column,
            message: e.message().to_string(),
        }
    })?;
    check_keys(
        &table,
        "",
        &["version", "limits", "filesystem", "env", "http", "models"],
    )?;

    match table.get("version") {
        None => return Err(field("version", "missing; write `version = 1` at the top")),
        Some(Value::Integer(1)) => {}
        Some(v) => return Err(field("version", format!("expected 1, got {v}"))),
    }

    let mut policy = Policy::default();
    if let Some(v) = table.get("limits") {
        policy.limits = limits(v)?;
    }
    if let Some(v) = table.get("filesystem") {
        policy.filesystem = filesystem(v, base)?;
    }
    if let Some(v) = table.get("env") {
        policy.env = env(v)?;
    }
    if let Some(v) = table.get("http") {
        policy.http = http(v)?;
    }
    if let Some(v) = table.get("models") {
        policy.models = models(v, base)?;
    }
    Ok(policy)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn check_keys(t: &Table, prefix: &str, allowed: &[&str]) -> Result<(), PolicyError> {
    for k in t.keys() {
        if !allowed.contains(&k.as_str()) {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            return Err(field(
                &path,
                format!("unknown field; expected one of {allowed:?}"),
            ));
        }
    }
    Ok(())
}

fn table<'a>(v: &'a Value, path: &str) -> Result<&'a Table, PolicyError> {
    v.as_table()
        .ok_or_else(|| field(path, format!("expected a table, got a {}", kind(v))))
}

fn limits(v: &Value) -> Result<Limits, PolicyError> {
    limits_over(v, Limits::default())
}

/// A `[limits]`-shaped table over `base` (keys it leaves out keep `base`'s
/// value), with the same units and ranges as a policy's; errors name the
/// field as `limits.<key>`.
pub fn limits_over(v: &Value, base: Limits) -> Result<Limits, PolicyError> {
    let t = table(v, "limits")?;
    check_keys(
        t,
        "limits",
        &[
            "memory",
            "fuel",
            "timeout",
            "max_output",
            "max_result",
            "max_write",
        ],
    )?;
    let mut l = base;
    if let Some(v) = t.get("memory") {
        l.memory_bytes = size(v, "limits.memory")?;
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&l.memory_bytes) {
            return Err(field(
                "limits.memory",
                format!(
                    "must be between 1 MiB and 4 GiB, got {} bytes",
                    l.memory_bytes
                ),
            ));
        }
    }
    if let Some(v) = t.get("fuel") {
        l.fuel = match v {
            Value::Integer(n) if *n > 0 => *n as u64,
            other => {
                return Err(field(
                    "limits.fuel",
                    format!("expected a positive integer, got {other}"),
                ));
            }
        };
    }
    if let Some(v) = t.get("timeout") {
        l.timeout_ms = duration_ms(v, "limits.timeout")?;
        if !(1..=MAX_TIMEOUT_MS).contains(&l.timeout_ms) {
            return Err(field("limits.timeout", "must be between 1ms and 1h"));
        }
    }
    if let Some(v) = t.get("max_output") {
        l.max_output_bytes = size(v, "limits.max_output")?;
        if !(1..=MAX_OUTPUT_BYTES).contains(&l.max_output_bytes) {
            return Err(field(
                "limits.max_output",
                "must be between 1 byte and 64 MiB",
            ));
        }
    }
    if let Some(v) = t.get("max_write") {
        l.max_write_bytes = size(v, "limits.max_write")?;
        if l.max_write_bytes > MAX_WRITE_BYTES {
            return Err(field("limits.max_write", "must be at most 4 GiB"));
        }
    }
    if let Some(v) = t.get("max_result") {
        l.max_result_bytes = size(v, "limits.max_result")?;
        if !(1..=MAX_RESULT_BYTES).contains(&l.max_result_bytes) {
            return Err(field(
                "limits.max_result",
                "must be between 1 byte and 16 MiB",
            ));
        }
    }
    Ok(l)
}

/// `1048576`, `"64 MiB"`, `"512KiB"`, `"1GiB"`, `"100 B"`.
pub fn size(v: &Value, path: &str) -> Result<u64, PolicyError> {
    with_unit(
        v,
        path,
        "size",
        "\"64 MiB\"",
        &[
            ("", 1),
            ("B", 1),
            ("KiB", 1 << 10),
            ("MiB", 1 << 20),
            ("GiB", 1 << 30),
        ],
    )
}

/// `"500ms"`, `"10s"`, `"2m"`, or integer milliseconds.
fn duration_ms(v: &Value, path: &str) -> Result<u64, PolicyError> {
    with_unit(
        v,
        path,
        "duration",
        "\"10s\"",
        &[("ms", 1), ("s", 1000), ("m", 60_000)],
    )
}

/// A positive integer, or a string `<n><unit>` with one of `units` (name, multiplier).
fn with_unit(
    v: &Value,
    path: &str,
    what: &str,
    example: &str,
    units: &[(&str, u64)],
) -> Result<u64, PolicyError> {
    match v {
        Value::Integer(n) if *n > 0 => Ok(*n as u64),
        Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| field(path, format!("expected a {what} like {example}, got {s:?}")))?;
            let unit = unit.trim();
            let mult = units
                .iter()
                .find(|(u, _)| *u == unit)
                .map(|(_, m)| *m)
                .ok_or_else(|| {
                    let names: Vec<&str> = units
                        .iter()
                        .map(|(u, _)| *u)
                        .filter(|u| !u.is_empty())
                        .collect();
                    field(
                        path,
                        format!("unknown unit {unit:?}; use one of {}", names.join(", ")),
                    )
                })?;
            n.checked_mul(mult).ok_or_else(|| field(path, "too large"))
        }
        other => Err(field(
            path,
            format!(
                "expected a {what} (a positive integer or a string like {example}), got {other}"
            ),
        )),
    }
}

/// Whether `name` may name a model: what a component passes to
/// `load-by-name` (1-64 of `A-Z a-z 0-9 . _ -`, not starting with `.`).
pub fn valid_model_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `[models]`: `name = "directory"` (relative to `base`).
fn models(v: &Value, base: &Path) -> Result<BTreeMap<String, PathBuf>, PolicyError> {
    let t = table(v, "models")?;
    let mut out = BTreeMap::new();
    for (name, v) in t {
        let p = format!("models.{name}");
        if !valid_model_name(name) {
            return Err(field(
                &p,
                "a model name is 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'",
            ));
        }
        let Value::String(dir) = v else {
            return Err(field(
                &p,
                format!(
                    "expected the model's directory as a string, got a {}",
                    kind(v)
                ),
            ));
        };
        if dir.is_empty() {
            return Err(field(&p, "must not be empty"));
        }
        if Path::new(dir)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(field(&p, "must not contain `..`"));
        }
        out.insert(name.clone(), base.join(dir));
    }
    Ok(out)
}

fn filesystem(v: &Value, base: &Path) -> Result<Vec<FsRule>, PolicyError> {
    let arr = v.as_array().ok_or_else(|| {
        field(
            "filesystem",
            format!(
                "expected an array of tables ([[filesystem]]), got a {}",
                kind(v)
            ),
        )
    })?;
    let mut out: Vec<FsRule> = Vec::new();
    for (i, item) in arr.iter().enumerate() {
        let p = format!("filesystem[{i}]");
        let t = table(item, &p)?;
        check_keys(t, &p, &["host", "volume", "guest", "mode"])?;
        let get_str = |k: &str| -> Result<&str, PolicyError> {
            match t.get(k) {
                Some(Value::String(s)) => Ok(s.as_str()),
                Some(other) => Err(field(
                    &format!("{p}.{k}"),
                    format!("expected a string, got {other}"),
                )),
                None => Err(field(&format!("{p}.{k}"), "missing required field")),
            }
        };
        let (host, volume) = match (t.contains_key("host"), t.contains_key("volume")) {
            (true, false) => (get_str("host")?, None),
            (false, true) => {
                let name = get_str("volume")?;
                if !valid_volume_name(name) {
                    return Err(field(
                        &format!("{p}.volume"),
                        format!("expected 1-32 characters of a-z, 0-9, '-' and '_', got {name:?}"),
                    ));
                }
                ("", Some(name.to_string()))
            }
            _ => {
                return Err(field(
                    &format!("{p}.host"),
                    "give exactly one of `host` (a host directory) and `volume` (a state volume of the service)",
                ));
            }
        };
        if host.is_empty() && volume.is_none() {
            return Err(field(&format!("{p}.host"), "must not be empty"));
        }
        // `..` lets a path that names one directory today name another
        // tomorrow (`<allowed>/a/x/../../etc` once `x` is swapped); grants
        // are opened component by component beneath their root, with no
        // `..` and no symlinks.
        if Path::new(host)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(field(&format!("{p}.host"), "must not contain `..`"));
        }
        let guest = get_str("guest")?;
        if !guest.starts_with('/') {
            return Err(field(
                &format!("{p}.guest"),
                format!("must be an absolute path, got {guest:?}"),
            ));
        }
        if Path::new(guest)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(field(&format!("{p}.guest"), "must not contain `..`"));
        }
        let mode = match get_str("mode")? {
            "ro" => Mode::Ro,
            "rw" => Mode::Rw,
            other => {
                return Err(field(
                    &format!("{p}.mode"),
                    format!("expected \"ro\" or \"rw\", got {other:?}"),
                ));
            }
        };
        let guest = guest.trim_end_matches('/').to_string();
        let guest = if guest.is_empty() {
            "/".to_string()
        } else {
            guest
        };
        if out.iter().any(|r| r.guest == guest) {
            return Err(field(
                &format!("{p}.guest"),
                format!("{guest} is granted twice"),
            ));
        }
        out.push(FsRule {
            host: if volume.is_some() {
                PathBuf::new()
            } else {
                lexical(&base.join(host))
            },
            volume,
            guest,
            mode,
        });
    }
    Ok(out)
}

/// A state volume's name: 1-32 of a-z, 0-9, `-`, `_`.
pub fn valid_volume_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `path` without `.` components or a trailing `/` (no filesystem access;
/// the caller refused `..`).
fn lexical(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

fn env(v: &Value) -> Result<BTreeMap<String, EnvValue>, PolicyError> {
    let t = table(v, "env")?;
    let mut out = BTreeMap::new();
    for (k, v) in t {
        let p = format!("env.{k}");
        let valid = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(field(
                &p,
                "environment keys are letters, digits and `_`, not starting with a digit",
            ));
        }
        match v {
            Value::String(s) => {
                out.insert(k.clone(), EnvValue::Plain(s.clone()));
            }
            Value::Table(t) => match (t.get("secret"), t.len()) {
                (Some(Value::String(s)), 1) => {
                    out.insert(k.clone(), EnvValue::Secret(s.clone()));
                }
                _ => {
                    return Err(field(
                        &p,
                        "expected a string, or { secret = \"...\" } for a value no route shows",
                    ));
                }
            },
            other => return Err(field(&p, format!("expected a string value, got {other}"))),
        }
    }
    Ok(out)
}

fn http(v: &Value) -> Result<HttpGrant, PolicyError> {
    let t = table(v, "http")?;
    check_keys(t, "http", &["allow", "deny"])?;
    let rules = |k: &str| -> Result<Vec<HttpRule>, PolicyError> {
        let Some(v) = t.get(k) else { return Ok(vec![]) };
        let arr = v.as_array().ok_or_else(|| {
            field(
                &format!("http.{k}"),
                format!("expected an array of strings, got a {}", kind(v)),
            )
        })?;
        arr.iter()
            .enumerate()
            .map(|(i, r)| {
                let p = format!("http.{k}[{i}]");
                let s = r
                    .as_str()
                    .ok_or_else(|| field(&p, format!("expected a string, got {r}")))?;
                HttpRule::parse(s).map_err(|e| field(&p, e.to_string()))
            })
            .collect()
    };
    Ok(HttpGrant {
        allow: rules("allow")?,
        deny: rules("deny")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Policy, PolicyError> {
        parse(text, Path::new("/base"))
    }

    fn err_field(text: &str) -> String {
        match p(text) {
            Err(PolicyError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn full_policy() {
        let pol = p(r#"
            version = 1
            [limits]
            memory = "32 MiB"
            fuel = 5000
            timeout = "2s"
            max_output = "4KiB"
            [[filesystem]]
            host = "data"
            guest = "/data/"
            mode = "ro"
            [[filesystem]]
            host = "/tmp/out"
            guest = "/out"
            mode = "rw"
            [env]
            API_BASE = "https://x"
            [http]
            allow = ["https://api.example.com", "*.github.com"]
            deny = ["evil.github.com"]
        "#)
        .unwrap();
        assert_eq!(
            pol.limits,
            Limits {
                memory_bytes: 32 << 20,
                fuel: 5000,
                timeout_ms: 2000,
                max_output_bytes: 4096,
                max_result_bytes: 1 << 20,
                max_write_bytes: 64 << 20,
            }
        );
        assert_eq!(
            pol.filesystem[0],
            FsRule {
                host: "/base/data".into(),
                volume: None,
                guest: "/data".into(),
                mode: Mode::Ro
            }
        );
        assert_eq!(pol.filesystem[1].mode, Mode::Rw);
        assert_eq!(pol.env["API_BASE"], EnvValue::Plain("https://x".into()));
        assert_eq!(pol.http.allow.len(), 2);
        let g = pol.grant_set();
        assert!(!g.dirs[0].writable && g.dirs[1].writable);
    }

    #[test]
    fn empty_policy_grants_nothing() {
        let pol = p("version = 1").unwrap();
        assert_eq!(pol, Policy::default());
        let g = pol.grant_set();
        assert!(g.dirs.is_empty() && g.env.is_empty() && g.http.allow.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err_field(""), "version");
        assert_eq!(err_field("version = 2"), "version");
        assert_eq!(err_field("version = 1\nbogus = 3"), "bogus");
        assert_eq!(
            err_field("version = 1\n[limits]\nmemory = \"12 XB\""),
            "limits.memory"
        );
        assert_eq!(
            err_field("version = 1\n[limits]\nmemory = \"8 GiB\""),
            "limits.memory"
        );
        assert_eq!(err_field("version = 1\n[limits]\nfuel = -1"), "limits.fuel");
        assert_eq!(
            err_field("version = 1\n[limits]\ntimeout = \"3h\""),
            "limits.timeout"
        );
        assert_eq!(
            err_field("version = 1\n[limits]\nspeed = 1"),
            "limits.speed"
        );
        assert_eq!(
            err_field("version = 1\n[[filesystem]]\nhost=\"a\"\nguest=\"/a\"\nmode=\"x\""),
            "filesystem[0].mode"
        );
        assert_eq!(
            err_field("version = 1\n[[filesystem]]\nhost=\"a\"\nguest=\"a\"\nmode=\"ro\""),
            "filesystem[0].guest"
        );
        assert_eq!(
            err_field("version = 1\n[[filesystem]]\nhost=\"a\"\nguest=\"/a/../b\"\nmode=\"ro\""),
            "filesystem[0].guest"
        );
        assert_eq!(
            err_field("version = 1\n[[filesystem]]\nguest=\"/a\"\nmode=\"ro\""),
            "filesystem[0].host"
        );
        // A state volume, by name; never both a host path and a volume.
        let v = p("version = 1\n[[filesystem]]\nvolume=\"notes\"\nguest=\"/state\"\nmode=\"rw\"")
            .unwrap();
        assert_eq!(v.filesystem[0].volume.as_deref(), Some("notes"));
        assert!(v.filesystem[0].host.as_os_str().is_empty());
        assert_eq!(
            err_field(
                "version = 1\n[[filesystem]]\nvolume=\"n\"\nhost=\"a\"\nguest=\"/a\"\nmode=\"ro\""
            ),
            "filesystem[0].host"
        );
        for bad in ["", "../x", "a/b", "UPPER", &"x".repeat(33)] {
            assert_eq!(
                err_field(&format!(
                    "version = 1\n[[filesystem]]\nvolume={bad:?}\nguest=\"/a\"\nmode=\"ro\""
                )),
                "filesystem[0].volume",
                "{bad:?}"
            );
        }
        assert_eq!(
            err_field(
                "version = 1\n[[filesystem]]\nhost=\"a\"\nguest=\"/a\"\nmode=\"ro\"\n[[filesystem]]\nhost=\"b\"\nguest=\"/a\"\nmode=\"rw\""
            ),
            "filesystem[1].guest"
        );
        assert_eq!(err_field("version = 1\n[env]\n\"1X\" = \"v\""), "env.1X");
        assert_eq!(err_field("version = 1\n[env]\nX = 3"), "env.X");
        assert_eq!(
            err_field("version = 1\n[http]\nallow = [\"ftp://x\"]"),
            "http.allow[0]"
        );
        assert_eq!(
            err_field("version = 1\n[http]\nallow = \"x\""),
            "http.allow"
        );
        assert_eq!(
            err_field("version = 1\n[http]\ndeny = [\"x:0\"]"),
            "http.deny[0]"
        );
        assert_eq!(err_field("version = 1\nfilesystem = 3"), "filesystem");
    }

    #[test]
    fn syntax_errors_have_positions() {
        match p("version = 1\n[limits\n") {
            Err(PolicyError::Syntax { line, .. }) => assert_eq!(line, 2),
            other => panic!("{other:?}"),
        }
    }

    /// Review item 7: env values such as API keys can be secret: the call
    /// gets them, no serialization of the policy or its text shows them.
    #[test]
    fn secret_env_values_reach_the_call_and_nothing_else() {
        let text =
            "version = 1\n# keys\n[env]\nAPI_KEY = { secret = \"sk-live-123\" }\nMODE = \"fast\"\n";
        let pol = p(text).unwrap();
        assert_eq!(pol.grant_set().env["API_KEY"], "sk-live-123");
        let shown = serde_json::to_string(&pol).unwrap();
        assert!(!shown.contains("sk-live"), "{shown}");
        assert!(
            shown.contains(&super::super::secret_digest("sk-live-123")),
            "{shown}"
        );
        assert!(shown.contains("\"fast\""), "{shown}");
        let redacted = super::super::redact_text(text);
        assert!(!redacted.contains("sk-live"), "{redacted}");
        assert!(
            redacted.contains("secret_sha256") && redacted.contains("# keys"),
            "{redacted}"
        );
        assert_eq!(
            err_field("version = 1\n[env]\nK = { secret = 3 }\n"),
            "env.K"
        );
        assert_eq!(
            err_field("version = 1\n[env]\nK = { secret = \"a\", other = \"b\" }\n"),
            "env.K"
        );
    }

    #[test]
    fn models_are_granted_by_name_and_refused_outside_the_roots() {
        let pol = p("version = 1\n[models]\nminilm = \"weights/all-MiniLM-L6-v2\"\n\"e5.small_v2\" = \"/srv/e5\"").unwrap();
        assert_eq!(
            pol.models["minilm"],
            Path::new("/base/weights/all-MiniLM-L6-v2")
        );
        let g = pol.grant_set();
        assert_eq!(g.models["e5.small_v2"].dir, Path::new("/srv/e5"));
        assert_eq!(g.models["e5.small_v2"].root, Path::new("/"));
        // A tenant's roots: a model outside them names its field.
        let e = pol
            .grant_set_beneath(&[PathBuf::from("/base")], &BTreeMap::new())
            .unwrap_err();
        assert!(
            matches!(&e, PolicyError::Field { field, .. } if field == "models.e5.small_v2"),
            "{e:?}"
        );
        assert_eq!(err_field("version = 1\nmodels = 3"), "models");
        assert_eq!(err_field("version = 1\n[models]\nm = 3"), "models.m");
        assert_eq!(err_field("version = 1\n[models]\nm = \"\""), "models.m");
        assert_eq!(
            err_field("version = 1\n[models]\nm = \"a/../../etc\""),
            "models.m"
        );
        assert_eq!(
            err_field("version = 1\n[models]\n\".hidden\" = \"m\""),
            "models..hidden"
        );
        assert_eq!(
            err_field("version = 1\n[models]\n\"a/b\" = \"m\""),
            "models.a/b"
        );
        assert!(!valid_model_name(&"x".repeat(65)));
        assert!(valid_model_name("all-MiniLM-L6-v2"));
    }
}
