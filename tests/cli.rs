//! The `airlock` binary, end to end: inspect, run, policy check.

mod common;

use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Output};

fn airlock(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .output()
        .expect("run airlock")
}

fn stdout_json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_policy(dir: &Path, text: &str) -> String {
    let p = dir.join("policy.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn inspect_lists_tools_schemas_and_capabilities() {
    let kitchen = common::example("kitchen");
    let o = airlock(&["inspect", kitchen.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = stdout_json(&o);
    let tools = v["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 6);
    let search = tools
        .iter()
        .find(|t| t["name"] == "recipes_search")
        .unwrap();
    assert_eq!(search["description"], "Search the built-in recipe book.");
    assert_eq!(search["interface"], "airlock:kitchen/recipes@0.1.0");
    assert_eq!(
        search["parameters"]["properties"]["filter"]["properties"]["limit"]["type"],
        "integer"
    );
    assert!(
        v["capabilities"]
            .as_array()
            .unwrap()
            .contains(&json!("stdio"))
    );

    let text = airlock(&["inspect", common::example("escape").to_str().unwrap()]);
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("spin()"), "{text}");
    assert!(text.contains("HttpOutgoing"), "{text}");
    assert!(text.contains("Sockets"), "{text}");
}

#[test]
fn inspect_rejects_garbage_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x0d\0\x01\0garbage").unwrap();
    let o = airlock(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("The component is invalid"),
        "{}",
        stderr(&o)
    );
    let o = airlock(&["inspect", "/nonexistent.wasm"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read component /nonexistent.wasm"));
}

#[test]
fn run_with_a_policy_prints_result_metering_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/hello.txt"), "hi there").unwrap();
    let policy = write_policy(
        dir.path(),
        "version = 1\n[[filesystem]]\nhost = \"data\"\nguest = \"/data\"\nmode = \"ro\"\n",
    );
    let files = common::example("files");
    let o = airlock(&[
        "run",
        files.to_str().unwrap(),
        "--policy",
        &policy,
        "--tool",
        "files_read",
        "--args",
        r#"{"path": "/data/hello.txt"}"#,
        "--isolation",
        "process",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = stdout_json(&o);
    assert_eq!(v["result"]["ok"]["ok"], "hi there");
    assert!(v["metering"]["fuel_used"].as_u64().unwrap() > 0);
    assert!(
        v["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "fs.open" && e["decision"] == "allow")
    );
}

#[test]
fn run_calls_runs_each_call_of_a_file_in_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/hello.txt"), "hi there").unwrap();
    let policy = write_policy(
        dir.path(),
        "version = 1\n[[filesystem]]\nhost = \"data\"\nguest = \"/data\"\nmode = \"rw\"\n",
    );
    let calls = dir.path().join("calls.json");
    std::fs::write(
        &calls,
        json!([
            {"tool": "files_write", "args": {"path": "/data/new.txt", "content": "made"}},
            {"tool": "files_read", "args": {"path": "/data/new.txt"}},
            {"tool": "files_read", "args": {"path": "/etc/passwd"}},
            {"tool": "no_such_tool"},
        ])
        .to_string(),
    )
    .unwrap();
    let files = common::example("files");
    let run = |calls: &Path| {
        airlock(&[
            "run",
            files.to_str().unwrap(),
            "--policy",
            &policy,
            "--calls",
            calls.to_str().unwrap(),
            "--isolation",
            "process",
        ])
    };
    let o = run(&calls);
    // One call failed (no such tool): exit 1, every outcome printed, the
    // calls after it run too.
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = stdout_json(&o);
    let c = v["calls"].as_array().unwrap();
    assert_eq!(c.len(), 4, "{v}");
    assert_eq!(c[3]["result"]["error"]["kind"], "unknown_tool", "{v}");
    assert_eq!(c[0]["result"]["ok"]["ok"], 4, "{v}");
    assert_eq!(c[1]["result"]["ok"]["ok"], "made", "{v}");
    assert!(c[2]["result"]["ok"]["err"].is_string(), "{v}");
    // Bad files: named.
    std::fs::write(&calls, r#"[{"tool": "files_read", "arguments": {}}]"#).unwrap();
    let o = run(&calls);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--calls"), "{}", stderr(&o));
    std::fs::write(&calls, "[]").unwrap();
    assert!(stderr(&run(&calls)).contains("the array is empty"));
}

#[test]
fn run_reports_errors_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let escape = common::example("escape");
    let policy = write_policy(dir.path(), "version = 1\n[limits]\nfuel = 1000000\n");
    let o = airlock(&[
        "run",
        escape.to_str().unwrap(),
        "--policy",
        &policy,
        "--tool",
        "spin",
        "--isolation",
        "process",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout_json(&o)["result"]["error"]["kind"], "cpu_limit");

    let o = airlock(&[
        "run",
        escape.to_str().unwrap(),
        "--tool",
        "read-env",
        "--args",
        "{not json",
        "--isolation",
        "process",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--args is not valid JSON"));

    let o = airlock(&[
        "run",
        escape.to_str().unwrap(),
        "--tool",
        "read-env",
        "--args",
        r#"{"key": 5}"#,
        "--isolation",
        "process",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v = stdout_json(&o);
    assert_eq!(v["result"]["error"]["kind"], "bad_arguments");
    assert_eq!(v["result"]["error"]["path"], "args.key");

    // Extra egress CAs are for the host's proxy, which both isolations use;
    // a file that is no certificate is refused before anything runs.
    let o = airlock(&[
        "run",
        escape.to_str().unwrap(),
        "--tool",
        "spin",
        "--isolation",
        "process",
        "--egress-ca",
        &policy,
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("not valid PEM certificates"),
        "{}",
        stderr(&o)
    );

    let o = airlock(&[
        "run",
        escape.to_str().unwrap(),
        "--tool",
        "spin",
        "--isolation",
        "vm",
    ]);
    // The default is the microVM. This host's /dev/kvm is PVM (or missing):
    // a clear refusal that points at the development mode, never a hang.
    assert_eq!(o.status.code(), Some(2));
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(stderr(&o).contains("PVM"), "{}", stderr(&o));
        assert!(stderr(&o).contains("--isolation process"), "{}", stderr(&o));
    }
}

#[test]
fn policy_check_validates_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_policy(
        dir.path(),
        "version = 1\n[[filesystem]]\nhost = \"x\"\nguest = \"/x\"\nmode = \"rwx\"\n",
    );
    let o = airlock(&["policy", "check", &bad]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("filesystem[0].mode: expected \"ro\" or \"rw\", got \"rwx\""),
        "{}",
        stderr(&o)
    );

    std::fs::create_dir(dir.path().join("data")).unwrap();
    let good = write_policy(
        dir.path(),
        "version = 1\n[[filesystem]]\nhost = \"data\"\nguest = \"/data\"\nmode = \"ro\"\n[env]\nKEY = \"v\"\n",
    );
    let o = airlock(&["policy", "check", &good]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("is valid"));

    // fetch imports HTTP (not granted) and no filesystem (granted): both reported.
    let fetch = common::example("fetch");
    let o = airlock(&[
        "policy",
        "check",
        &good,
        "--component",
        fetch.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let findings = stdout_json(&o)["report"]["findings"]
        .as_array()
        .unwrap()
        .clone();
    let has = |sev: &str, subject: &str| {
        findings
            .iter()
            .any(|f| f["severity"] == sev && f["subject"] == subject)
    };
    assert!(has("will_be_denied", "http.allow"), "{findings:?}");
    assert!(has("over_grant", "filesystem[0]"), "{findings:?}");
}
