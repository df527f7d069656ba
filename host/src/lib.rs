//! Airlock host: policy, and (in later milestones) the VMM, devices, sandbox
//! pool, API, registry, audit log and egress proxy.
//!
//! The `airlock` binary (`main.rs`) is a thin layer over this library.

pub mod devices;
pub mod policy;
pub mod report;
pub mod vmm;
