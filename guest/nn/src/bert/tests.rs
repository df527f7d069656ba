//! A tiny BERT written here (random weights in a real safetensors file):
//! what a model that is not all there, and input that does not fit, get.

use super::*;
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;

const CFG: &str = r#"{"model_type":"bert","vocab_size":20,"hidden_size":8,
  "num_hidden_layers":2,"num_attention_heads":2,"intermediate_size":16,
  "max_position_embeddings":12,"type_vocab_size":2,"layer_norm_eps":1e-12,
  "hidden_act":"gelu"}"#;

/// Every tensor of the tiny model, with deterministic pseudo-random values.
fn tensors() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut seed = 0x2545_f491_u32;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed as f32 / u32::MAX as f32 - 0.5) * 0.8
    };
    let mut t = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>, gain: bool| {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| if gain { 1.0 + next() * 0.1 } else { next() })
            .collect();
        t.insert(name, (shape, v));
    };
    add(
        "embeddings.word_embeddings.weight".into(),
        vec![20, 8],
        false,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![12, 8],
        false,
    );
    add(
        "embeddings.token_type_embeddings.weight".into(),
        vec![2, 8],
        false,
    );
    add("embeddings.LayerNorm.weight".into(), vec![8], true);
    add("embeddings.LayerNorm.bias".into(), vec![8], false);
    for l in 0..2 {
        let p = format!("encoder.layer.{l}");
        for (name, out, inp) in [
            ("attention.self.query", 8, 8),
            ("attention.self.key", 8, 8),
            ("attention.self.value", 8, 8),
            ("attention.output.dense", 8, 8),
            ("intermediate.dense", 16, 8),
            ("output.dense", 8, 16),
        ] {
            add(format!("{p}.{name}.weight"), vec![out, inp], false);
            add(format!("{p}.{name}.bias"), vec![out], false);
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{name}.weight"), vec![8], true);
            add(format!("{p}.{name}.bias"), vec![8], false);
        }
    }
    t
}

/// Write `tensors` (and `CFG`, or `cfg`) as a model directory.
fn write_model(tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, cfg: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    let bytes: BTreeMap<&String, (Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, (s, v))| (k, (s.clone(), bytemuck::cast_slice(v).to_vec())))
        .collect();
    let views: Vec<(&String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, (s, b))| {
            (
                *k,
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let data = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), data).unwrap();
    dir
}

fn model() -> (tempfile::TempDir, Bert) {
    let dir = write_model(&tensors(), CFG);
    let m = Bert::open(dir.path()).unwrap();
    (dir, m)
}

fn one(ids: &[i64]) -> Batch<'_> {
    Batch {
        batch: 1,
        seq: ids.len(),
        input_ids: ids,
        attention_mask: None,
        token_type_ids: None,
    }
}

#[test]
fn a_sequence_encodes_to_one_normalised_row_per_token() {
    let (_d, m) = model();
    let out = m.encode(&one(&[1, 5, 7, 2])).unwrap();
    assert_eq!(out.len(), 4 * 8);
    for row in out.chunks(8) {
        // The last layer norm: mean ≈ bias mean, finite everywhere.
        assert!(row.iter().all(|v| v.is_finite()));
    }
    // Deterministic, and the token matters.
    assert_eq!(out, m.encode(&one(&[1, 5, 7, 2])).unwrap());
    assert_ne!(out[8..16], m.encode(&one(&[1, 6, 7, 2])).unwrap()[8..16]);
}

#[test]
fn a_model_read_into_memory_encodes_exactly_as_the_mapped_one() {
    let (d, mapped) = model();
    let read = Bert::read(d.path()).unwrap();
    assert!(!read.in_place());
    let ids = [1, 5, 7, 2];
    assert_eq!(
        mapped.encode(&one(&ids)).unwrap(),
        read.encode(&one(&ids)).unwrap()
    );
    // The same checks hold: a file cut short does not load either way.
    let f = d.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 4)
        .unwrap();
    assert!(matches!(
        Bert::read(d.path()),
        Err(crate::NnError::Model { .. })
    ));
}

#[test]
fn padding_changes_nothing_for_the_real_tokens_and_a_batch_is_its_sequences() {
    let (_d, m) = model();
    let alone = m.encode(&one(&[1, 5, 7, 2])).unwrap();
    let ids = [1, 5, 7, 2, 0, 0, 1, 9, 3, 4, 2, 0];
    let mask = [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0];
    let both = m
        .encode(&Batch {
            batch: 2,
            seq: 6,
            input_ids: &ids,
            attention_mask: Some(&mask),
            token_type_ids: None,
        })
        .unwrap();
    for (a, b) in alone.iter().zip(&both[..4 * 8]) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let second = m.encode(&one(&[1, 9, 3, 4, 2])).unwrap();
    for (a, b) in second.iter().zip(&both[6 * 8..11 * 8]) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
}

