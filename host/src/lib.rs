//! Airlock host: policy, static reports, the HTTP service (registry, API,
//! MCP, audit log) and the VMM with its devices.
//!
//! The `airlock` binary (`main.rs`) is a thin layer over this library.

pub mod devices;
pub mod egress;
pub mod policy;
pub mod pool;
pub mod report;
pub mod sandbox;
pub mod service;
pub mod vmm;
pub mod weights;
