//! Airlock host: policy, static reports, the HTTP service (registry, API,
//! MCP, audit log), and the wiring to the VMM (`airlock-vmm`).
//!
//! The `airlock` binary (`main.rs`) is a thin layer over this library.

#![deny(missing_docs)]

pub mod callsite;
pub mod egress;
pub mod policy;
pub mod pool;
pub mod sandbox;
pub mod service;
pub mod signing;
pub mod snapshots;
pub mod weights;
