//! `airlock serve` end to end: a real server process on 127.0.0.1, real HTTP
//! clients (reqwest, and rmcp — the official Rust MCP SDK — for /mcp).

mod common;

use common::server::{ADMIN, AUDITOR, INVOKER, OTHER_ADMIN, Server};
use serde_json::{Value, json};
use std::io::{Read, Write};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn files_policy(shared: &std::path::Path) -> String {
    format!(
        "version = 1\n[limits]\ntimeout = \"5s\"\n[[filesystem]]\nhost = {:?}\nguest = \"/data\"\nmode = \"ro\"\n",
        std::fs::canonicalize(shared).unwrap()
    )
}

#[test]
fn full_flow_upload_policy_export_invoke_audit_verify_and_restart() {
    let d = tmp();
    let mut srv = Server::start(d.path(), "");
    let c = srv.client();
    std::fs::write(d.path().join("shared/notes.txt"), "alpha\nbeta\n").unwrap();

    // Raw upload.
    let r = c.upload(ADMIN, "kitchen", common::example_bytes("kitchen"));
    assert_eq!(r.status, 201, "{}", r.json);
    assert!(
        r.json["tools"]
            .as_array()
            .unwrap()
            .contains(&json!("kitchen__greet"))
    );
    // Same bytes again: idempotent.
    assert_eq!(
        c.upload(ADMIN, "kitchen", common::example_bytes("kitchen"))
            .status,
        200
    );

    // Multipart upload with a first policy.
    let form = reqwest::blocking::multipart::Form::new()
        .text("name", "files")
        .text("policy", files_policy(&d.path().join("shared")))
        .part(
            "component",
            reqwest::blocking::multipart::Part::bytes(common::example_bytes("files"))
                .file_name("files.wasm"),
        );
    let r = c.send(
        c.http
            .post(format!("{}/v1/components", c.url))
            .bearer_auth(ADMIN)
            .multipart(form),
    );
    assert_eq!(r.status, 201, "{}", r.json);

    // List and get.
    let list = c.get(ADMIN, "/v1/components").json;
    let names: Vec<&str> = list["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["files", "kitchen"]);
    let files = c.get(ADMIN, "/v1/components/files").json;
    assert_eq!(files["policy_version"], 1);
    let digest = files["digest"].as_str().unwrap().to_string();
    assert_eq!(digest.len(), 64);
    assert!(srv.data().join("blobs").join(&digest).exists());
    // The compiled form is cached next to the blob, keyed by engine configuration.
    let artifacts: Vec<String> = std::fs::read_dir(srv.data().join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        artifacts
            .iter()
            .any(|a| a.starts_with(&digest) && a.ends_with(".cwasm")),
        "{artifacts:?}"
    );
    assert!(files["tools"].as_array().unwrap().len() >= 4);
    assert!(
        files["capabilities"]
            .as_array()
            .unwrap()
            .contains(&json!("filesystem"))
    );

    // Tool export in all three shapes.
    let oa = c.get(INVOKER, "/v1/tools?format=openai").json;
    let greet = oa["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["function"]["name"] == "kitchen__greet")
        .expect("openai greet");
    assert_eq!(greet["type"], "function");
    assert_eq!(greet["function"]["parameters"]["required"], json!(["name"]));
    assert_eq!(greet["function"]["description"], "Greet someone by name.");
    let an = c.get(INVOKER, "/v1/tools?format=anthropic").json;
    let t0 = &an["tools"][0];
    assert!(
        t0["input_schema"].is_object() && t0["name"].is_string() && t0.get("parameters").is_none()
    );
    let mcp = c.get(INVOKER, "/v1/tools?format=mcp").json;
    let t0 = &mcp["tools"][0];
    assert!(t0["inputSchema"].is_object() && t0["outputSchema"]["type"] == "object");
    for t in mcp["tools"].as_array().unwrap() {
        let n = t["name"].as_str().unwrap();
        assert!(
            n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
            "{n}"
        );
    }
    assert_eq!(c.get(INVOKER, "/v1/tools?format=gemini").status, 400);

    // Invoke.
    let r = c.invoke(INVOKER, "kitchen__greet", json!({"name": "Ada"}));
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["result"]["ok"], "Hello, Ada.");
    assert!(r.json["metering"]["fuel_used"].as_u64().unwrap() > 0);
    let greet_record = r.json["audit"]["record"].as_i64().unwrap();
    let r = c.invoke(
        INVOKER,
        "files__files_read",
        json!({"path": "/data/notes.txt"}),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["policy_version"], 1);
    assert!(
        r.json["result"]["ok"].to_string().contains("alpha"),
        "{}",
        r.json
    );
    let ev = &r.json["audit"]["events"];
    assert!(
        ev.as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "fs.open" && e["decision"] == "allow"),
        "{ev}"
    );
    // A write to the read-only grant is denied and audited.
    let r = c.invoke(
        INVOKER,
        "files__files_write",
        json!({"path": "/data/x.txt", "content": "no"}),
    );
    assert_eq!(r.status, 200);
    assert!(r.json["result"]["ok"]["err"].is_string(), "{}", r.json);
    assert!(!d.path().join("shared/x.txt").exists());

    // Policy versions, diff, report.
    let v2 = files_policy(&d.path().join("shared"))
        .replace("\"5s\"", "\"7s\"")
        .replace("\"ro\"", "\"rw\"");
    let r = c.put_policy(ADMIN, "files", &v2);
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["version"], 2);
    let vs = c.get(AUDITOR, "/v1/components/files/policy/versions").json;
    assert_eq!(vs["versions"].as_array().unwrap().len(), 2);
    let diff = c
        .get(AUDITOR, "/v1/components/files/policy/diff?from=1&to=2")
        .json;
    let fields: Vec<&str> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["field"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"limits.timeout_ms"), "{diff}");
    assert!(fields.iter().any(|f| f.starts_with("filesystem")), "{diff}");
    let p1 = c.get(AUDITOR, "/v1/components/files/policy?version=1").json;
    assert!(p1["text"].as_str().unwrap().contains("\"ro\""));
    let rep = c.get(AUDITOR, "/v1/components/kitchen/report").json;
    assert_eq!(rep["policy_version"], 0);
    assert!(rep["report"].is_object(), "{rep}");

    // Audit query and verify.
    let recs = c.get(AUDITOR, "/v1/audit?component=files").json;
    let kinds: Vec<&str> = recs["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["component.upload", "invoke", "invoke", "policy.put"],
        "{recs}"
    );
    let denied = c.get(AUDITOR, "/v1/audit?decision=deny").json;
    assert!(
        denied["records"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["decision"] == "deny")
    );
    assert_eq!(denied["records"][0]["tool"], "files_write", "{denied}");
    let greet_rec = c
        .get(
            AUDITOR,
            &format!("/v1/audit?tool=greet&after_seq={}", greet_record - 1),
        )
        .json;
    assert_eq!(greet_rec["records"][0]["seq"], greet_record);
    assert_eq!(c.get(AUDITOR, "/v1/audit?decision=maybe").status, 400);
    let v = c.get(AUDITOR, "/v1/audit/verify").json;
    assert_eq!(v["ok"], true, "{v}");
    let head = (
        v["head_seq"].as_i64().unwrap(),
        v["head_hash"].as_str().unwrap().to_string(),
    );

    // Metrics and health; every series names the node (the host's name).
    let node = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let m = c.send(
        c.http
            .get(format!("{}/metrics", c.url))
            .bearer_auth(AUDITOR),
    );
    let text = m.json.as_str().unwrap().to_string();
    assert!(
        text.contains(&format!(
            "airlock_calls_total{{node=\"{}\",tenant=\"acme\",outcome=\"ok\"}}",
            node
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "airlock_denials_total{{node=\"{}\",tenant=\"acme\",action=\"fs.open\"}}",
            node
        )),
        "{text}"
    );
    assert!(text.contains("airlock_vms_running"));
    assert_eq!(c.send(c.http.get(format!("{}/metrics", c.url))).status, 401);
    assert_eq!(c.send(c.http.get(format!("{}/healthz", c.url))).status, 200);
    assert_eq!(
        c.send(c.http.get(format!("{}/readyz", c.url))).json["ready"],
        true
    );
    let api = c
        .send(c.http.get(format!("{}/v1/openapi.json", c.url)))
        .json;
    assert_eq!(api["openapi"], "3.1.0");

    // Restart: everything is still there and still works.
    srv.stop();
    let srv2 = Server::start(d.path(), "");
    let c = srv2.client();
    let list = c.get(ADMIN, "/v1/components").json;
    assert_eq!(list["components"].as_array().unwrap().len(), 2);
    assert_eq!(
        c.get(ADMIN, "/v1/components/files").json["policy_version"],
        2
    );
    let r = c.invoke(
        INVOKER,
        "kitchen__greet",
        json!({"name": "Bob", "excited": true}),
    );
    assert_eq!(r.json["result"]["ok"], "Hello, Bob!", "{}", r.json);
    let v = c
        .get(
            AUDITOR,
            &format!("/v1/audit/verify?head_seq={}&head_hash={}", head.0, head.1),
        )
        .json;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["records"].as_i64().unwrap(), head.0 + 1);

    // Delete.
    let r = c.send(
        c.http
            .delete(format!("{}/v1/components/kitchen", c.url))
            .bearer_auth(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(
        c.invoke(INVOKER, "kitchen__greet", json!({"name": "x"}))
            .status,
        404
    );
}

#[test]
fn tenants_are_isolated_and_roles_are_enforced() {
    let d = tmp();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    c.upload_example(ADMIN, "kitchen", "kitchen");

    // The other tenant sees nothing of acme's.
    assert_eq!(
        c.get(OTHER_ADMIN, "/v1/components").json["components"],
        json!([])
    );
    assert_eq!(c.get(OTHER_ADMIN, "/v1/components/kitchen").status, 404);
    assert_eq!(
        c.get(OTHER_ADMIN, "/v1/tools?format=openai").json["tools"],
        json!([])
    );
    assert_eq!(
        c.invoke(OTHER_ADMIN, "kitchen__greet", json!({"name": "x"}))
            .status,
        404
    );
    assert_eq!(c.get(OTHER_ADMIN, "/v1/audit").json["records"], json!([]));
    // ...and may use the same name for its own component.
    c.upload_example(OTHER_ADMIN, "kitchen", "escape");
    assert!(
        c.get(OTHER_ADMIN, "/v1/components/kitchen").json["tools"]
            .to_string()
            .contains("spin")
    );
    assert!(
        !c.get(ADMIN, "/v1/components/kitchen").json["tools"]
            .to_string()
            .contains("spin")
    );

    // Roles.
    let r = c.upload(INVOKER, "x", common::example_bytes("kitchen"));
    assert_eq!(r.status, 403, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "forbidden");
    assert_eq!(
        c.upload(AUDITOR, "x", common::example_bytes("kitchen"))
            .status,
        403
    );
    assert_eq!(
        c.put_policy(INVOKER, "kitchen", "version = 1\n").status,
        403
    );
    assert_eq!(
        c.invoke(AUDITOR, "kitchen__greet", json!({"name": "x"}))
            .status,
        403
    );
    // Review item 10: /metrics shows a tenant its own series only.
    c.invoke(ADMIN, "kitchen__greet", json!({"name": "x"}));
    let text = |r: common::server::Reply| r.json.as_str().unwrap_or_default().to_string();
    let mine = text(c.get(ADMIN, "/metrics"));
    assert!(mine.contains("tenant=\"acme\""), "{mine}");
    let theirs = text(c.get(OTHER_ADMIN, "/metrics"));
    assert!(theirs.contains("airlock_"), "{theirs}");
    assert!(!theirs.contains("tenant=\"acme\""), "{theirs}");
    // Review item 10: policies may not ask past the tenant's ceiling.
    let r = c.put_policy(
        ADMIN,
        "kitchen",
        "version = 1\n[limits]\nmemory = \"4 GiB\"\n",
    );
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(
        r.json["error"]["field"], "policy.limits.memory",
        "{}",
        r.json
    );
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ceiling"),
        "{}",
        r.json
    );
    let r = c.put_policy(
        ADMIN,
        "kitchen",
        "version = 1\n[limits]\nfuel = 9200000000000000000\n",
    );
    assert_eq!(r.json["error"]["field"], "policy.limits.fuel", "{}", r.json);
    // Review item 7: invokers call tools; they do not read what a tool may
    // do (policies hold env values such as API keys).
    c.put_policy(
        ADMIN,
        "kitchen",
        "version = 1\n[env]\nAPI_KEY = \"sk-live-123\"\n",
    );
    for path in [
        "/v1/components/kitchen/policy",
        "/v1/components/kitchen/policy/versions",
        "/v1/components/kitchen/policy/diff?from=1&to=1",
        "/v1/components/kitchen/report",
    ] {
        let r = c.get(INVOKER, path);
        assert_eq!(r.status, 403, "{path}: {}", r.json);
        assert!(
            !r.json.to_string().contains("sk-live"),
            "{path}: {}",
            r.json
        );
        assert_eq!(c.get(AUDITOR, path).status, 200, "{path}");
    }
    assert_eq!(c.get(INVOKER, "/v1/components/kitchen").status, 200);
    assert_eq!(c.get(INVOKER, "/v1/tools?format=openai").status, 200);
    assert_eq!(c.get(INVOKER, "/v1/audit").status, 403);
    assert_eq!(c.get(INVOKER, "/v1/audit/verify").status, 403);
    assert_eq!(c.get(AUDITOR, "/v1/audit").status, 200);
    assert_eq!(
        c.get(AUDITOR, "/v1/components/kitchen/policy/versions")
            .status,
        200
    );
    assert_eq!(
        c.send(
            c.http
                .delete(format!("{}/v1/components/kitchen", c.url))
                .bearer_auth(AUDITOR)
        )
        .status,
        403
    );
    // Authentication.
    assert_eq!(c.get("not-a-token", "/v1/components").status, 401);
    let r = c.send(c.http.get(format!("{}/v1/components", c.url)));
    assert_eq!(r.status, 401);
    assert_eq!(r.json["error"]["code"], "unauthorized");
}

