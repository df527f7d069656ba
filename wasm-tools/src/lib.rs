//! The tool contract: how a WASI-p2 component becomes a set of LLM tools.
//!
//! * [`contract`] walks a component's exported functions and turns each into a
//!   [`Tool`] with an LLM-safe name and JSON Schemas for its parameters and result.
//! * [`schema`] maps component-model types to JSON Schema (2020-12).
//! * [`value`] converts JSON to component values and back, with errors that
//!   name the path of the offending field.
//! * [`capability`] classifies what a component imports.
//! * [`docs`] reads WIT doc comments from the component (or a WIT package).
//!
//! **Invariant:** this crate never instantiates or runs a component; it only
//! reads types. Everything here is deterministic for the same component bytes.

#![deny(missing_docs)]

pub mod capability;
pub mod contract;
pub mod docs;
pub mod schema;
pub mod value;

pub use capability::{CapabilityClass, ImportInfo};
pub use contract::{ContractError, SkippedExport, Tool, ToolSet};
pub use value::{ValueError, json_to_val, val_to_json};
