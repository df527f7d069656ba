//! Airlock's guest side.
//!
//! * [`runner`]: the wasmtime runner. It takes a component, a tool name, JSON
//!   arguments and a [`grants::GrantSet`], and runs exactly one call in a fresh
//!   store that can do only what the grant set allows.
//! * [`grants`]: the grant set (the policy decision, made on the host) and the
//!   HTTP rule matcher shared with the host's egress proxy.
//! * [`audit`]: capability decisions recorded during a call.
//! * [`artifact`]: the envelope around precompiled components.
//! * [`proto`]: the host↔guest protocol (framed messages).
//! * [`egress`]: how allowed outgoing HTTP leaves the microVM (vsock to the
//!   host's proxy, which checks the grant again).
//! * [`agent`]: serves the protocol in the guest (used by the `airlock-init` binary).
//!
//! **Invariant:** the runner enforces the grant set it is handed and never
//! widens it; deciding what to grant is the host policy module's job.

#![deny(missing_docs)]

pub mod agent;
pub mod artifact;
pub mod audit;
pub mod egress;
pub mod grants;
pub mod proto;
pub mod runner;

pub use audit::{AuditEvent, Decision};
pub use grants::{DirGrant, GrantSet, HttpRule, Limits};
pub use runner::{
    CallError, CallOutcome, CallResult, Egress, EgressCall, EgressFailure, EgressFailureKind,
    EgressRequest, EgressResponse, EngineConfig, Loaded, Metering, Runner, RunnerError,
};
