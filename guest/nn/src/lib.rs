//! `airlock-nn`: the inference engine behind the runner's `wasi:nn`.
//!
//! A [`Bert`] is a BERT encoder (the architecture of sentence-embedding
//! models such as all-MiniLM-L6-v2) read from a model directory holding
//! `config.json` and `model.safetensors`. The safetensors file is mapped
//! read-only and the encoder keeps only *offsets* into the mapping: every
//! matrix product reads the weights where they lie. In a microVM that
//! mapping is the DAX window of `/weights` — the host's page cache — so no
//! VM, process or call holds a private copy of the weights. A file that is
//! not on such a read-only image (process isolation, a plain directory) is
//! copied once per process into a sealed memfd: a file anyone can truncate
//! must never be mapped, a lost page being a `SIGBUS` for the process.
//!
//! **Invariants:**
//! * Nothing is copied out of the weights file: tensors are `&[f32]` views
//!   into the mapping (checked for type, shape, alignment and bounds once,
//!   when the model opens).
//! * A model opens only if every tensor the forward pass reads is there with
//!   the shape its config implies; afterwards the forward pass cannot index
//!   out of bounds on the weights.
//! * Input is checked before any work: token ids below the vocabulary,
//!   token types below `type_vocab_size`, sequence length within the
//!   model's context, a mask of 0/1, and at most [`MAX_TOKENS`] tokens per
//!   call — so the host memory and time one [`Bert::encode`] costs is
//!   bounded by the input's size, whatever the caller sends.
//! * The mapped bytes cannot change: a file on a read-only image file
//!   system (erofs, squashfs — the VM's `/weights`) is mapped in place,
//!   any other is copied once into a sealed memfd ([`Bert::in_place`]).

mod bert;

pub use bert::{Batch, Bert, BertConfig};

use std::path::PathBuf;

/// Most tokens (batch × sequence) one [`Bert::encode`] takes: bounds the
/// activations (a few MiB) and the output (`MAX_TOKENS × hidden` floats).
pub const MAX_TOKENS: usize = 8192;

/// Errors of the inference engine.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// The model's files are missing, unreadable or not a model this
    /// engine runs.
    #[error("The model at {path} cannot be used: {reason}.")]
    Model {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The input does not fit the model.
    #[error("The input {field} is not valid for this model: {message}.")]
    Input {
        /// Which input (`input_ids`, `attention_mask`, `token_type_ids`).
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

impl NnError {
    fn input(field: &'static str, message: impl Into<String>) -> Self {
        Self::Input {
            field,
            message: message.into(),
        }
    }
}
