//! What a component asks for: its imports, mapped to capability classes.

use serde::{Deserialize, Serialize};

/// A class of capability a security reviewer reasons about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapabilityClass {
    /// `wasi:filesystem/*`: files in preopened directories.
    Filesystem,
    /// `wasi:sockets/*`: raw TCP/UDP and name lookup (always denied by Airlock).
    Sockets,
    /// `wasi:http/outgoing-handler`: outgoing HTTP requests.
    HttpOutgoing,
    /// `wasi:http/types`: HTTP data types (no effect by itself).
    HttpTypes,
    /// `wasi:cli/environment`: environment variables, arguments, cwd.
    Environment,
    /// `wasi:cli/stdin|stdout|stderr|terminal-*`: standard streams (captured).
    Stdio,
    /// `wasi:cli/exit`: ending the call early.
    Exit,
    /// `wasi:clocks/*`: wall and monotonic clocks.
    Clocks,
    /// `wasi:random/*`: random numbers.
    Random,
    /// `wasi:io/*`: streams and polling (no effect by itself).
    Io,
    /// `wasi:nn/*`: machine-learning models the policy grants by name.
    Models,
    /// Anything Airlock does not provide: the component cannot be instantiated.
    Unsupported,
}

impl CapabilityClass {
    /// Classify one import name such as `wasi:filesystem/types@0.2.6`.
    pub fn of_import(name: &str) -> Self {
        let (pkg, iface) = match name.split_once('/') {
            Some((p, i)) => (p, i.split('@').next().unwrap_or(i)),
            None => (name, ""),
        };
        match (pkg, iface) {
            ("wasi:filesystem", _) => Self::Filesystem,
            ("wasi:sockets", _) => Self::Sockets,
            ("wasi:http", "outgoing-handler") => Self::HttpOutgoing,
            ("wasi:http", "types") => Self::HttpTypes,
            ("wasi:cli", "environment") => Self::Environment,
            ("wasi:cli", "exit") => Self::Exit,
            ("wasi:cli", i) if i.starts_with("std") || i.starts_with("terminal-") => Self::Stdio,
            ("wasi:clocks", _) => Self::Clocks,
            ("wasi:random", _) => Self::Random,
            ("wasi:io", _) => Self::Io,
            ("wasi:nn", _) => Self::Models,
            _ => Self::Unsupported,
        }
    }

    /// Whether using this class has an effect outside the sandbox that a
    /// policy must grant (as opposed to always-available, harmless classes).
    pub fn needs_grant(self) -> bool {
        matches!(
            self,
            Self::Filesystem
                | Self::Sockets
                | Self::HttpOutgoing
                | Self::Environment
                | Self::Models
        )
    }

    /// Short explanation for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Filesystem => "files in directories the policy grants (ro or rw)",
            Self::Sockets => "raw network sockets (always denied)",
            Self::HttpOutgoing => "outgoing HTTP requests to hosts the policy allows",
            Self::HttpTypes => "HTTP data types (no effect by itself)",
            Self::Environment => "environment variables the policy supplies",
            Self::Stdio => "stdin (empty), stdout and stderr (captured, size-capped)",
            Self::Exit => "ending the call early",
            Self::Clocks => "wall and monotonic clocks",
            Self::Random => "random numbers",
            Self::Io => "streams and polling (no effect by itself)",
            Self::Models => "machine-learning models the policy grants by name (wasi:nn)",
            Self::Unsupported => "not provided by Airlock: instantiation will fail",
        }
    }
}

/// One import of a component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportInfo {
    /// Full import name, e.g. `wasi:http/outgoing-handler@0.2.4`.
    pub name: String,
    /// Its capability class.
    pub class: CapabilityClass,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_wasi_imports() {
        use CapabilityClass::*;
        let cases = [
            ("wasi:filesystem/types@0.2.6", Filesystem),
            ("wasi:filesystem/preopens@0.2.0", Filesystem),
            ("wasi:sockets/tcp@0.2.6", Sockets),
            ("wasi:http/outgoing-handler@0.2.4", HttpOutgoing),
            ("wasi:http/types@0.2.4", HttpTypes),
            ("wasi:cli/environment@0.2.6", Environment),
            ("wasi:cli/stdout@0.2.6", Stdio),
            ("wasi:cli/terminal-stdout@0.2.6", Stdio),
            ("wasi:cli/exit@0.2.6", Exit),
            ("wasi:clocks/monotonic-clock@0.2.6", Clocks),
            ("wasi:random/insecure-seed@0.2.6", Random),
            ("wasi:io/streams@0.2.6", Io),
            ("acme:db/query", Unsupported),
            ("plain-func", Unsupported),
        ];
        for (name, want) in cases {
            assert_eq!(CapabilityClass::of_import(name), want, "{name}");
        }
    }
}
