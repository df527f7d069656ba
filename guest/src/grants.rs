//! The grant set: exactly what one call may do. Deny by default: an empty
//! grant set allows no files, no environment, no HTTP, no sockets.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

/// Default limits, used when a policy says nothing. Kept in one place so a
/// reviewer reads them here.
pub mod defaults {
    /// 64 MiB of linear memory (all memories together).
    pub const MEMORY_BYTES: u64 = 64 << 20;
    /// One billion units of fuel (roughly a billion simple wasm instructions).
    pub const FUEL: u64 = 1_000_000_000;
    /// Ten seconds of wall-clock time.
    pub const TIMEOUT_MS: u64 = 10_000;
    /// One MiB each for stdout and stderr.
    pub const MAX_OUTPUT_BYTES: u64 = 1 << 20;
    /// One MiB for the result, as JSON.
    pub const MAX_RESULT_BYTES: u64 = 1 << 20;
    /// 64 MiB written into read-write grants per call.
    pub const MAX_WRITE_BYTES: u64 = 64 << 20;
}

/// A directory the call may see.
///
/// The runner opens `root` and then `host_path` beneath it, one component
/// at a time, refusing `..` and symbolic links (`openat2` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), at call time: whatever is
/// renamed or swapped inside `root` between the policy check and the call,
/// the directory opened is inside `root`, or the call fails with a `grant`
/// error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirGrant {
    /// The directory the grant may not leave (a tenant's allowed directory
    /// in the service; `/` for `airlock run`). Absolute, canonical.
    pub root: PathBuf,
    /// Directory on the machine running the call: absolute, inside `root`,
    /// without `.`, `..` or symbolic links.
    pub host_path: PathBuf,
    /// Path the component sees (e.g. `/data`).
    pub guest_path: String,
    /// `false`: read-only; `true`: read-write.
    pub writable: bool,
    /// In a microVM: the host directory this grant was made for, when
    /// `root` and `host_path` were pointed at the guest's mount of it (a
    /// virtio-fs share, or the weights image). Errors and audit events
    /// name this, so a call says the same in either wall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<PathBuf>,
    /// In a microVM: why the host could not open the directory for the
    /// call (it is not shared); opening the grant fails with this, where
    /// and as the process wall's open fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl DirGrant {
    /// The host directory the grant names (see [`DirGrant::origin`]).
    pub fn named(&self) -> &std::path::Path {
        self.origin.as_deref().unwrap_or(&self.host_path)
    }

    /// Open the granted directory (see the type's docs): `host_path`
    /// beneath `root`, never through `..` or a link. The error is the
    /// `grant` failure a call reports, naming the directory.
    ///
    /// # Errors
    /// The directory is gone, not a directory, or not beneath its root.
    pub fn open(&self) -> Result<std::os::fd::OwnedFd, String> {
        if let Some(why) = &self.refused {
            return Err(why.clone());
        }
        open_beneath(&self.root, &self.host_path).map_err(|e| {
            format!(
                "directory {} (granted as {}) cannot be opened beneath {}: {e}",
                self.named().display(),
                self.guest_path,
                self.root.display()
            )
        })
    }
}

/// Open directory `path` beneath `root`: `root` is opened as given (it is
/// the operator's), then `path`'s components below it with `openat2`,
/// refusing `..`, symbolic links and magic links and anything that would
/// resolve outside `root`, so no rename or symlink swapped in by another
/// call can move the grant elsewhere.
fn open_beneath(
    root: &std::path::Path,
    path: &std::path::Path,
) -> Result<std::os::fd::OwnedFd, String> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
    use nix::sys::stat::Mode;
    let rel = path
        .strip_prefix(root)
        .map_err(|_| "it is not inside its root".to_string())?;
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let root_fd =
        open(root, dir_flags, Mode::empty()).map_err(|e| format!("opening the root: {e}"))?;
    let rel = if rel.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new().flags(dir_flags).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    openat2(&root_fd, rel, how).map_err(|e| match e {
        nix::errno::Errno::ELOOP => {
            "a symbolic link is in the way (grants never follow links)".into()
        }
        nix::errno::Errno::EXDEV => "it resolves outside its root".into(),
        nix::errno::Errno::ENOTDIR => "it is not a directory".into(),
        e => e.desc().to_string(),
    })
}

