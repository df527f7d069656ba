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

use nn::wasi::nn::graph::load_by_name;
use nn::wasi::nn::tensor::{Tensor, TensorType};
use std::sync::OnceLock;

/// The name the policy grants the model by.
const MODEL: &str = "minilm";
/// Tokens per text (sentence-transformers' max_seq_length for this model).
const MAX_TOKENS: usize = 256;
/// Texts per call.
const MAX_TEXTS: usize = 64;
/// Texts per inference.
const BATCH: usize = 16;

struct Embed;

fn tokenizer() -> Result<&'static tokenizers::Tokenizer, String> {
    static TOKENIZER: OnceLock<Result<tokenizers::Tokenizer, String>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let mut t = tokenizers::Tokenizer::from_bytes(include_bytes!(concat!(
                env!("OUT_DIR"),
                "/tokenizer.json"
            )))
            .map_err(|e| format!("model_unavailable: the tokenizer does not load: {e}"))?;
            // Each text as it is: no fixed padding, no silent truncation.
            t.with_padding(None);
            t.with_truncation(None)
                .map_err(|e| format!("model_unavailable: {e}"))?;
            Ok(t)
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn nn_err(e: nn::wasi::nn::errors::Error) -> String {
    use nn::wasi::nn::errors::ErrorCode;
    let data = e.data();
    match e.code() {
        ErrorCode::Security => format!("denied: {data}"),
        _ if data.starts_with("bad_arguments") || data.starts_with("model_unavailable") => data,
        code => format!("model_unavailable: {code:?}: {data}"),
    }
}

/// Embeddings of `texts`, unit length, in order.
fn embed_all(texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
    if texts.len() > MAX_TEXTS {
        return Err(format!(
            "bad_arguments: texts: {} texts, at most {MAX_TEXTS} at once",
            texts.len()
        ));
    }
    let tok = tokenizer()?;
    let mut ids: Vec<Vec<u32>> = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let e = tok
            .encode(t.as_str(), true)
            .map_err(|e| format!("bad_arguments: texts[{i}]: {e}"))?;
        if e.get_ids().len() > MAX_TOKENS {
            return Err(format!(
                "bad_arguments: texts[{i}] is {} tokens, longer than the {MAX_TOKENS} this tool embeds",
                e.get_ids().len()
            ));
        }
        ids.push(e.get_ids().to_vec());
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let graph = load_by_name(MODEL).map_err(nn_err)?;
    let ctx = graph.init_execution_context().map_err(nn_err)?;
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(BATCH) {
        let seq = chunk.iter().map(Vec::len).max().unwrap_or(1);
        let (mut input, mut mask) = (Vec::new(), Vec::new());
        for s in chunk {
            for i in 0..seq {
                let (id, m) = s.get(i).map_or((0i64, 0i64), |&id| (i64::from(id), 1));
                input.extend_from_slice(&id.to_le_bytes());
                mask.extend_from_slice(&m.to_le_bytes());
            }
        }
        let dims = vec![chunk.len() as u32, seq as u32];
        let inputs = vec![
            (
                "input_ids".to_string(),
                Tensor::new(&dims, TensorType::I64, &input),
            ),
            (
                "attention_mask".to_string(),
                Tensor::new(&dims, TensorType::I64, &mask),
            ),
        ];
        let outputs = ctx.compute(inputs).map_err(nn_err)?;
        let hidden = outputs
            .into_iter()
            .find(|(n, _)| n == "last_hidden_state")
            .ok_or("model_unavailable: the model answered no last_hidden_state")?
            .1;
        let d = hidden.dimensions();
        let width = *d
            .get(2)
            .ok_or("model_unavailable: the output is not [batch, seq, hidden]")?
            as usize;
        let data = hidden.data();
        let floats: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if floats.len() != chunk.len() * seq * width {
            return Err("model_unavailable: the output does not match its shape".into());
        }
        // Mean over the real tokens, then unit length.
        for (b, s) in chunk.iter().enumerate() {
            let mut v = vec![0f32; width];
            for t in 0..s.len() {
                let row = &floats[(b * seq + t) * width..][..width];
                for (a, x) in v.iter_mut().zip(row) {
                    *a += x;
                }
            }
            let n = s.len().max(1) as f32;
            v.iter_mut().for_each(|a| *a /= n);
            let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|a| *a /= norm);
            out.push(v);
        }
    }
    Ok(out)
}

impl Guest for Embed {
    fn embed(texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
        embed_all(&texts)
    }

    fn similar(query: String, texts: Vec<String>) -> Result<Vec<Scored>, String> {
        if texts.len() >= MAX_TEXTS {
            return Err(format!(
                "bad_arguments: texts: {} texts, at most {} besides the query",
                texts.len(),
                MAX_TEXTS - 1
            ));
        }
        let mut all = Vec::with_capacity(texts.len() + 1);
        all.push(query);
        all.extend(texts.iter().cloned());
        let v = embed_all(&all)?;
        let mut scored: Vec<Scored> = texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| Scored {
                index: i as u32,
                text,
                score: v[0].iter().zip(&v[i + 1]).map(|(a, b)| a * b).sum(),
            })
            .collect();
        scored.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(scored)
    }
}

export!(Embed);
