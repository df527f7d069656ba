//! The text side of the `embed` examples: all-MiniLM-L6-v2's tokenizer
//! (built in), batching and padding, mean pooling to unit vectors, and the
//! ranking of `similar`. The encoder — the model's forward pass — is the
//! caller's: `embed` asks the host through `wasi:nn` (the weights stay
//! where they lie), `embed-inline` runs the same engine inside the
//! component over weights it reads into its own memory.
//!
//! Errors are strings that start with the kind a caller can act on:
//! `denied:`, `bad_arguments:` or `model_unavailable:`.

use std::sync::OnceLock;

/// Tokens per text (sentence-transformers' max_seq_length for this model).
pub const MAX_TOKENS: usize = 256;
/// Texts per call.
pub const MAX_TEXTS: usize = 64;
/// Texts per inference.
pub const BATCH: usize = 16;

/// One inference's input: `batch` texts padded to `seq` tokens, row-major.
#[derive(Debug)]
pub struct Padded {
    /// Texts.
    pub batch: usize,
    /// Tokens per text, padding included.
    pub seq: usize,
    /// Token ids, `batch × seq` (0 for padding).
    pub input_ids: Vec<i64>,
    /// 1 for a real token, 0 for padding.
    pub attention_mask: Vec<i64>,
}

/// A text and how similar it is to the query.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Its position in the texts.
    pub index: u32,
    /// The text.
    pub text: String,
    /// Cosine similarity to the query.
    pub score: f32,
}

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

/// Embeddings of `texts`, unit length, in order. `encode` answers the last
/// hidden state of a [`Padded`] batch: `batch × seq × hidden` floats.
///
/// # Errors
/// `bad_arguments:` for too many or too long texts; whatever `encode`
/// answers; `model_unavailable:` for an output of the wrong size.
pub fn embed_all(
    texts: &[String],
    mut encode: impl FnMut(&Padded) -> Result<Vec<f32>, String>,
) -> Result<Vec<Vec<f32>>, String> {
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
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(BATCH) {
        let seq = chunk.iter().map(Vec::len).max().unwrap_or(1);
        let mut p = Padded {
            batch: chunk.len(),
            seq,
            input_ids: Vec::with_capacity(chunk.len() * seq),
            attention_mask: Vec::with_capacity(chunk.len() * seq),
        };
        for s in chunk {
            for i in 0..seq {
                let (id, m) = s.get(i).map_or((0, 0), |&id| (i64::from(id), 1));
                p.input_ids.push(id);
                p.attention_mask.push(m);
            }
        }
        let hidden = encode(&p)?;
        let width = hidden.len() / (chunk.len() * seq);
        if width == 0 || hidden.len() != chunk.len() * seq * width {
            return Err("model_unavailable: the output does not match its shape".into());
        }
        // Mean over the real tokens, then unit length.
        for (b, s) in chunk.iter().enumerate() {
            let mut v = vec![0f32; width];
            for t in 0..s.len() {
                let row = &hidden[(b * seq + t) * width..][..width];
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

/// `texts` ranked by meaning against `query`, most similar first.
///
/// # Errors
/// As [`embed_all`]; `bad_arguments:` for more than `MAX_TEXTS - 1` texts.
pub fn similar(
    query: String,
    texts: Vec<String>,
    encode: impl FnMut(&Padded) -> Result<Vec<f32>, String>,
) -> Result<Vec<Scored>, String> {
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
    let v = embed_all(&all, encode)?;
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

/// `impl Guest for $tool`: the `embed` and `similar` exports of a
/// component whose WIT world is the embed tools' (its `Guest` and `Scored`
/// in scope), over `$encoder()`, a fresh encoder per call.
#[macro_export]
macro_rules! embed_tools {
    ($tool:ident, $encoder:path) => {
        impl Guest for $tool {
            fn embed(texts: Vec<String>) -> Result<Vec<Vec<f32>>, String> {
                $crate::embed_all(&texts, $encoder())
            }

            fn similar(query: String, texts: Vec<String>) -> Result<Vec<Scored>, String> {
                Ok($crate::similar(query, texts, $encoder())?
                    .into_iter()
                    .map(|s| Scored {
                        index: s.index,
                        text: s.text,
                        score: s.score,
                    })
                    .collect())
            }
        }
    };
}