/// One HTTP allow or deny rule: `scheme://host:port`, each part optional but host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRule {
    /// `http` or `https`; `None` matches both.
    pub scheme: Option<String>,
    /// Exact host (`api.example.com`, `127.0.0.1`) or `*.example.com`
    /// (any subdomain, not the apex), or `*` for any host.
    pub host: String,
    /// Port; `None` matches the scheme's default port only.
    pub port: Option<u16>,
}

/// Problems with an HTTP rule's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The text is empty.
    #[error("The rule is empty.")]
    Empty,
    /// Unsupported scheme.
    #[error("The scheme {0:?} is not supported; use http or https.")]
    Scheme(String),
    /// The port is not a number in 1..=65535.
    #[error("The port {0:?} is not a number from 1 to 65535.")]
    Port(String),
    /// The host part is malformed.
    #[error("The host {0:?} is not valid: {1}.")]
    Host(String, &'static str),
    /// Paths are not part of a rule.
    #[error("Rules name a scheme, host and port only; remove the path {0:?}.")]
    Path(String),
}

impl HttpRule {
    /// Parse `https://api.example.com:8443`, `*.example.com`, `127.0.0.1:8080`, `*`.
    ///
    /// # Errors
    /// A [`RuleError`] saying which part is wrong.
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(RuleError::Empty);
        }
        let (scheme, rest) = match text.split_once("://") {
            Some((s, r)) => {
                let s = s.to_ascii_lowercase();
                if s != "http" && s != "https" {
                    return Err(RuleError::Scheme(s));
                }
                (Some(s), r)
            }
            None => (None, text),
        };
        let rest = match rest.find('/') {
            Some(i) if rest[i..] != *"/" => return Err(RuleError::Path(rest[i..].to_string())),
            Some(i) => &rest[..i],
            None => rest,
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
                let port: u16 = p.parse().map_err(|_| RuleError::Port(p.to_string()))?;
                if port == 0 {
                    return Err(RuleError::Port(p.to_string()));
                }
                (h, Some(port))
            }
            _ => (rest, None),
        };
        let host = host.to_ascii_lowercase();
        if host.is_empty() {
            return Err(RuleError::Host(host, "it is empty"));
        }
        // An IP literal in any spelling the URL standard accepts (`127.1`,
        // `0x7f000001`, `[::ffff:127.0.0.1]`) is kept in one form, so a
        // rule matches a request however either spells the address.
        if let Some(ip) = literal_ip(&host) {
            return Ok(Self {
                scheme,
                host: ip_text(ip),
                port,
            });
        }
        if host != "*" {
            let bare = host.strip_prefix("*.").unwrap_or(&host);
            if bare.is_empty() || bare.contains('*') {
                return Err(RuleError::Host(
                    host,
                    "a wildcard may only be a leading `*.`",
                ));
            }
            if !bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'))
            {
                return Err(RuleError::Host(
                    host,
                    "only letters, digits, `.`, `-` are allowed",
                ));
            }
        }
        Ok(Self { scheme, host, port })
    }

    /// The address this rule names, if its host is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        literal_ip(&self.host)
    }

    /// As a deny rule: like [`matches`](Self::matches), but a rule without
    /// a port denies every port (`deny = ["evil.example"]` must not let
    /// `evil.example:8080` through).
    pub fn denies(&self, scheme: &str, host: &str, port: u16) -> bool {
        let port_free = Self {
            port: Some(port),
            ..self.clone()
        };
        match self.port {
            Some(_) => self.matches(scheme, host, port),
            None => port_free.matches(scheme, host, port),
        }
    }

    /// Does this rule match a request to `scheme://host:port`? `host` as
    /// [`normalize_host`] gives it.
    pub fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        if let Some(s) = &self.scheme
            && s != scheme
        {
            return false;
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        if self.port.unwrap_or(default_port) != port && self.host != "*" {
            return false;
        }
        if self.host == "*" {
            return self.port.is_none_or(|p| p == port);
        }
        let host = host.to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        match self.host.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => host == self.host,
        }
    }
}

impl std::fmt::Display for HttpRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(s) = &self.scheme {
            write!(f, "{s}://")?;
        }
        write!(f, "{}", self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Outgoing HTTP rules. Deny rules win over allow rules; no rule → denied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpGrant {
    /// Requests matching one of these may go out...
    pub allow: Vec<HttpRule>,
    /// ...unless they match one of these.
    pub deny: Vec<HttpRule>,
}

/// The result of checking one request against [`HttpGrant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpVerdict {
    /// Allowed by this rule.
    Allowed(String),
    /// Denied, with the reason.
    Denied(String),
}

