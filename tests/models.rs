//! Models as a capability (issue 16), in process isolation through the
//! CLI: the `embed` example runs all-MiniLM-L6-v2 (fetched by
//! `scripts/model.sh`) through `wasi:nn`, granted by name. The same calls in
//! a microVM are the nested scenario's.

mod common;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The model's directory: `$AIRLOCK_MINILM`, else the cache's.
fn minilm() -> PathBuf {
    let dir = std::env::var_os("AIRLOCK_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::cache_dir().join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} has no model: run `source scripts/setup.sh; source scripts/model.sh` first",
        dir.display()
    );
    dir
}

/// `airlock run` of `example`'s `tool` in process isolation with
/// `policy`; the outcome's JSON.
fn run_example(dir: &Path, policy: &str, example: &str, tool: &str, args: Value) -> Value {
    let policy_path = dir.join("policy.toml");
    std::fs::write(&policy_path, policy).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "run",
            common::example(example).to_str().unwrap(),
            "--policy",
            policy_path.to_str().unwrap(),
            "--tool",
            tool,
            "--args",
            &args.to_string(),
            "--isolation",
            "process",
        ])
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// The embed example's `tool`.
fn run(dir: &Path, policy: &str, tool: &str, args: Value) -> Value {
    run_example(dir, policy, "embed", tool, args)
}

/// The escape example's `tool`.
fn escape(dir: &Path, policy: &str, tool: &str, args: Value) -> Value {
    run_example(dir, policy, "escape", tool, args)
}

fn granted(model: &Path) -> String {
    format!(
        "version = 1\n[limits]\nmemory = \"128MiB\"\ntimeout = \"60s\"\n[models]\nminilm = {:?}\n",
        model.display().to_string()
    )
}

fn events<'a>(out: &'a Value, action: &str) -> Vec<&'a Value> {
    out["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == action)
        .collect()
}

