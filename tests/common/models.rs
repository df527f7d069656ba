//! The attacker's `wasi:nn` calls (the `escape` example), checked the same
//! way in process isolation (tests/models.rs) and in a microVM (the nested
//! scenario `vm-nn-attacks`, whose script writes the same list).

use serde_json::{Value, json};

/// The policy: the model granted, 8 MiB of memory for everything the call
/// holds (linear memory and host-held tensors).
pub fn nn_attack_policy(model_dir: &str) -> String {
    format!(
        "version = 1\n[limits]\nmemory = \"8MiB\"\ntimeout = \"800s\"\n[models]\nminilm = {model_dir:?}\n"
    )
}

/// The calls, in order.
pub fn nn_attack_calls() -> Value {
    json!([
        {"tool": "hoard-tensors", "args": {"count": 1000, "size": 1_048_576}},
        {"tool": "nn-compute", "args": {"model": "minilm", "batch": 16, "seq": 512, "id": 1}},
        {"tool": "load-model-bytes", "args": {"size": 4096}},
        {"tool": "nn-compute", "args": {"model": "minilm", "batch": 1, "seq": 513, "id": 1}}
    ])
}

fn actions<'a>(out: &'a Value, action: &str) -> Vec<&'a Value> {
    out["audit"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["action"] == action).collect())
        .unwrap_or_default()
}

fn tool_err(out: &Value) -> &str {
    out["result"]["ok"]["err"]
        .as_str()
        .unwrap_or_else(|| panic!("not a tool error: {out}"))
}

/// Check `airlock run --calls` output (`{"calls": [...]}`) of
/// [`nn_attack_calls`]: the same result kinds and events in either wall.
pub fn check_nn_attacks(out: &Value) {
    let calls = out["calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no calls: {out}"));
    assert_eq!(calls.len(), 4, "{out}");
    // 1,000 tensors of 1 MiB: a gigabyte of host memory without the
    // limit; the call ends out of memory at 8 MiB, the event says why.
    let flood = &calls[0];
    assert_eq!(flood["result"]["error"]["kind"], "out_of_memory", "{flood}");
    let limit = actions(flood, "limit.memory");
    assert_eq!(limit.len(), 1, "{flood}");
    assert!(
        limit[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("wasi:nn tensor"),
        "{flood}"
    );
    // An output that would not fit: too-large, before the engine runs.
    let big = &calls[1];
    assert!(tool_err(big).starts_with("ErrorCode::TooLarge"), "{big}");
    assert!(actions(big, "nn.compute").is_empty(), "{big}");
    // A model from the component's bytes: refused and audited.
    let bytes = &calls[2];
    assert!(
        tool_err(bytes).starts_with("ErrorCode::Security"),
        "{bytes}"
    );
    assert_eq!(actions(bytes, "nn.load")[0]["decision"], "deny", "{bytes}");
    // Longer than the model's context: the field and the bound.
    let long = &calls[3];
    let err = tool_err(long);
    assert!(
        err.starts_with("ErrorCode::InvalidArgument: bad_arguments: ")
            && err.contains("longer than the model's context of 512"),
        "{long}"
    );
}