impl HttpGrant {
    /// Check a request target by its name (any spelling of an IP literal is
    /// read as that address). Deny rules win.
    pub fn check(&self, scheme: &str, host: &str, port: u16) -> HttpVerdict {
        let host = normalize_host(host);
        if let Some(r) = self.deny.iter().find(|r| r.denies(scheme, &host, port)) {
            return HttpVerdict::Denied(format!("matches deny rule {r}"));
        }
        match self.allow.iter().find(|r| r.matches(scheme, &host, port)) {
            Some(r) => HttpVerdict::Allowed(format!("matches allow rule {r}")),
            None => HttpVerdict::Denied("no allow rule matches".to_string()),
        }
    }

    /// Check one address a request's host resolved to, after [`check`]
    /// allowed the name and before connecting (the caller connects to this
    /// very address, never resolving again). Refused: an address a deny
    /// rule names, and a special-purpose address ([`special_purpose`]:
    /// loopback, private, link-local, CGNAT, multicast, unspecified, and
    /// their IPv4-mapped forms) unless an allow rule that matches the
    /// request names that address itself.
    ///
    /// [`check`]: HttpGrant::check
    pub fn check_address(&self, scheme: &str, host: &str, port: u16, ip: IpAddr) -> HttpVerdict {
        let ip = unmap(ip);
        let text = ip_text(ip);
        if let Some(r) = self
            .deny
            .iter()
            .find(|r| r.ip() == Some(ip) && r.denies(scheme, &text, port))
        {
            return HttpVerdict::Denied(format!("resolves to {text}, which deny rule {r} names"));
        }
        let Some(kind) = special_purpose(ip) else {
            return HttpVerdict::Allowed(format!("resolves to {text}"));
        };
        let host = normalize_host(host);
        match self
            .allow
            .iter()
            .find(|r| r.ip() == Some(ip) && r.matches(scheme, &host, port))
        {
            Some(r) => HttpVerdict::Allowed(format!(
                "resolves to {text} ({kind}), which allow rule {r} names"
            )),
            None => HttpVerdict::Denied(format!(
                "resolves to {text}, a {kind} address; only a rule naming {text} itself may reach it"
            )),
        }
    }
}

/// A request's host as rules compare it: lower case, no trailing dot, and
/// an IP literal in its one canonical form (IPv4 dotted, also for
/// IPv4-mapped IPv6; IPv6 bracketed) however it was spelled.
pub fn normalize_host(host: &str) -> String {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    match literal_ip(&h) {
        Some(ip) => ip_text(ip),
        None => h,
    }
}

/// The address an IP literal host names, read as the URL standard reads
/// hosts (`127.1`, `2130706433`, `0x7f000001`, `[::ffff:7f00:1]`).
fn literal_ip(host: &str) -> Option<IpAddr> {
    let h = host.trim_end_matches('.');
    // A bare IPv6 address (no brackets) also counts, as rules may give one.
    if let Ok(ip) = h.parse::<std::net::Ipv6Addr>() {
        return Some(unmap(IpAddr::V6(ip)));
    }
    match url::Host::parse(h).ok()? {
        url::Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => Some(unmap(IpAddr::V6(ip))),
        url::Host::Domain(_) => None,
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// What kind of special-purpose address `ip` is, if it is one a grant by
/// name must never reach: loopback, private (RFC 1918, fc00::/7),
/// link-local (169.254/16 with cloud metadata, fe80::/10), CGNAT
/// (100.64/10), multicast, unspecified, broadcast, and the IPv4-mapped
/// and -compatible forms of these.
pub fn special_purpose(ip: IpAddr) -> Option<&'static str> {
    match unmap(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared (CGNAT)")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if (seg[0] & 0xfe00) == 0xfc00 {
                Some("private")
            } else if (seg[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg[..6] == [0; 6] {
                // ::a.b.c.d (IPv4-compatible, deprecated): as its IPv4.
                let v4 = std::net::Ipv4Addr::from(((u32::from(seg[6])) << 16) | u32::from(seg[7]));
                special_purpose(IpAddr::V4(v4)).or(Some("IPv4-compatible"))
            } else {
                None
            }
        }
    }
}

/// Resource limits of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Total linear memory, in bytes.
    pub memory_bytes: u64,
    /// Fuel (CPU budget); the call traps when it runs out.
    pub fuel: u64,
    /// Wall-clock timeout in milliseconds.
    pub timeout_ms: u64,
    /// Cap on captured stdout and on captured stderr, each, in bytes.
    pub max_output_bytes: u64,
    /// Cap on the result, serialized as JSON, in bytes.
    #[serde(default = "default_max_result")]
    pub max_result_bytes: u64,
    /// Cap on the bytes one call writes into its read-write grants.
    #[serde(default = "default_max_write")]
    pub max_write_bytes: u64,
}