#[test]
fn a_granted_model_ranks_texts_by_meaning_without_copying_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &granted(&minilm()),
        "similar",
        json!({"query": "How do I reset my password?", "texts": [
            "The cat sat on the mat.",
            "I forgot my login credentials and cannot sign in.",
            "Paris is the capital of France."
        ]}),
    );
    let ranked = out["result"]["ok"]["ok"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(ranked[0]["index"], 1, "{out}");
    let (best, worst) = (
        ranked[0]["score"].as_f64().unwrap(),
        ranked[2]["score"].as_f64().unwrap(),
    );
    assert!(best > 0.4 && worst < 0.2, "{out}");
    let loads = events(&out, "nn.load");
    assert_eq!(loads.len(), 1, "{out}");
    assert_eq!(loads[0]["decision"], "allow");
    assert_eq!(loads[0]["target"], "minilm");
    // Not on a read-only image here: a sealed copy no truncation can reach.
    assert!(
        loads[0]["reason"]
            .as_str()
            .unwrap()
            .ends_with("(read from this process's sealed copy)"),
        "{out}"
    );
    assert_eq!(events(&out, "nn.compute").len(), 1, "{out}");
    // The weights (87 MiB) were read in place: the component's linear
    // memory holds its tokenizer and activations, not the model.
    let peak = out["metering"]["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak < 32 << 20, "peak linear memory {peak} bytes: {out}");

    let out = run(
        dir.path(),
        &granted(&minilm()),
        "embed",
        json!({"texts": ["one", "two"]}),
    );
    let v = out["result"]["ok"]["ok"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(v.len(), 2);
    let e0: Vec<f64> = v[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(e0.len(), 384);
    let norm: f64 = e0.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "{norm}");
}

#[test]
fn a_model_the_policy_does_not_grant_is_denied_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    // No [models] at all, then another name only.
    for policy in [
        "version = 1\n".to_string(),
        granted(&minilm()).replace("minilm =", "other ="),
    ] {
        let out = run(dir.path(), &policy, "embed", json!({"texts": ["hello"]}));
        let err = out["result"]["ok"]["err"]
            .as_str()
            .unwrap_or_else(|| panic!("{out}"));
        assert!(err.starts_with("denied: "), "{out}");
        let loads = events(&out, "nn.load");
        assert_eq!(loads.len(), 1, "{out}");
        assert_eq!(loads[0]["decision"], "deny");
        assert!(events(&out, "nn.compute").is_empty());
    }
}

#[test]
fn a_missing_or_corrupt_model_and_too_long_input_are_structured_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Corrupt: the real config, the first MiB of the weights.
    let bad = dir.path().join("broken-model");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(minilm().join("config.json"), bad.join("config.json")).unwrap();
    let head = {
        use std::io::Read;
        let mut b = vec![0u8; 1 << 20];
        std::fs::File::open(minilm().join("model.safetensors"))
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        b
    };
    std::fs::write(bad.join("model.safetensors"), head).unwrap();
    let out = run(
        dir.path(),
        &granted(&bad),
        "embed",
        json!({"texts": ["hello"]}),
    );
    let err = out["result"]["ok"]["err"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"));
    assert!(err.starts_with("model_unavailable: "), "{out}");
    assert!(
        err.contains("broken-model"),
        "the error names the model's directory: {out}"
    );
    // Gone altogether.
    let out = run(
        dir.path(),
        &granted(&dir.path().join("no-such-model")),
        "embed",
        json!({"texts": ["hello"]}),
    );
    let err = out["result"]["ok"]["err"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"));
    assert!(err.starts_with("model_unavailable: "), "{out}");

    // Longer than the model takes.
    let long = "word ".repeat(600);
    let out = run(
        dir.path(),
        &granted(&minilm()),
        "embed",
        json!({"texts": ["short", long]}),
    );
    let err = out["result"]["ok"]["err"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"));
    assert!(err.starts_with("bad_arguments: texts[1]"), "{out}");
    // Bad JSON arguments are the runner's, before any model.
    let out = run(
        dir.path(),
        &granted(&minilm()),
        "embed",
        json!({"texts": "not a list"}),
    );
    assert_eq!(out["result"]["error"]["kind"], "bad_arguments", "{out}");
}

#[test]
fn a_model_from_the_components_bytes_and_input_the_model_cannot_take_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy = granted(&minilm());
    let out = escape(
        dir.path(),
        &policy,
        "load-model-bytes",
        json!({"size": 4096}),
    );
    let err = out["result"]["ok"]["err"]
        .as_str()
        .unwrap_or_else(|| panic!("{out}"));
    assert!(err.starts_with("ErrorCode::Security"), "{out}");
    assert_eq!(events(&out, "nn.load")[0]["decision"], "deny", "{out}");
    for (args, says) in [
        (
            json!({"batch": 1, "seq": 513, "id": 1}),
            "longer than the model's context of 512",
        ),
        (
            json!({"batch": 17, "seq": 512, "id": 1}),
            "more than 8192 tokens at once",
        ),
        (
            json!({"batch": 1, "seq": 4, "id": -5}),
            "value -5 at 0 is not in 0..30522",
        ),
        (
            json!({"batch": 1, "seq": 4, "id": 30522}),
            "not in 0..30522",
        ),
        (json!({"batch": 0, "seq": 4, "id": 1}), "is empty"),
    ] {
        let mut args = args;
        args["model"] = json!("minilm");
        let out = escape(dir.path(), &policy, "nn-compute", args);
        let err = out["result"]["ok"]["err"]
            .as_str()
            .unwrap_or_else(|| panic!("{out}"));
        assert!(
            err.starts_with("ErrorCode::InvalidArgument: bad_arguments: "),
            "{out}"
        );
        assert!(err.contains(says), "{says}: {out}");
    }
}

#[test]
fn the_engine_built_into_a_component_gives_the_same_embeddings_from_a_private_copy() {
    // `embed-inline`, the models benchmark's reference: the same engine
    // inside the component, reading the weights through a file grant.
    let dir = tempfile::tempdir().unwrap();
    let texts = json!({"texts": ["A man is playing a guitar.", "The weather is lovely today."]});
    let host = run(dir.path(), &granted(&minilm()), "embed", texts.clone());
    let inline_policy = format!(
        "version = 1\n[limits]\nmemory = \"256MiB\"\ntimeout = \"60s\"\nfuel = 100000000000\n\
         [[filesystem]]\nhost = {:?}\nguest = \"/model\"\nmode = \"ro\"\n",
        minilm().display().to_string()
    );
    let inline = run_example(dir.path(), &inline_policy, "embed-inline", "embed", texts);
    let rows = |out: &Value| -> Vec<Vec<f64>> {
        out["result"]["ok"]["ok"]
            .as_array()
            .unwrap_or_else(|| panic!("{out}"))
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let (a, b) = (rows(&host), rows(&inline));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        let cos: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        assert!(cos > 0.9999, "cosine {cos}");
    }
    // The naive way holds the weights (87 MiB) in linear memory; the
    // capability never does.
    let weights = std::fs::metadata(minilm().join("model.safetensors"))
        .unwrap()
        .len();
    let peak = |out: &Value| out["metering"]["peak_memory_bytes"].as_u64().unwrap();
    assert!(peak(&inline) > weights, "{inline}");
    assert!(peak(&host) < weights / 4, "{host}");
    // Without its file grant it says what it needs.
    let bare = run_example(
        dir.path(),
        "version = 1\n[limits]\nmemory = \"256MiB\"\n",
        "embed-inline",
        "embed",
        json!({"texts": ["x"]}),
    );
    let err = bare["result"]["ok"]["err"]
        .as_str()
        .unwrap_or_else(|| panic!("{bare}"));
    assert!(
        err.starts_with("model_unavailable:") && err.contains("/model"),
        "{err}"
    );
}

#[test]
fn the_attackers_wasi_nn_calls_end_as_in_the_vm() {
    // The same calls and checks as the nested scenario vm-nn-attacks.
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        common::models::nn_attack_policy(&minilm().display().to_string()),
    )
    .unwrap();
    let calls = dir.path().join("calls.json");
    std::fs::write(&calls, common::models::nn_attack_calls().to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "run",
            common::example("escape").to_str().unwrap(),
            "--policy",
        ])
        .arg(&policy)
        .arg("--calls")
        .arg(&calls)
        .args(["--isolation", "process"])
        .output()
        .unwrap();
    let out: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stderr)));
    common::models::check_nn_attacks(&out);
}
