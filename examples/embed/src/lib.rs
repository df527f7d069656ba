//! `embed`: sentence embeddings and semantic search with all-MiniLM-L6-v2,
//! run by the host through `wasi:nn` — the component tokenizes and pools,
//! the model (granted by name: `minilm`) runs natively where its weights
//! lie, read-only and shared; they are never copied into this component.

wit_bindgen::generate!({ path: "wit", world: "embed-tool" });

/// The standard `wasi:nn` imports (their own world, so `wit/` stays one
/// file the host can read docs from).
mod nn {
    wit_bindgen::generate!({ path: "../wasi-nn", world: "ml" });
}

use nn::wasi::nn::graph::{GraphExecutionContext, load_by_name};
use nn::wasi::nn::tensor::{Tensor, TensorType};

/// The name the policy grants the model by.
const MODEL: &str = "minilm";

struct Embed;

fn nn_err(e: nn::wasi::nn::errors::Error) -> String {
    use nn::wasi::nn::errors::ErrorCode;
    let data = e.data();
    match e.code() {
        ErrorCode::Security => format!("denied: {data}"),
        _ if data.starts_with("bad_arguments") || data.starts_with("model_unavailable") => data,
        code => format!("model_unavailable: {code:?}: {data}"),
    }
}

/// An encoder that asks the host: the model is loaded at the first batch
/// (a call with no texts loads nothing).
fn host_encoder() -> impl FnMut(&embed_text::Padded) -> Result<Vec<f32>, String> {
    let mut ctx: Option<GraphExecutionContext> = None;
    move |p| {
        if ctx.is_none() {
            let graph = load_by_name(MODEL).map_err(nn_err)?;
            ctx = Some(graph.init_execution_context().map_err(nn_err)?);
        }
        let ctx = ctx.as_ref().ok_or("model_unavailable: no context")?;
        let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let dims = vec![p.batch as u32, p.seq as u32];
        let inputs = vec![
            (
                "input_ids".to_string(),
                Tensor::new(&dims, TensorType::I64, &bytes(&p.input_ids)),
            ),
            (
                "attention_mask".to_string(),
                Tensor::new(&dims, TensorType::I64, &bytes(&p.attention_mask)),
            ),
        ];
        let outputs = ctx.compute(inputs).map_err(nn_err)?;
        let hidden = outputs
            .into_iter()
            .find(|(n, _)| n == "last_hidden_state")
            .ok_or("model_unavailable: the model answered no last_hidden_state")?
            .1;
        if hidden.dimensions().len() != 3 {
            return Err("model_unavailable: the output is not [batch, seq, hidden]".into());
        }
        Ok(hidden
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

embed_text::embed_tools!(Embed, host_encoder);

export!(Embed);