fn default_max_result() -> u64 {
    defaults::MAX_RESULT_BYTES
}

fn default_max_write() -> u64 {
    defaults::MAX_WRITE_BYTES
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: defaults::MEMORY_BYTES,
            fuel: defaults::FUEL,
            timeout_ms: defaults::TIMEOUT_MS,
            max_output_bytes: defaults::MAX_OUTPUT_BYTES,
            max_result_bytes: defaults::MAX_RESULT_BYTES,
            max_write_bytes: defaults::MAX_WRITE_BYTES,
        }
    }
}

/// Everything one call may do. `GrantSet::default()` grants nothing but the
/// default limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSet {
    /// Preopened directories.
    #[serde(default)]
    pub dirs: Vec<DirGrant>,
    /// Environment variables the component sees (values from the operator).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Outgoing HTTP.
    #[serde(default)]
    pub http: HttpGrant,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// Models the call may run through `wasi:nn`, by the name it loads
    /// them by (`load-by-name`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, ModelGrant>,
}

/// A model granted by name: a directory holding `config.json` and
/// `model.safetensors` (see `airlock_nn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelGrant {
    /// The directory the grant may not leave (as [`DirGrant::root`]).
    pub root: PathBuf,
    /// The model's directory on the machine running the call: absolute,
    /// inside `root`, without `.`, `..` or symbolic links.
    pub dir: PathBuf,
    /// In a microVM: the host directory the grant was made for, when `dir`
    /// points into the guest's weights mount. Audit events name this, so a
    /// call says the same in either wall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<PathBuf>,
}

impl ModelGrant {
    /// The host directory the grant names.
    pub fn named(&self) -> &std::path::Path {
        self.origin.as_deref().unwrap_or(&self.dir)
    }

