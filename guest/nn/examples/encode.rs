//! `encode MODEL_DIR`: read `{"sequences": [[token ids], …]}` on stdin, run
//! them through the engine as one padded batch, print
//! `{"hidden": [[[f32; hidden] per real token] per sequence]}`.
//! The engine's side of `tests/nn/reference.py` (the NumPy reference).

use airlock_nn::{Batch, Bert};
use std::io::Read;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .ok_or("usage: encode MODEL_DIR < ids.json")?;
    let model = Bert::open(std::path::Path::new(&dir))?;
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let input: serde_json::Value = serde_json::from_str(&text)?;
    let seqs: Vec<Vec<i64>> = serde_json::from_value(input["sequences"].clone())?;
    let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for s in &seqs {
        ids.extend(
            s.iter()
                .copied()
                .chain(std::iter::repeat_n(0, seq - s.len())),
        );
        mask.extend((0..seq).map(|i| i64::from(i < s.len())));
    }
    let out = model.encode(&Batch {
        batch: seqs.len(),
        seq,
        input_ids: &ids,
        attention_mask: Some(&mask),
        token_type_ids: None,
    })?;
    let h = model.config().hidden_size;
    let hidden: Vec<Vec<&[f32]>> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (0..s.len())
                .map(|t| &out[(i * seq + t) * h..][..h])
                .collect()
        })
        .collect();
    println!("{}", serde_json::json!({ "hidden": hidden }));
    Ok(())
}
