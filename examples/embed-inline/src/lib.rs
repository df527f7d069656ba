//! `embed-inline`: the `embed` tool the naive way — the reference the
//! models benchmark measures `embed` against. The same engine Airlock's
//! host runs (`airlock-nn`), built into this component, reads the whole
//! model from its file grant (`/model`) into linear memory at each call:
//! every call, in every VM, holds its own copy of the weights.

wit_bindgen::generate!({ path: "wit", world: "embed-inline-tool" });

use airlock_nn::{Batch, Bert};
use std::path::Path;

/// Where the policy grants the model directory (read-only).
const MODEL_DIR: &str = "/model";

struct EmbedInline;

/// An encoder over the model read into this component's memory at the
/// first batch.
fn inline_encoder() -> impl FnMut(&embed_text::Padded) -> Result<Vec<f32>, String> {
    let mut model: Option<Bert> = None;
    move |p| {
        if model.is_none() {
            model = Some(Bert::read(Path::new(MODEL_DIR)).map_err(|e| {
                format!("model_unavailable: {e} (grant the model directory at {MODEL_DIR})")
            })?);
        }
        let m = model.as_ref().ok_or("model_unavailable: not loaded")?;
        m.encode(&Batch {
            batch: p.batch,
            seq: p.seq,
            input_ids: &p.input_ids,
            attention_mask: Some(&p.attention_mask),
            token_type_ids: None,
        })
        .map_err(|e| format!("bad_arguments: {e}"))
    }
}

embed_text::embed_tools!(EmbedInline, inline_encoder);

export!(EmbedInline);
