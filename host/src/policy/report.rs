//! The static capability report: what a component imports versus what its
//! policy grants. Read by security reviewers before anything runs.

use crate::policy::Policy;
use airlock_wasm_tools::{CapabilityClass, ToolSet};
use serde::Serialize;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Requested but not granted: those calls will be denied.
    WillBeDenied,
    /// Granted but never usable by this component: remove it.
    OverGrant,
    /// The component cannot run at all.
    Blocking,
    /// Something to check (e.g. a granted directory does not exist).
    Warning,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Severity.
    pub severity: Severity,
    /// The capability class concerned.
    pub capability: CapabilityClass,
    /// Policy field or import name concerned.
    pub subject: String,
    /// A sentence for the reviewer.
    pub message: String,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Capability classes the component imports.
    pub requested: Vec<CapabilityClass>,
    /// Findings, most serious first.
    pub findings: Vec<Finding>,
}

/// Compare a component's imports with a policy.
pub fn static_report(tools: &ToolSet, policy: &Policy) -> Report {
    let requested = tools.capability_classes();
    let has = |c: CapabilityClass| requested.contains(&c);
    let mut f = Vec::new();
    let mut push = |severity, capability, subject: &str, message: String| {
        f.push(Finding {
            severity,
            capability,
            subject: subject.to_string(),
            message,
        })
    };

    for imp in &tools.imports {
        if imp.class == CapabilityClass::Unsupported {
            push(
                Severity::Blocking,
                imp.class,
                &imp.name,
                format!(
                    "the component imports {}, which Airlock does not provide; it cannot be instantiated",
                    imp.name
                ),
            );
        }
    }
    if has(CapabilityClass::Filesystem) && policy.filesystem.is_empty() {
        push(Severity::WillBeDenied, CapabilityClass::Filesystem, "filesystem",
            "the component imports wasi:filesystem but the policy grants no directory; every file access will fail".into());
    }
    if has(CapabilityClass::HttpOutgoing) && policy.http.allow.is_empty() {
        push(Severity::WillBeDenied, CapabilityClass::HttpOutgoing, "http.allow",
            "the component imports wasi:http/outgoing-handler but the policy allows no host; every request will be denied".into());
    }
    if has(CapabilityClass::Sockets) {
        push(
            Severity::WillBeDenied,
            CapabilityClass::Sockets,
            "wasi:sockets",
            "the component imports wasi:sockets; raw sockets are never granted (use outgoing HTTP)"
                .into(),
        );
    }
    if has(CapabilityClass::Environment) && policy.env.is_empty() {
        push(Severity::WillBeDenied, CapabilityClass::Environment, "env",
            "the component can read its environment but the policy supplies no variables; it will see an empty environment".into());
    }
    if has(CapabilityClass::Models) && policy.models.is_empty() {
        push(Severity::WillBeDenied, CapabilityClass::Models, "models",
            "the component imports wasi:nn but the policy grants no model; every load will be denied".into());
    }
    if !has(CapabilityClass::Models) {
        for name in policy.models.keys() {
            push(
                Severity::OverGrant,
                CapabilityClass::Models,
                &format!("models.{name}"),
                format!("model {name:?} is granted but the component does not import wasi:nn"),
            );
        }
    }
    for (name, dir) in &policy.models {
        let missing: Vec<&str> = ["config.json", "model.safetensors"]
            .into_iter()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            push(
                Severity::Warning,
                CapabilityClass::Models,
                &format!("models.{name}"),
                format!(
                    "{} lacks {}; loading the model will fail",
                    dir.display(),
                    missing.join(" and ")
                ),
            );
        }
    }
    if !has(CapabilityClass::Filesystem) {
        for (i, r) in policy.filesystem.iter().enumerate() {
            push(
                Severity::OverGrant,
                CapabilityClass::Filesystem,
                &format!("filesystem[{i}]"),
                format!(
                    "{} is granted but the component does not import wasi:filesystem",
                    r.guest
                ),
            );
        }
    }
    if !has(CapabilityClass::HttpOutgoing) && !policy.http.allow.is_empty() {
        push(
            Severity::OverGrant,
            CapabilityClass::HttpOutgoing,
            "http.allow",
            "hosts are allowed but the component does not import wasi:http/outgoing-handler".into(),
        );
    }
    if !has(CapabilityClass::Environment) && !policy.env.is_empty() {
        push(Severity::OverGrant, CapabilityClass::Environment, "env",
            "environment variables are supplied but the component does not import wasi:cli/environment".into());
    }
    for (i, r) in policy.filesystem.iter().enumerate() {
        // A volume is the service's to make.
        if r.volume.is_none() && !r.host.is_dir() {
            push(
                Severity::Warning,
                CapabilityClass::Filesystem,
                &format!("filesystem[{i}].host"),
                format!(
                    "{} is not an existing directory; calls will fail until it exists",
                    r.host.display()
                ),
            );
        }
    }
    f.sort_by_key(|x| match x.severity {
        Severity::Blocking => 0,
        Severity::WillBeDenied => 1,
        Severity::OverGrant => 2,
        Severity::Warning => 3,
    });
    Report {
        requested,
        findings: f,
    }
}