    /// Open the model's directory beneath its root, never through `..` or
    /// a link (as [`DirGrant::open`]).
    ///
    /// # Errors
    /// The directory is gone, not a directory, or not beneath its root.
    pub fn open(&self) -> Result<std::os::fd::OwnedFd, String> {
        open_beneath(&self.root, &self.dir).map_err(|e| {
            format!(
                "model directory {} cannot be opened beneath {}: {e}",
                self.named().display(),
                self.root.display()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(allow: &[&str], deny: &[&str]) -> HttpGrant {
        HttpGrant {
            allow: allow.iter().map(|r| HttpRule::parse(r).unwrap()).collect(),
            deny: deny.iter().map(|r| HttpRule::parse(r).unwrap()).collect(),
        }
    }

    #[test]
    fn parses_rules() {
        let r = HttpRule::parse("https://API.example.com:8443").unwrap();
        assert_eq!(
            r,
            HttpRule {
                scheme: Some("https".into()),
                host: "api.example.com".into(),
                port: Some(8443)
            }
        );
        assert_eq!(
            HttpRule::parse("*.example.com").unwrap().to_string(),
            "*.example.com"
        );
        assert_eq!(HttpRule::parse("127.0.0.1:8080").unwrap().port, Some(8080));
        assert_eq!(
            HttpRule::parse("ftp://x"),
            Err(RuleError::Scheme("ftp".into()))
        );
        assert_eq!(
            HttpRule::parse("x:99999"),
            Err(RuleError::Port("99999".into()))
        );
        assert_eq!(HttpRule::parse("x:0"), Err(RuleError::Port("0".into())));
        assert!(matches!(
            HttpRule::parse("a.*.com"),
            Err(RuleError::Host(..))
        ));
        assert!(matches!(
            HttpRule::parse("http://x/path"),
            Err(RuleError::Path(_))
        ));
        assert_eq!(HttpRule::parse(""), Err(RuleError::Empty));
        assert!(HttpRule::parse("http://x/").is_ok());
    }

    #[test]
    fn matching_rules() {
        let g = grant(
            &[
                "https://api.example.com",
                "*.github.com",
                "http://127.0.0.1:8080",
            ],
            &["evil.github.com"],
        );
        assert!(matches!(
            g.check("https", "api.example.com", 443),
            HttpVerdict::Allowed(_)
        ));
        assert!(
            matches!(
                g.check("http", "api.example.com", 80),
                HttpVerdict::Denied(_)
            ),
            "scheme pinned"
        );
        assert!(
            matches!(
                g.check("https", "api.example.com", 8443),
                HttpVerdict::Denied(_)
            ),
            "port pinned to default"
        );
        assert!(matches!(
            g.check("https", "raw.github.com", 443),
            HttpVerdict::Allowed(_)
        ));
        assert!(matches!(
            g.check("http", "a.b.github.com", 80),
            HttpVerdict::Allowed(_)
        ));
        assert!(
            matches!(g.check("https", "github.com", 443), HttpVerdict::Denied(_)),
            "apex not covered by *."
        );
        assert!(matches!(
            g.check("https", "evilgithub.com", 443),
            HttpVerdict::Denied(_)
        ));
        assert!(
            matches!(g.check("https", "evil.github.com", 443), HttpVerdict::Denied(r) if r.contains("deny rule"))
        );
        assert!(matches!(
            g.check("http", "127.0.0.1", 8080),
            HttpVerdict::Allowed(_)
        ));
        assert!(matches!(
            g.check("http", "127.0.0.1", 8081),
            HttpVerdict::Denied(_)
        ));
        assert!(
            matches!(HttpGrant::default().check("https", "x.com", 443), HttpVerdict::Denied(r) if r == "no allow rule matches")
        );
        let any = grant(&["*"], &[]);
        assert!(matches!(
            any.check("http", "x", 1234),
            HttpVerdict::Allowed(_)
        ));
    }

    /// Review item 6: with `allow = ["*"]`, `deny = ["127.0.0.1"]` a tool
    /// reached 127.0.0.1 by other spellings of it.
    #[test]
    fn deny_rules_hold_for_every_spelling_of_an_address() {
        let g = grant(&["*"], &["127.0.0.1"]);
        for host in [
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "127.0.0.1.",
        ] {
            assert!(
                matches!(g.check("http", host, 80), HttpVerdict::Denied(r) if r.contains("deny rule")),
                "{host}"
            );
        }
        // A deny rule without a port denies every port.
        assert!(matches!(
            g.check("http", "127.1", 8080),
            HttpVerdict::Denied(_)
        ));
        assert!(matches!(
            grant(&["*"], &["evil.example"]).check("https", "evil.example", 8443),
            HttpVerdict::Denied(_)
        ));
        // A rule may be written in any spelling too.
        let g = grant(&["*"], &["2130706433"]);
        assert!(matches!(
            g.check("http", "127.0.0.1", 80),
            HttpVerdict::Denied(_)
        ));
        assert_eq!(
            HttpRule::parse("[::ffff:10.0.0.1]:81").unwrap().to_string(),
            "10.0.0.1:81"
        );
        // And a name that resolves to a denied address is denied at the
        // address check.
        let g = grant(&["*"], &["93.184.216.34"]);
        let ip: IpAddr = "93.184.216.34".parse().unwrap();
        assert!(matches!(
            g.check("http", "example.com", 80),
            HttpVerdict::Allowed(_)
        ));
        assert!(matches!(
            g.check_address("http", "example.com", 80, ip),
            HttpVerdict::Denied(r) if r.contains("deny rule")
        ));
    }

    /// Review item 5: a grant of `http://rebind.test:18081` reached another
    /// server on loopback once the name resolved to 127.0.0.1.
    #[test]
    fn names_never_reach_special_purpose_addresses() {
        let g = grant(
            &["http://rebind.test:18081", "http://127.0.0.1:8080", "*"],
            &[],
        );
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(
                matches!(
                    g.check_address("http", "rebind.test", 18081, ip),
                    HttpVerdict::Denied(r) if r.contains("only a rule naming")
                ),
                "{ip}"
            );
        }
        // Public addresses are fine for a name.
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        assert!(matches!(
            g.check_address("http", "rebind.test", 18081, public),
            HttpVerdict::Allowed(_)
        ));
        // A rule naming the loopback literal reaches it, on its port only;
        // `*` names nothing.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(matches!(
            g.check_address("http", "127.0.0.1", 8080, lo),
            HttpVerdict::Allowed(_)
        ));
        assert!(matches!(
            g.check_address("http", "127.0.0.1", 8420, lo),
            HttpVerdict::Denied(_)
        ));
        assert!(matches!(
            grant(&["*"], &[]).check_address("http", "127.0.0.1", 80, lo),
            HttpVerdict::Denied(_)
        ));
    }
}
