//! The grant set: exactly what one call may do. Deny by default: an empty
//! grant set allows no files, no environment, no HTTP, no sockets.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
}

/// A directory the call may see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirGrant {
    /// Directory on the machine running the call.
    pub host_path: PathBuf,
    /// Path the component sees (e.g. `/data`).
    pub guest_path: String,
    /// `false`: read-only; `true`: read-write.
    pub writable: bool,
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

    /// Does this rule match a request to `scheme://host:port`?
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
    /// Check a request target.
    pub fn check(&self, scheme: &str, host: &str, port: u16) -> HttpVerdict {
        if let Some(r) = self.deny.iter().find(|r| r.matches(scheme, host, port)) {
            return HttpVerdict::Denied(format!("matches deny rule {r}"));
        }
        match self.allow.iter().find(|r| r.matches(scheme, host, port)) {
            Some(r) => HttpVerdict::Allowed(format!("matches allow rule {r}")),
            None => HttpVerdict::Denied("no allow rule matches".to_string()),
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
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: defaults::MEMORY_BYTES,
            fuel: defaults::FUEL,
            timeout_ms: defaults::TIMEOUT_MS,
            max_output_bytes: defaults::MAX_OUTPUT_BYTES,
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
}