#[test]
fn input_that_does_not_fit_the_model_is_refused_naming_the_input() {
    let (_d, m) = model();
    let field = |b: Batch<'_>| match m.encode(&b) {
        Err(NnError::Input { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(field(one(&[1, 20])), "input_ids"); // id past the vocabulary
    assert_eq!(field(one(&[1, -1])), "input_ids");
    assert_eq!(field(one(&[])), "input_ids");
    assert_eq!(field(one(&[1; 13])), "input_ids"); // longer than the context
    let ids = [1, 2, 3];
    let b = |mask: Option<&'static [i64]>, types: Option<&'static [i64]>| Batch {
        batch: 1,
        seq: 3,
        input_ids: &ids,
        attention_mask: mask,
        token_type_ids: types,
    };
    assert_eq!(field(b(Some(&[1, 1, 2]), None)), "attention_mask");
    assert_eq!(field(b(Some(&[1, 1]), None)), "attention_mask");
    assert_eq!(field(b(None, Some(&[0, 2, 0]))), "token_type_ids");
    // More tokens than one call takes, though each sequence fits.
    let many = vec![1i64; MAX_TOKENS + 12];
    let huge = Batch {
        batch: MAX_TOKENS / 12 + 1,
        seq: 12,
        input_ids: &many,
        attention_mask: None,
        token_type_ids: None,
    };
    assert_eq!(field(huge), "input_ids");
    // A batch size that overflows does not either.
    let overflow = Batch {
        batch: usize::MAX,
        seq: 2,
        input_ids: &ids,
        attention_mask: None,
        token_type_ids: None,
    };
    assert_eq!(field(overflow), "input_ids");
}

fn open_err(dir: &tempfile::TempDir) -> String {
    match Bert::open(dir.path()) {
        Err(e @ NnError::Model { .. }) => e.to_string(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_model_that_is_not_all_there_does_not_open() {
    let mut t = tensors();
    t.remove("encoder.layer.1.output.dense.bias");
    assert!(
        open_err(&write_model(&t, CFG)).contains("no tensor encoder.layer.1.output.dense.bias")
    );

    let mut t = tensors();
    t.insert(
        "encoder.layer.0.attention.self.key.weight".into(),
        (vec![8, 7], vec![0.0; 56]),
    );
    assert!(open_err(&write_model(&t, CFG)).contains("shape [8, 7], not [8, 8]"));

    // A config that claims more layers than the file has.
    let more = CFG.replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":3");
    assert!(open_err(&write_model(&tensors(), &more)).contains("encoder.layer.2"));
    let act = CFG.replace("\"gelu\"", "\"relu\"");
    assert!(open_err(&write_model(&tensors(), &act)).contains("hidden_act"));
    let heads = CFG.replace("\"num_attention_heads\":2", "\"num_attention_heads\":3");
    assert!(open_err(&write_model(&tensors(), &heads)).contains("divide"));
    let zero = CFG.replace("\"vocab_size\":20", "\"vocab_size\":0");
    assert!(open_err(&write_model(&tensors(), &zero)).contains("vocab_size"));
    assert!(open_err(&write_model(&tensors(), "{not json")).contains("config.json"));

    // A truncated weights file, and none at all.
    let dir = write_model(&tensors(), CFG);
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 5).unwrap();
    assert!(open_err(&dir).contains("not a safetensors file"));
    std::fs::remove_file(&path).unwrap();
    assert!(open_err(&dir).contains("model.safetensors"));
}

#[test]
fn a_tensor_of_another_type_is_refused() {
    let dir = write_model(&tensors(), CFG);
    // Rewrite one tensor's dtype in the header: F32 → I32 (same width).
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let key = "\"embeddings.LayerNorm.bias\":{\"dtype\":\"F32\"";
    let at = header.find(key).expect("header layout") + key.len() - 4;
    bytes[8 + at..8 + at + 3].copy_from_slice(b"I32");
    std::fs::write(&path, bytes).unwrap();
    assert!(open_err(&dir).contains("embeddings.LayerNorm.bias is I32, not F32"));
}

#[test]
fn a_weights_file_that_is_a_symbolic_link_is_refused() {
    let real = write_model(&tensors(), CFG);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CFG).unwrap();
    std::os::unix::fs::symlink(
        real.path().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    assert!(open_err(&dir).contains("model.safetensors"));
    // The same file, not through a link, opens.
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    std::fs::copy(
        real.path().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    Bert::open(dir.path()).unwrap();
}

#[test]
fn a_model_not_on_a_read_only_image_is_read_from_a_sealed_copy_that_truncation_cannot_touch() {
    let dir = write_model(&tensors(), CFG);
    let m = Bert::open(dir.path()).unwrap();
    // A temporary directory is no read-only image.
    assert!(!m.in_place());
    let before = m.encode(&one(&[1, 5, 7, 2])).unwrap();
    // Truncate the file under the open model: without the copy, the next
    // read of a weight would be a SIGBUS that ends this test process.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("model.safetensors"))
        .unwrap()
        .set_len(0)
        .unwrap();
    assert_eq!(m.encode(&one(&[1, 5, 7, 2])).unwrap(), before);
}