#[test]
fn limits_give_clear_4xx_json_errors() {
    let d = tmp();
    let extra = "[limits]\nmax_upload_bytes = 1000000\nmax_request_bytes = 4096\nmax_args_bytes = 1024\nmax_concurrent_calls_per_tenant = 1\n";
    let srv = Server::start(d.path(), extra);
    let c = srv.client();
    // Oversized upload: 413, nothing registered, nothing left in tmp/.
    let r = c.upload(ADMIN, "big", vec![0u8; 1_100_000]);
    assert_eq!(r.status, 413, "{}", r.json);
    assert_eq!(r.json["error"]["field"], "component");
    assert_eq!(r.json["error"]["limit"], 1000000);
    assert_eq!(c.get(ADMIN, "/v1/components").json["components"], json!([]));
    assert_eq!(
        std::fs::read_dir(srv.data().join("tmp")).unwrap().count(),
        0
    );

    c.upload_example(ADMIN, "kitchen", "kitchen");
    c.upload_example(ADMIN, "escape", "escape");
    // Request body over max_request_bytes.
    let r = c.put_policy(
        ADMIN,
        "kitchen",
        &format!("version = 1\n#{}\n", "x".repeat(5000)),
    );
    assert_eq!(r.status, 413, "{}", r.json);
    assert_eq!(r.json["error"]["field"], "policy");
    // Arguments over max_args_bytes (but under the request limit).
    let r = c.invoke(INVOKER, "kitchen__greet", json!({"name": "n".repeat(2000)}));
    assert_eq!(r.status, 413, "{}", r.json);
    assert_eq!(r.json["error"]["field"], "arguments");

    // Per-tenant concurrency: one slow call holds the only slot.
    assert_eq!(
        c.put_policy(ADMIN, "escape", "version = 1\n[limits]\ntimeout = \"3s\"\n")
            .status,
        201
    );
    let url = c.url.clone();
    let slow = std::thread::spawn(move || {
        reqwest::blocking::Client::new()
            .post(format!("{url}/v1/tools/escape__sleep-forever:invoke"))
            .bearer_auth(INVOKER)
            .json(&json!({}))
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(800));
    let r = c.invoke(INVOKER, "kitchen__greet", json!({"name": "x"}));
    assert_eq!(r.status, 429, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "too_many_calls");
    // Another tenant is not affected.
    c.upload_example(OTHER_ADMIN, "kitchen", "kitchen");
    assert_eq!(
        c.invoke(OTHER_ADMIN, "kitchen__greet", json!({"name": "x"}))
            .status,
        200
    );
    let slow = slow.join().unwrap();
    assert_eq!(slow["result"]["error"]["kind"], "timeout", "{slow}");
    // The slot is free again.
    assert_eq!(
        c.invoke(INVOKER, "kitchen__greet", json!({"name": "x"}))
            .status,
        200
    );
}

#[test]
fn malformed_input_is_a_structured_error_and_never_kills_the_server() {
    let d = tmp();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    let r = c.upload(ADMIN, "junk", b"\0asm garbage".to_vec());
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "invalid_component");
    assert_eq!(r.json["error"]["field"], "component");
    // A core module, not a component.
    let core = b"\0asm\x01\0\0\0".to_vec();
    let r = c.upload(ADMIN, "core", core);
    assert_eq!(r.status, 400, "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("component"),
        "{}",
        r.json
    );
    let r = c.upload(ADMIN, "Bad Name", common::example_bytes("kitchen"));
    assert_eq!(r.json["error"]["field"], "name", "{}", r.json);
    let r = c.upload(ADMIN, "empty", vec![]);
    assert_eq!(r.status, 400);
    let r = c.send(
        c.http
            .post(format!("{}/v1/components", c.url))
            .bearer_auth(ADMIN)
            .body(common::example_bytes("kitchen")),
    );
    assert_eq!(r.json["error"]["field"], "name", "{}", r.json);
    assert_eq!(
        std::fs::read_dir(srv.data().join("blobs")).unwrap().count(),
        0,
        "rejected uploads leave no blobs"
    );

    c.upload_example(ADMIN, "kitchen", "kitchen");
    assert_eq!(
        c.upload(ADMIN, "kitchen", common::example_bytes("escape"))
            .status,
        409
    );
    // Bad policies name the field.
    let r = c.put_policy(
        ADMIN,
        "kitchen",
        "version = 1\n[limits]\nmemory = \"lots\"\n",
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json["error"]["field"], "policy.limits.memory",
        "{}",
        r.json
    );
    let r = c.put_policy(ADMIN, "kitchen", "version = [\n");
    assert_eq!(r.json["error"]["code"], "invalid_policy");
    let r = c.put_policy(
        ADMIN,
        "kitchen",
        "version = 1\n[[filesystem]]\nhost = \"/etc\"\nguest = \"/etc\"\nmode = \"ro\"\n",
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json["error"]["field"], "policy.filesystem[0].host",
        "{}",
        r.json
    );
    assert_eq!(c.put_policy(ADMIN, "nope", "version = 1\n").status, 404);
    // Bad JSON and bad arguments.
    let r = c.send(
        c.http
            .post(format!("{}/v1/tools/kitchen__greet:invoke", c.url))
            .bearer_auth(INVOKER)
            .body("{not json"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json["error"]["code"], "invalid_json");
    let r = c.post_json(
        INVOKER,
        "/v1/tools/kitchen__greet:invoke",
        &json!({"args": {}}),
    );
    assert_eq!(r.json["error"]["field"], "body.args", "{}", r.json);
    let r = c.invoke(INVOKER, "kitchen__greet", json!({"name": 42}));
    assert_eq!(r.status, 400);
    assert_eq!(r.json["error"]["code"], "bad_arguments");
    assert_eq!(r.json["error"]["field"], "args.name");
    let r = c.invoke(INVOKER, "kitchen__greet", json!([1, 2]));
    assert_eq!(r.json["error"]["field"], "arguments", "{}", r.json);
    assert_eq!(c.invoke(INVOKER, "kitchen__nope", json!({})).status, 404);
    assert_eq!(c.invoke(INVOKER, "nocomponent", json!({})).status, 404);
    assert_eq!(
        c.post_json(INVOKER, "/v1/tools/kitchen__greet", &json!({}))
            .status,
        404
    );
    assert_eq!(
        c.get(ADMIN, "/v1/components/kitchen/policy/diff?from=x")
            .status,
        400
    );
    assert_eq!(c.get(ADMIN, "/v1/nothing").status, 404);
    // Still serving.
    assert_eq!(
        c.invoke(INVOKER, "kitchen__greet", json!({"name": "ok"}))
            .status,
        200
    );
}

#[test]
fn kill_9_during_an_upload_leaves_no_half_registered_component() {
    let d = tmp();
    let mut srv = Server::start(d.path(), "");
    let addr = srv.url.trim_start_matches("http://").to_string();
    let total = 4 << 20;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/components?name=half HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/wasm\r\nContent-Length: {total}\r\n\r\n"
    )
    .unwrap();
    s.write_all(&vec![7u8; total / 2]).unwrap();
    s.flush().unwrap();
    // Wait until the server is writing the upload, then kill it.
    let tmp_dir = srv.data().join("tmp");
    let start = std::time::Instant::now();
    loop {
        let written: u64 = std::fs::read_dir(&tmp_dir)
            .unwrap()
            .flatten()
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        if written > 0 {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 30,
            "the upload never reached tmp/"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    srv.kill9();
    drop(s);
    assert_eq!(
        std::fs::read_dir(&tmp_dir).unwrap().count(),
        1,
        "the partial upload is on disk"
    );

    let srv = Server::start(d.path(), "");
    let c = srv.client();
    assert_eq!(c.get(ADMIN, "/v1/components").json["components"], json!([]));
    assert_eq!(
        std::fs::read_dir(&tmp_dir).unwrap().count(),
        0,
        "cleaned at start"
    );
    assert_eq!(
        std::fs::read_dir(srv.data().join("blobs")).unwrap().count(),
        0
    );
    assert_eq!(c.get(AUDITOR, "/v1/audit/verify").json["ok"], true);
    // The name is free and the service works.
    c.upload_example(ADMIN, "half", "kitchen");
}

/// `bytes` with a custom section named `airlock-test` holding `tag`: the
/// same component, another digest.
fn with_custom_section(bytes: &[u8], tag: u32) -> Vec<u8> {
    let name = b"airlock-test";
    let payload = tag.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    let mut out = bytes.to_vec();
    out.push(0); // custom section id
    out.push(u8::try_from(size).unwrap()); // LEB128, small
    out.push(u8::try_from(name.len()).unwrap());
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

#[test]
fn kill_9_at_random_points_during_200_uploads_loses_no_acknowledged_component() {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::{Arc, Mutex, RwLock};
    use std::time::{Duration, Instant};

    const UPLOADS: u32 = 200;
    const KILLS: u32 = 5;
    // A small LCG: the seed is printed, so a failure can be replayed.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    eprintln!("kill-9 upload test seed: {seed}");
    let mut rng = u64::from(seed) | 1;
    let mut next = move |n: u64| {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) % n
    };

    let d = tmp();
    let kitchen = common::example_bytes("kitchen");
    let srv = Arc::new(Mutex::new(Server::start(d.path(), "")));
    let url = Arc::new(RwLock::new(srv.lock().unwrap().url.clone()));
    let counter = Arc::new(AtomicU32::new(0));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (url, counter, acked, kitchen) =
                (url.clone(), counter.clone(), acked.clone(), kitchen.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .unwrap();
                loop {
                    let i = counter.fetch_add(1, Ordering::SeqCst);
                    if i >= UPLOADS {
                        return;
                    }
                    // Every tenth upload is a new digest (a new blob);
                    // the rest reuse one (a new row and audit record).
                    let bytes = if i % 10 == 0 {
                        with_custom_section(&kitchen, i)
                    } else {
                        kitchen.clone()
                    };
                    let name = format!("u{i}");
                    // Retried until answered: a kill may drop the request.
                    let start = Instant::now();
                    loop {
                        let base = url.read().unwrap().clone();
                        let r = http
                            .post(format!("{base}/v1/components?name={name}"))
                            .bearer_auth(ADMIN)
                            .header("content-type", "application/wasm")
                            .body(bytes.clone())
                            .send();
                        match r.map(|r| r.status().as_u16()) {
                            // 200: registered before a kill lost the 201;
                            // the same bytes again are acknowledged as
                            // already there.
                            Ok(201 | 200) => {
                                acked.lock().unwrap().insert(name.clone());
                                break;
                            }
                            Ok(409) => break,
                            Ok(other) => panic!("upload {name}: status {other}"),
                            Err(_) => {
                                assert!(
                                    start.elapsed() < Duration::from_secs(120),
                                    "upload {name} never got an answer"
                                );
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let killer = {
        let (srv, url, counter, done) = (srv.clone(), url.clone(), counter.clone(), done.clone());
        let dir = d.path().to_path_buf();
        let waits: Vec<u64> = (0..KILLS).map(|_| 100 + next(400)).collect();
        std::thread::spawn(move || {
            let mut kills = 0;
            for w in waits {
                std::thread::sleep(Duration::from_millis(w));
                if counter.load(Ordering::SeqCst) >= UPLOADS {
                    break;
                }
                let mut s = srv.lock().unwrap();
                s.kill9();
                *s = Server::start(&dir, "");
                *url.write().unwrap() = s.url.clone();
                kills += 1;
            }
            done.store(true, Ordering::SeqCst);
            kills
        })
    };
    for w in workers {
        w.join().unwrap();
    }
    let kills = killer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert!(kills >= 1, "the server was never killed mid-run");

    // A clean restart: every acknowledged upload is there, complete, and
    // the audit chain holds.
    let mut s = srv.lock().unwrap();
    s.kill9();
    *s = Server::start(d.path(), "");
    let c = s.client();
    let listed: BTreeSet<String> = c.get(ADMIN, "/v1/components").json["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    let acked = acked.lock().unwrap();
    let lost: Vec<_> = acked.difference(&listed).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but lost after kill -9: {lost:?}"
    );
    assert!(acked.len() as u32 <= UPLOADS && listed.len() as u32 <= UPLOADS);
    for name in &listed {
        let r = c.get(ADMIN, &format!("/v1/components/{name}"));
        assert_eq!(r.status, 200, "{name}: {}", r.json);
        assert!(
            r.json["tools"].as_array().is_some_and(|t| !t.is_empty()),
            "{name}"
        );
    }
    let v = c.get(AUDITOR, "/v1/audit/verify").json;
    assert_eq!(v["ok"], true, "{v}");
    eprintln!(
        "kill-9 upload test: {kills} kills, {} acknowledged, {} registered",
        acked.len(),
        listed.len()
    );
}

#[test]
fn audit_verify_cli_detects_edits_deletions_and_reordering() {
    let d = tmp();
    let mut srv = Server::start(d.path(), "");
    let c = srv.client();
    c.upload(ADMIN, "kitchen", common::example_bytes("kitchen"));
    for n in ["a", "b", "c"] {
        assert_eq!(
            c.invoke(INVOKER, "kitchen__greet", json!({"name": n}))
                .status,
            200
        );
    }
    srv.stop();
    let data = srv.data();
    let verify = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["audit", "verify", "--data-dir"])
            .arg(&data)
            .args(extra)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        (o.status.code(), v)
    };
    let (code, v) = verify(&[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["records"], 4);
    let anchor = format!("4:{}", v["head_hash"].as_str().unwrap());

    let db = rusqlite::Connection::open(data.join("airlock.db")).unwrap();
    let snapshot: Vec<(i64, String, String)> = {
        let mut st = db
            .prepare("SELECT seq, body, hash FROM audit ORDER BY seq")
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    // Edit.
    db.execute("UPDATE audit SET decision = 'deny' WHERE seq = 3", [])
        .unwrap();
    let (code, v) = verify(&[]);
    assert_eq!(code, Some(1));
    assert!(
        v["problem"]
            .as_str()
            .unwrap()
            .contains("record 3 was edited"),
        "{v}"
    );
    db.execute("UPDATE audit SET decision = 'allow' WHERE seq = 3", [])
        .unwrap();
    assert_eq!(verify(&[]).0, Some(0));
    // Reorder (swap the bodies and hashes of 2 and 3).
    db.execute(
        "UPDATE audit SET body = ?1, hash = ?2 WHERE seq = 2",
        rusqlite::params![snapshot[2].1, snapshot[2].2],
    )
    .unwrap();
    db.execute(
        "UPDATE audit SET body = ?1, hash = ?2 WHERE seq = 3",
        rusqlite::params![snapshot[1].1, snapshot[1].2],
    )
    .unwrap();
    assert_eq!(verify(&[]).0, Some(1));
    db.execute(
        "UPDATE audit SET body = ?1, hash = ?2 WHERE seq = 2",
        rusqlite::params![snapshot[1].1, snapshot[1].2],
    )
    .unwrap();
    db.execute(
        "UPDATE audit SET body = ?1, hash = ?2 WHERE seq = 3",
        rusqlite::params![snapshot[2].1, snapshot[2].2],
    )
    .unwrap();
    assert_eq!(verify(&[]).0, Some(0));
    // Delete in the middle; then truncation, caught by the anchor.
    let tx = db.unchecked_transaction().unwrap();
    tx.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
    tx.commit().unwrap();
    assert_eq!(
        verify(&[]).0,
        Some(0),
        "a shorter chain is valid on its own"
    );
    let (code, v) = verify(&["--anchor", &anchor]);
    assert_eq!(code, Some(1));
    assert!(
        v["problem"]
            .as_str()
            .unwrap()
            .contains("removed from the end"),
        "{v}"
    );
    db.execute("DELETE FROM audit WHERE seq = 2", []).unwrap();
    let (code, v) = verify(&[]);
    assert_eq!(code, Some(1));
    assert!(
        v["problem"]
            .as_str()
            .unwrap()
            .contains("record 2 is missing"),
        "{v}"
    );
}

#[test]
fn mcp_works_with_the_official_rust_client_and_validates_origin_and_session() {
    use rmcp::ServiceExt;
    use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;

    let d = tmp();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    c.upload_example(ADMIN, "kitchen", "kitchen");
    c.upload_example(ADMIN, "escape", "escape");
    let mcp_url = format!("{}/mcp", srv.url);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut cfg = StreamableHttpClientTransportConfig::with_uri(mcp_url.clone());
        cfg.auth_header = Some(INVOKER.to_string());
        let transport = StreamableHttpClientTransport::from_config(cfg);
        let info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("airlock-test", "0.1"),
        );
        let client = info.serve(transport).await.expect("MCP initialize");
        let server = client.peer_info().expect("server info");
        assert_eq!(
            server.server_info.as_ref().map(|i| i.name.as_str()),
            Some("airlock")
        );

        let tools = client
            .list_tools(Default::default())
            .await
            .expect("tools/list");
        let names: Vec<String> = tools.tools.iter().map(|t| t.name.to_string()).collect();
        assert!(names.contains(&"kitchen__greet".to_string()), "{names:?}");
        assert!(names.contains(&"escape__spin".to_string()));

        let args = json!({"name": "Ada"}).as_object().cloned().unwrap();
        let r = client
            .call_tool(CallToolRequestParams::new("kitchen__greet").with_arguments(args))
            .await
            .expect("tools/call");
        assert_eq!(r.is_error, Some(false));
        assert_eq!(r.structured_content, Some(json!({"result": "Hello, Ada."})));

        // Bad arguments come back as a tool error the model can read.
        let bad = json!({"name": 1}).as_object().cloned().unwrap();
        let r = client
            .call_tool(CallToolRequestParams::new("kitchen__greet").with_arguments(bad))
            .await
            .expect("tools/call");
        assert_eq!(r.is_error, Some(true));
        // Unknown tool: a JSON-RPC error.
        assert!(
            client
                .call_tool(CallToolRequestParams::new("kitchen__nope"))
                .await
                .is_err()
        );
        client.cancel().await.unwrap();
    });

    // Raw protocol checks.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}});
    let post = |origin: Option<&str>, session: Option<&str>, body: &Value| {
        let mut rq = c
            .http
            .post(&mcp_url)
            .bearer_auth(INVOKER)
            .header("accept", "application/json, text/event-stream")
            .json(body);
        if let Some(o) = origin {
            rq = rq.header("origin", o);
        }
        if let Some(s) = session {
            rq = rq.header("mcp-session-id", s);
        }
        rq.send().unwrap()
    };
    assert_eq!(post(Some("http://evil.example"), None, &init).status(), 403);
    let ok = post(Some("http://localhost:5173"), None, &init);
    assert_eq!(ok.status(), 200);
    let session = ok.headers()["mcp-session-id"].to_str().unwrap().to_string();
    assert_eq!(
        ok.json::<Value>().unwrap()["result"]["protocolVersion"],
        "2025-06-18"
    );
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    assert_eq!(post(None, None, &list).status(), 400, "session required");
    assert_eq!(post(None, Some("bogus"), &list).status(), 404);
    let r = post(None, Some(&session), &list);
    assert_eq!(r.status(), 200);
    assert!(r.json::<Value>().unwrap()["result"]["tools"].is_array());
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert_eq!(post(None, Some(&session), &note).status(), 202);
    let r = post(
        None,
        Some(&session),
        &json!({"jsonrpc": "2.0", "id": 3, "method": "nope"}),
    );
    assert_eq!(r.json::<Value>().unwrap()["error"]["code"], -32601);
    assert_eq!(
        c.http
            .get(&mcp_url)
            .bearer_auth(INVOKER)
            .send()
            .unwrap()
            .status(),
        405
    );
    assert_eq!(
        c.http.post(&mcp_url).json(&init).send().unwrap().status(),
        401
    );
    // Another tenant cannot use this session.
    let r = c
        .http
        .post(&mcp_url)
        .bearer_auth(OTHER_ADMIN)
        .header("mcp-session-id", &session)
        .json(&list)
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let del = c
        .http
        .delete(&mcp_url)
        .bearer_auth(INVOKER)
        .header("mcp-session-id", &session)
        .send()
        .unwrap();
    assert_eq!(del.status(), 204);
    assert_eq!(post(None, Some(&session), &list).status(), 404);

    // Review item 10: an `initialize` inside a batch let the rest of the
    // batch skip the session check.
    let batch = json!([init, list]);
    let r = post(None, None, &batch);
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("mcp-session-id").is_none());
    // ...and one client made 15,000 sessions that never expired: a tenant
    // holds at most 256, the least recently used going first.
    let first = post(None, None, &init).headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let mut last = String::new();
    for _ in 0..256 {
        last = post(None, None, &init).headers()["mcp-session-id"]
            .to_str()
            .unwrap()
            .to_string();
    }
    assert_eq!(
        post(None, Some(&first), &list).status(),
        404,
        "the oldest was evicted"
    );
    assert_eq!(post(None, Some(&last), &list).status(), 200);
}

/// A scripted conversation of examples/agent-loop.
fn agent_script(name: &str) -> String {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    std::fs::read_to_string(manifest.join("../examples/agent-loop").join(name)).unwrap()
}

#[test]
fn agent_loop_example_plays_a_function_calling_conversation() {
    let d = tmp();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    c.upload_example(ADMIN, "kitchen", "kitchen");
    let script = agent_script("script.json");
    let model = agent_loop::ScriptedModel::parse(&script).unwrap();
    let messages = agent_loop::run(&agent_loop::Airlock::new(&srv.url, INVOKER), &model).unwrap();
    let tool_msgs: Vec<&Value> = messages.iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(tool_msgs.len(), 3);
    assert_eq!(
        tool_msgs[0]["content"],
        json!({"ok": "Hello, Ada!"}).to_string()
    );
    // The bad call comes back with the field at fault, for the model to fix.
    let err: Value = serde_json::from_str(tool_msgs[1]["content"].as_str().unwrap()).unwrap();
    assert_eq!(err["error"]["field"], "args.values[0]", "{err}");
    let ok: Value = serde_json::from_str(tool_msgs[2]["content"].as_str().unwrap()).unwrap();
    assert_eq!(ok["ok"]["count"], 4, "{ok}");
    assert_eq!(messages.last().unwrap()["role"], "assistant");
    // A tool that was not offered stops the loop.
    let bad = agent_loop::ScriptedModel::parse(&script.replace("kitchen__greet", "kitchen__rm-rf"))
        .unwrap();
    assert!(matches!(
        agent_loop::run(&agent_loop::Airlock::new(&srv.url, INVOKER), &bad),
        Err(agent_loop::LoopError::UnknownTool(_))
    ));
}

#[test]
fn a_call_whose_client_disconnects_still_finishes_and_is_audited() {
    let d = tmp();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    c.upload_example(ADMIN, "escape", "escape");
    assert_eq!(
        c.put_policy(ADMIN, "escape", "version = 1\n[limits]\ntimeout = \"2s\"\n")
            .status,
        201
    );
    let addr = srv.url.trim_start_matches("http://").to_string();
    let body = r#"{"arguments": {}}"#;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/tools/escape__sleep-forever:invoke HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {INVOKER}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    drop(s);
    // The call runs to its 2 s timeout and is recorded anyway.
    let start = std::time::Instant::now();
    loop {
        let recs = c.get(AUDITOR, "/v1/audit?kind=invoke").json;
        if let Some(r) = recs["records"].as_array().and_then(|a| a.first()) {
            assert_eq!(r["tool"], "sleep-forever");
            assert_eq!(r["body"]["result"], "timeout", "{r}");
            break;
        }
        assert!(
            start.elapsed().as_secs() < 20,
            "the abandoned call was never recorded"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    // `nc` and some proxies shut down their sending side once the request
    // is out. That is not a disconnect: the call runs and is answered.
    let d = tmp();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    c.upload_example(ADMIN, "kitchen", "kitchen");
    let addr = srv.url.trim_start_matches("http://").to_string();
    let body = r#"{"arguments": {"name": "half"}}"#;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /v1/tools/kitchen__greet:invoke HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {INVOKER}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.contains(r#""ok":"Hello, half.""#), "{answer}");
}

fn fs_policy(host: &str, mode: &str) -> String {
    format!("version = 1\n[[filesystem]]\nhost = {host:?}\nguest = \"/data\"\nmode = \"{mode}\"\n")
}

/// Review item 1: a `..` path, a missing path (the race needs one) and a
/// path through a symlink are refused when stored; a directory swapped for
/// a link after it was stored is refused at call time, never followed.
/// Review item 8: one tenant cannot grant another tenant's directory.
#[test]
fn granted_directories_cannot_be_made_to_point_outside_the_tenants_own() {
    let d = tmp();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    c.upload_example(ADMIN, "files", "files");
    let shared = std::fs::canonicalize(d.path().join("shared")).unwrap();
    let globex = std::fs::canonicalize(d.path().join("globex")).unwrap();
    std::fs::write(globex.join("secret.txt"), "globex's\n").unwrap();
    let refused = |text: String, why: &str| {
        let r = c.put_policy(ADMIN, "files", &text);
        assert_eq!(r.status, 400, "{text}: {}", r.json);
        assert_eq!(
            r.json["error"]["field"], "policy.filesystem[0].host",
            "{}",
            r.json
        );
        let msg = r.json["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(why), "{text}: {msg}");
    };
    // The review's path: inside by its text, /etc by its meaning once `x`
    // exists; and `x` does not exist yet.
    let dotdot = format!("{}/x/../../../../../../etc", shared.display());
    refused(fs_policy(&dotdot, "ro"), "`..`");
    refused(
        fs_policy(&format!("{}/x", shared.display()), "ro"),
        "cannot be granted",
    );
    // A symlink inside the tenant's directory pointing out of it.
    std::os::unix::fs::symlink("/etc", shared.join("etc-link")).unwrap();
    refused(
        fs_policy(&format!("{}/etc-link", shared.display()), "ro"),
        "symbolic link",
    );
    // Another tenant's directory, and the data directory.
    refused(
        fs_policy(&globex.display().to_string(), "rw"),
        "allowed_host_dirs",
    );
    refused(
        fs_policy(&srv.data().display().to_string(), "ro"),
        "allowed_host_dirs",
    );
    refused(fs_policy("relative/dir", "ro"), "relative");

    // Stored while real; swapped for a link out before the call.
    std::fs::create_dir(shared.join("x")).unwrap();
    std::fs::write(shared.join("x/notes.txt"), "mine\n").unwrap();
    let r = c.put_policy(
        ADMIN,
        "files",
        &fs_policy(&format!("{}/x", shared.display()), "ro"),
    );
    assert_eq!(r.status, 201, "{}", r.json);
    let r = c.invoke(
        ADMIN,
        "files__files_read",
        json!({"path": "/data/notes.txt"}),
    );
    assert_eq!(r.json["result"]["ok"]["ok"], "mine\n", "{}", r.json);
    std::fs::remove_dir_all(shared.join("x")).unwrap();
    std::os::unix::fs::symlink(&globex, shared.join("x")).unwrap();
    let r = c.invoke(
        ADMIN,
        "files__files_read",
        json!({"path": "/data/secret.txt"}),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["result"]["error"]["kind"], "grant", "{}", r.json);
    assert!(!r.json.to_string().contains("globex's"), "{}", r.json);

    // globex itself may grant its own directory.
    c.upload_example(OTHER_ADMIN, "files", "files");
    let r = c.put_policy(
        OTHER_ADMIN,
        "files",
        &fs_policy(&globex.display().to_string(), "ro"),
    );
    assert_eq!(r.status, 201, "{}", r.json);
    let r = c.invoke(
        OTHER_ADMIN,
        "files__files_read",
        json!({"path": "/data/secret.txt"}),
    );
    assert_eq!(r.json["result"]["ok"]["ok"], "globex's\n", "{}", r.json);
}

/// Review item 7: an `env` value marked secret reaches the call and no
/// route: not the policy, its text, a diff or a report.
#[test]
fn secret_env_values_are_never_returned() {
    let d = tmp();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    c.upload_example(ADMIN, "escape", "escape");
    let r = c.put_policy(
        ADMIN,
        "escape",
        "version = 1\n[env]\nAPI_KEY = { secret = \"sk-live-123\" }\n",
    );
    assert_eq!(r.status, 201, "{}", r.json);
    c.put_policy(
        ADMIN,
        "escape",
        "version = 1\n[env]\nAPI_KEY = { secret = \"sk-live-456\" }\n",
    );
    for path in [
        "/v1/components/escape/policy",
        "/v1/components/escape/policy?version=1",
        "/v1/components/escape/policy/diff?from=1&to=2",
        "/v1/components/escape/report",
    ] {
        for who in [ADMIN, AUDITOR] {
            let r = c.get(who, path);
            assert_eq!(r.status, 200, "{path}: {}", r.json);
            assert!(
                !r.json.to_string().contains("sk-live"),
                "{path}: {}",
                r.json
            );
        }
    }
    assert!(
        c.get(ADMIN, "/v1/components/escape/policy")
            .json
            .to_string()
            .contains("secret_sha256")
    );
    let r = c.invoke(INVOKER, "escape__read-env", json!({"key": "API_KEY"}));
    assert_eq!(r.json["result"]["ok"]["ok"], "sk-live-456", "{}", r.json);
    // The audit trail names the key, never the value.
    assert!(
        !c.get(AUDITOR, "/v1/audit")
            .json
            .to_string()
            .contains("sk-live")
    );
}

/// Issue 14: a per-tenant state volume. A policy grants it by name; two
/// calls see the same state; another tenant's volume of the same name is
/// its own; a call may write only the room left (none when it is full:
/// the call still runs, so it can read and remove).
#[test]
fn a_state_volume_keeps_a_tenants_state_across_calls_within_its_quota() {
    let d = tmp();
    let srv = Server::start(
        d.path(),
        "[[volumes]]\nname = \"notes\"\nquota = \"64 KiB\"\n",
    );
    let c = srv.client();
    let policy =
        "version = 1\n[[filesystem]]\nvolume = \"notes\"\nguest = \"/state\"\nmode = \"rw\"\n";
    for t in [ADMIN, OTHER_ADMIN] {
        c.upload_example(t, "notes", "notes");
        let r = c.put_policy(t, "notes", policy);
        assert_eq!(r.status, 201, "{}", r.json);
    }
    let add = |t: &str, text: &str| c.invoke(t, "notes__notes_add", json!({ "text": text }));
    let list = |t: &str| {
        let r = c.invoke(t, "notes__notes_list", json!({}));
        assert_eq!(r.status, 200, "{}", r.json);
        r.json["result"]["ok"]["ok"].clone()
    };
    assert_eq!(add(ADMIN, "first").json["result"]["ok"]["ok"], 1);
    assert_eq!(add(ADMIN, "second\tline").json["result"]["ok"]["ok"], 2);
    assert_eq!(
        list(ADMIN),
        json!([{"id": 1, "text": "first"}, {"id": 2, "text": "second\tline"}])
    );
    assert_eq!(list(OTHER_ADMIN), json!([]));
    let vol = srv.data().join("volumes/acme/notes");
    assert!(vol.join("notes.txt").is_file());
    assert!(!srv.data().join("volumes/globex/notes/notes.txt").exists());

    // A volume the server does not have.
    let r = c.put_policy(ADMIN, "notes", &policy.replace("\"notes\"", "\"other\""));
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(r.json["error"]["field"], "policy.filesystem[0].volume");

    // 52 KiB more: about 8 KiB left. Notes of 4000 bytes: within three,
    // one is refused by the write limit, and what was there stays.
    std::fs::write(vol.join("pad"), vec![0u8; 52 << 10]).unwrap();
    let big = "n".repeat(4000);
    let kinds: Vec<Value> = (0..3)
        .map(|_| add(ADMIN, &big).json["result"].clone())
        .collect();
    assert!(
        kinds.iter().any(|r| r["error"]["kind"] == "write_limit"),
        "{kinds:?}"
    );
    let notes = list(ADMIN);
    assert_eq!(notes[0], json!({"id": 1, "text": "first"}), "{notes}");

    // Full: no write at all, reading and removing still work.
    std::fs::write(vol.join("pad"), vec![0u8; 64 << 10]).unwrap();
    let r = add(ADMIN, "more");
    assert_eq!(
        r.json["result"]["error"]["kind"], "write_limit",
        "{}",
        r.json
    );
    assert_eq!(list(ADMIN)[0]["id"], 1);
    let r = c.invoke(ADMIN, "notes__notes_clear", json!({}));
    assert!(
        r.json["result"]["ok"]["ok"].as_u64().unwrap() >= 2,
        "{}",
        r.json
    );
    assert!(!vol.join("notes.txt").exists());
    // Room again once something goes.
    std::fs::remove_file(vol.join("pad")).unwrap();
    assert!(add(ADMIN, "after").json["result"]["ok"]["ok"].is_u64());
}

/// Connections are capped (they must not take the descriptors calls and
/// their microVMs need) and a connection that sends no request is closed
/// after `header_timeout_secs`: idle clients can hold the slots only that
/// long, and a waiting client is then served.
#[test]
fn idle_connections_hold_the_connection_slots_only_until_their_timeout() {
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    let d = tmp();
    let srv = Server::start(
        d.path(),
        "[limits]\nmax_connections = 2\nheader_timeout_secs = 2\n",
    );
    let addr = srv.url.trim_start_matches("http://").to_string();
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    // Not served while both slots are held...
    s.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(s.read(&mut buf).is_err(), "served past the connection cap");
    // ...then served once the idle ones are closed.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            c.read(&mut buf).unwrap_or(0),
            0,
            "the idle connection is closed"
        );
    }
}

#[test]
fn a_tenant_grants_a_model_inside_its_allowed_directories_and_an_agent_answers_with_the_embed_tool()
{
    let d = tmp();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    // The model inside acme's allowed directory (a hard link where the
    // cache shares the file system, else a copy; never a symbolic link:
    // a grant follows none).
    let model = std::env::var_os("AIRLOCK_MINILM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| common::cache_dir().join("models/all-MiniLM-L6-v2"));
    let inside = d.path().join("shared/all-MiniLM-L6-v2");
    std::fs::create_dir_all(&inside).unwrap();
    for f in ["config.json", "model.safetensors"] {
        if std::fs::hard_link(model.join(f), inside.join(f)).is_err() {
            std::fs::copy(model.join(f), inside.join(f)).unwrap();
        }
    }
    let inside = std::fs::canonicalize(&inside).unwrap();
    c.upload_example(ADMIN, "embed", "embed");
    let policy = format!(
        "version = 1\n[models]\nminilm = {:?}\n",
        inside.display().to_string()
    );
    let r = c.put_policy(ADMIN, "embed", &policy);
    assert_eq!(r.status, 201, "{}", r.json);
    let r = c.invoke(
        ADMIN,
        "embed__similar",
        json!({"query": "How do I reset my password?", "texts": [
            "The cat sat on the mat.",
            "I forgot my login credentials and cannot sign in."
        ]}),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["result"]["ok"]["ok"][0]["index"], 1, "{}", r.json);

    // The agent-loop example's help-desk question, answered with the tool:
    // the model's search finds the password article by meaning.
    let model = agent_loop::ScriptedModel::parse(&agent_script("support.json")).unwrap();
    let messages = agent_loop::run(&agent_loop::Airlock::new(&srv.url, INVOKER), &model).unwrap();
    let tool: Vec<&Value> = messages.iter().filter(|m| m["role"] == "tool").collect();
    assert_eq!(tool.len(), 1);
    let found: Value = serde_json::from_str(tool[0]["content"].as_str().unwrap()).unwrap();
    let best = &found["ok"]["ok"][0];
    assert_eq!(best["index"], 2, "{found}");
    assert!(
        best["text"].as_str().unwrap().starts_with("Password reset"),
        "{found}"
    );
    assert_eq!(messages.last().unwrap()["role"], "assistant");

    // Another tenant cannot grant acme's model: outside its directories.
    c.upload_example(OTHER_ADMIN, "embed", "embed");
    let r = c.put_policy(OTHER_ADMIN, "embed", &policy);
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(
        r.json["error"]["field"], "policy.models.minilm",
        "{}",
        r.json
    );
}

/// Spans go to the collector `[telemetry]` names, over OTLP/HTTP: a call
/// and an upload, each naming its tenant, tool or component and the node.
#[test]
fn spans_go_to_the_configured_otlp_collector() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use prost::Message;
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let sink = received.clone();
    let collector = common::http_server_answering(move |path, body| {
        sink.lock().unwrap().push((path.to_string(), body));
        ("application/x-protobuf", Vec::new())
    });
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        dir.path(),
        &format!("node = \"otel-node\"\n[telemetry]\notlp_endpoint = \"http://{collector}\"\n"),
    );
    let c = server.client();
    c.upload_example(ADMIN, "kitchen", "kitchen");
    let r = c.invoke(INVOKER, "kitchen__greet", json!({"name": "otel"}));
    assert_eq!(r.status, 200, "{}", r.json);
    // A graceful stop sends what is still batched.
    server.stop();
    let received = received.lock().unwrap();
    assert!(!received.is_empty(), "nothing reached the collector");
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
        .as_ref()
        .and_then(|v| v.value.as_ref())
    {
        Some(Any::StringValue(s)) => s.clone(),
        _ => String::new(),
    };
    let mut spans = std::collections::BTreeMap::new();
    for (path, body) in received.iter() {
        assert_eq!(path, "/v1/traces");
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        for rs in &req.resource_spans {
            let resource: std::collections::BTreeMap<String, String> = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .map(|kv| (kv.key.clone(), text(&kv.value)))
                .collect();
            assert_eq!(resource["service.name"], "airlock");
            assert_eq!(resource["service.instance.id"], "otel-node");
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                let attrs: std::collections::BTreeMap<String, String> = span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(&kv.value)))
                    .collect();
                spans.insert(span.name.clone(), attrs);
            }
        }
    }
    let invoke = &spans["airlock.invoke"];
    assert_eq!(invoke["tool"], "kitchen__greet", "{invoke:?}");
    assert_eq!(
        (invoke["tenant"].as_str(), invoke["node"].as_str()),
        ("acme", "otel-node")
    );
    assert!(
        !invoke
            .values()
            .any(|v| v.contains("otel\"") || v.contains(INVOKER)),
        "arguments or tokens exported: {invoke:?}"
    );
    let upload = &spans["airlock.upload"];
    assert_eq!(
        (upload["component"].as_str(), upload["actor"].as_str()),
        ("kitchen", "acme-admin")
    );
}
