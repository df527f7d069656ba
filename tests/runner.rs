//! In-process runner tests: every capability allowed and denied, every error
//! kind, schema round-trips for every WIT type, artifacts, bad input.

mod common;

use airlock_guest::grants::{HttpGrant, HttpRule};
use airlock_guest::{
    CallError, CallOutcome, CallResult, Decision, DirGrant, EngineConfig, GrantSet, Limits, Loaded,
    Runner,
};
use serde_json::{Value, json};
use std::sync::OnceLock;

/// The runner as `airlock run --isolation process` builds it: allowed HTTP
/// goes through the host's egress proxy, called in process.
fn runner() -> &'static Runner {
    static R: OnceLock<Runner> = OnceLock::new();
    R.get_or_init(|| {
        let proxy = airlock::egress::Proxy::new(std::time::Duration::from_secs(10)).unwrap();
        Runner::new(EngineConfig::default())
            .expect("runner")
            .with_egress(std::sync::Arc::new(proxy))
    })
}

fn load(name: &str) -> Loaded {
    runner()
        .load_wasm(&common::example_bytes(name))
        .expect("load example")
}

fn call(l: &Loaded, tool: &str, args: Value, g: &GrantSet) -> CallOutcome {
    runner().invoke(l, tool, &args, g)
}

fn ok(o: &CallOutcome) -> &Value {
    match &o.result {
        CallResult::Ok(v) => v,
        CallResult::Error(e) => panic!("expected ok, got {e:?}\nstderr: {}", o.stderr),
    }
}

fn err(o: &CallOutcome) -> &CallError {
    match &o.result {
        CallResult::Error(e) => e,
        CallResult::Ok(v) => panic!("expected an error, got {v}"),
    }
}

fn has_event(o: &CallOutcome, action: &str, decision: Decision) -> bool {
    o.audit
        .iter()
        .any(|e| e.action == action && e.decision == decision)
}

// ---------- the pure tool, schemas and values ----------

#[test]
fn kitchen_tools_have_names_descriptions_and_schemas() {
    let l = load("kitchen");
    let names: Vec<&str> = l.tools.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "greet",
            "recipes_echo-primitives",
            "recipes_echo-shapes",
            "recipes_scale",
            "recipes_search",
            "recipes_summarize"
        ]
    );
    let greet = l.tools.tool("greet").unwrap();
    assert_eq!(greet.description.as_deref(), Some("Greet someone by name."));
    assert_eq!(
        greet.parameters["required"],
        json!(["name"]),
        "option params are not required"
    );
    let scale = l.tools.tool("recipes_scale").unwrap();
    assert!(
        scale
            .description
            .as_deref()
            .unwrap()
            .starts_with("Scale every ingredient")
    );
    assert_eq!(
        scale.parameters["properties"]["servings"],
        json!({"type": "integer", "minimum": 0, "maximum": 65535})
    );
}

#[test]
fn calls_with_records_variants_flags_options_results() {
    let l = load("kitchen");
    let g = GrantSet::default();
    assert_eq!(
        ok(&call(&l, "greet", json!({"name": "Ada"}), &g)),
        &json!("Hello, Ada.")
    );
    assert_eq!(
        ok(&call(
            &l,
            "greet",
            json!({"name": "Ada", "excited": true}),
            &g
        )),
        &json!("Hello, Ada!")
    );

    let recipe = json!({"title": "T", "servings": 2, "diet": ["vegan"],
        "ingredients": [{"name": "oats", "amount": 50.0, "unit": "gram", "note": "rolled"}]});
    let out = call(
        &l,
        "recipes_scale",
        json!({"recipe": recipe, "servings": 4}),
        &g,
    );
    assert_eq!(ok(&out)["ok"]["ingredients"][0]["amount"], json!(100.0));
    assert_eq!(ok(&out)["ok"]["ingredients"][0]["note"], json!("rolled"));
    let zero = json!({"title": "T", "servings": 0, "diet": [], "ingredients": []});
    let out = call(
        &l,
        "recipes_scale",
        json!({"recipe": zero, "servings": 4}),
        &g,
    );
    assert!(ok(&out)["err"].as_str().unwrap().contains("0 servings"));

    let out = call(
        &l,
        "recipes_search",
        json!({"filter": {"text": "o", "limit": 10, "diet": ["vegan"], "max-time": {"minutes": 90}}}),
        &g,
    );
    assert_eq!(
        ok(&out),
        &json!([{"title": "Lentil soup", "score": 1.0, "time": {"hours-and-minutes": [1, 10]}}])
    );

    assert_eq!(
        ok(&call(&l, "recipes_summarize", json!({"values": []}), &g)),
        &Value::Null
    );
    assert_eq!(
        ok(&call(
            &l,
            "recipes_summarize",
            json!({"values": [1, 2.5, 3]}),
            &g
        )),
        &json!({"count": 3, "min": 1.0, "max": 3.0, "mean": 6.5 / 3.0})
    );
}

/// Values in, the same values out, and both sides valid under the schemas.
#[test]
fn every_wit_type_round_trips_and_matches_its_schema() {
    let l = load("kitchen");
    let g = GrantSet::default();
    let prim = l.tools.tool("recipes_echo-primitives").unwrap();
    let params_schema = jsonschema::validator_for(&prim.parameters).unwrap();
    let result_schema = jsonschema::validator_for(&prim.result).unwrap();
    let cases = [
        json!({"b": true, "u8v": 255, "u16v": 65535, "u32v": 4294967295u64, "u64v": u64::MAX,
               "s8v": -128, "s16v": -32768, "s32v": i32::MIN, "s64v": i64::MIN,
               "f32v": 1.5, "f64v": -2.25e300, "c": "🦀", "s": "héllo\n\"q\""}),
        json!({"b": false, "u8v": 0, "u16v": 0, "u32v": 0, "u64v": 0, "s8v": 127, "s16v": 32767,
               "s32v": i32::MAX, "s64v": i64::MAX, "f32v": "NaN", "f64v": "-Infinity", "c": "x", "s": ""}),
    ];
    for p in cases {
        let args = json!({"p": p});
        assert!(
            params_schema.is_valid(&args),
            "schema rejects valid args {args}"
        );
        let out = call(&l, "recipes_echo-primitives", args, &g);
        let v = ok(&out);
        assert!(
            result_schema.is_valid(v),
            "result {v} does not match its schema"
        );
        assert_eq!(v, &p);
    }

    let shapes = l.tools.tool("recipes_echo-shapes").unwrap();
    let params_schema = jsonschema::validator_for(&shapes.parameters).unwrap();
    let result_schema = jsonschema::validator_for(&shapes.result).unwrap();
    let cases = [
        (
            json!({"minutes": 5}),
            "gram",
            json!([]),
            Value::Null,
            json!({"ok": null}),
            json!(["a", -1]),
        ),
        (
            json!({"hours-and-minutes": [2, 30]}),
            "piece",
            json!(["vegan", "nut-free"]),
            json!({"some": null}),
            json!({"err": "bad"}),
            json!(["", i64::MAX]),
        ),
        (
            json!({"overnight": null}),
            "teaspoon",
            json!(["vegetarian", "vegan", "gluten-free", "nut-free"]),
            json!({"some": 7}),
            json!({"ok": null}),
            json!(["z", 0]),
        ),
    ];
    for (d, u, f, o, r, t) in cases {
        let args = json!({"d": d, "u": u, "f": f, "o": o, "r": r, "t": t});
        assert!(
            params_schema.is_valid(&args),
            "schema rejects valid args {args}"
        );
        let out = call(&l, "recipes_echo-shapes", args, &g);
        let v = ok(&out);
        assert!(
            result_schema.is_valid(v),
            "result {v} does not match its schema"
        );
        assert_eq!(v, &json!([d, u, f, o, r, t]));
    }
    // A bare string is accepted for a payload-less variant case.
    let out = call(
        &l,
        "recipes_echo-shapes",
        json!({"d": "overnight", "u": "gram", "f": [], "o": null, "r": {"ok": null}, "t": ["a", 1]}),
        &g,
    );
    assert_eq!(ok(&out)[0], json!({"overnight": null}));
}

#[test]
fn bad_arguments_name_the_field() {
    let l = load("kitchen");
    let g = GrantSet::default();
    let filter = |f: Value| json!({"filter": f});
    let bad = |tool: &str, args: Value| match err(&call(&l, tool, args, &g)).clone() {
        CallError::BadArguments { path, message } => format!("{path}: {message}"),
        other => panic!("expected bad arguments, got {other:?}"),
    };
    assert_eq!(
        bad(
            "recipes_search",
            filter(json!({"text": "x", "limit": -3, "diet": [], "max-time": null}))
        ),
        "args.filter.limit: expected u32, got -3"
    );
    assert_eq!(
        bad(
            "recipes_search",
            filter(json!({"text": "x", "diet": [], "max-time": null}))
        ),
        "args.filter.limit: missing required field"
    );
    assert!(
        bad(
            "recipes_search",
            filter(json!({"text": "x", "limit": 1, "diet": [], "max-time": null, "extra": 1}))
        )
        .starts_with("args.filter.extra: unknown field")
    );
    assert!(
        bad(
            "recipes_search",
            filter(json!({"text": "x", "limit": 1, "diet": ["keto"], "max-time": null}))
        )
        .starts_with("args.filter.diet[0]: unknown flag \"keto\"")
    );
    assert!(
        bad(
            "recipes_search",
            filter(json!({"text": "x", "limit": 1, "diet": [], "max-time": {"days": 1}}))
        )
        .starts_with("args.filter.max-time: unknown case \"days\"")
    );
    assert_eq!(
        bad(
            "recipes_search",
            filter(json!({"text": "x", "limit": 1, "diet": [], "max-time": {"minutes": "5"}}))
        ),
        "args.filter.max-time.minutes: expected u32, got string \"5\""
    );
    assert!(bad("greet", json!({})).starts_with("args.name: missing required argument"));
    assert!(bad("greet", json!({"name": 3})).starts_with("args.name: expected string"));
    assert!(
        bad("greet", json!({"name": "a", "loud": true})).starts_with("args.loud: unknown field")
    );
    assert!(bad("greet", json!(["a"])).starts_with("args: expected an object"));
    let prim = json!({"b": true, "u8v": 256, "u16v": 0, "u32v": 0, "u64v": 0, "s8v": 0, "s16v": 0,
                      "s32v": 0, "s64v": 0, "f32v": 0, "f64v": 0, "c": "ab", "s": ""});
    assert_eq!(
        bad("recipes_echo-primitives", json!({"p": prim})),
        "args.p.u8v: expected u8, got 256"
    );
    let out = call(&l, "no-such-tool", json!({}), &g);
    assert!(matches!(err(&out), CallError::UnknownTool { available, .. } if available.len() == 6));
}

// ---------- filesystem ----------

fn data_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("notes.txt"), "alpha\nneedle here\nomega\n").unwrap();
    std::fs::write(d.path().join("b.txt"), "another needle\n").unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    d
}

fn dir_grant(d: &tempfile::TempDir, writable: bool) -> GrantSet {
    GrantSet {
        dirs: vec![DirGrant {
            root: d.path().to_path_buf(),
            host_path: d.path().to_path_buf(),
            guest_path: "/data".into(),
            writable,
            origin: None,
            refused: None,
        }],
        ..GrantSet::default()
    }
}

#[test]
fn files_in_a_read_only_grant() {
    let l = load("files");
    let d = data_dir();
    let g = dir_grant(&d, false);
    let out = call(&l, "files_list", json!({"dir": "/data"}), &g);
    assert_eq!(ok(&out)["ok"].as_array().unwrap().len(), 3);
    assert!(has_event(&out, "fs.preopen", Decision::Allow));
    let out = call(&l, "files_read", json!({"path": "/data/notes.txt"}), &g);
    assert_eq!(ok(&out)["ok"], json!("alpha\nneedle here\nomega\n"));
    assert!(out.audit.iter().any(|e| e.action == "fs.open"
        && e.target.contains("notes.txt")
        && e.decision == Decision::Allow));
    let out = call(
        &l,
        "files_search",
        json!({"dir": "/data", "needle": "needle"}),
        &g,
    );
    assert_eq!(ok(&out)["ok"].as_array().unwrap().len(), 2);
    // "alpha\nneedle here\nomega\n": 24 bytes, three LE words summed.
    let out = call(&l, "files_checksum", json!({"path": "/data/notes.txt"}), &g);
    let words = b"alpha\nneedle here\nomega\n"
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .fold(0u64, u64::wrapping_add);
    assert_eq!(ok(&out)["ok"], json!(format!("24 bytes, sum {words:016x}")));
    let out = call(&l, "files_stat-dir", json!({"dir": "/data"}), &g);
    assert_eq!(ok(&out)["ok"]["entries"], json!(3), "{out:?}");

    // Writing is refused by the sandbox and audited.
    let out = call(
        &l,
        "files_write",
        json!({"path": "/data/new.txt", "content": "x"}),
        &g,
    );
    assert!(ok(&out)["err"].as_str().unwrap().contains("cannot write"));
    assert!(out.audit.iter().any(|e| e.action == "fs.open"
        && e.decision == Decision::Deny
        && e.target.contains("write")));
    assert!(!d.path().join("new.txt").exists());
}

#[test]
fn files_in_a_read_write_grant_and_nothing_without_grant() {
    let l = load("files");
    let d = data_dir();
    let out = call(
        &l,
        "files_write",
        json!({"path": "/data/new.txt", "content": "written"}),
        &dir_grant(&d, true),
    );
    assert_eq!(ok(&out)["ok"], json!(7));
    assert_eq!(
        std::fs::read_to_string(d.path().join("new.txt")).unwrap(),
        "written"
    );
    // The next call gets a fresh store: with no grant the same file is unreachable.
    let out = call(
        &l,
        "files_read",
        json!({"path": "/data/new.txt"}),
        &GrantSet::default(),
    );
    assert!(ok(&out)["err"].as_str().is_some());
    assert!(
        out.audit
            .iter()
            .any(|e| e.action == "fs.preopens" && e.target == "(none)")
    );
}

/// Review item 10: an `rw` grant had no quota. A call may write at most
/// `limits.max_write` bytes into its writable grants; past it the write
/// fails, the call is `write_limit` and one `limit.disk` event says so.
#[test]
fn writes_into_a_read_write_grant_are_held_to_max_write() {
    let l = load("files");
    let d = data_dir();
    let mut g = dir_grant(&d, true);
    // Making each file costs an entry; 1,024 bytes are left to write.
    let limit = 2 * airlock_abi::ENTRY_WRITE_BYTES + 1024;
    g.limits.max_write_bytes = limit;
    let out = call(
        &l,
        "files_write",
        json!({"path": "/data/small.txt", "content": "x".repeat(1000)}),
        &g,
    );
    assert_eq!(ok(&out)["ok"], json!(1000));
    g.limits.max_write_bytes = airlock_abi::ENTRY_WRITE_BYTES + 1024;
    let out = call(
        &l,
        "files_write",
        json!({"path": "/data/big.txt", "content": "y".repeat(64 << 10)}),
        &g,
    );
    let limit = g.limits.max_write_bytes;
    assert_eq!(
        err(&out),
        &CallError::WriteLimit { limit_bytes: limit },
        "{out:?}"
    );
    let events: Vec<_> = out
        .audit
        .iter()
        .filter(|e| e.action == "limit.disk")
        .collect();
    assert_eq!(events.len(), 1, "{:?}", out.audit);
    let written = std::fs::metadata(d.path().join("big.txt")).map_or(0, |m| m.len());
    assert!(written <= 1024, "{written} bytes reached the disk");
    let v = serde_json::to_value(&out.result).unwrap();
    assert_eq!(v["error"]["kind"], "write_limit", "{v}");
}

/// Making a file costs the write limit an entry
/// ([`airlock_abi::ENTRY_WRITE_BYTES`]) even when it stays empty, so a call
/// cannot fill a volume with empty files; replacing a file that exists
/// costs only its bytes. (In a microVM this same runner charges it, and
/// the VMM's file server charges it again: see the raw-FUSE test
/// `each_new_entry_costs_the_write_cap_and_a_failed_one_costs_nothing`.)
#[test]
fn making_an_entry_costs_the_write_limit_and_replacing_one_does_not() {
    let l = load("files");
    let d = data_dir();
    let mut g = dir_grant(&d, true);
    g.limits.max_write_bytes = airlock_abi::ENTRY_WRITE_BYTES - 1;
    let empty =
        |path: &str, g: &GrantSet| call(&l, "files_write", json!({"path": path, "content": ""}), g);
    let out = empty("/data/new.txt", &g);
    assert!(matches!(err(&out), CallError::WriteLimit { .. }), "{out:?}");
    assert!(!d.path().join("new.txt").exists());
    assert_eq!(
        out.audit
            .iter()
            .filter(|e| e.action == "limit.disk")
            .count(),
        1,
        "{:?}",
        out.audit
    );
    std::fs::write(d.path().join("old.txt"), "was here").unwrap();
    assert_eq!(ok(&empty("/data/old.txt", &g))["ok"], json!(0));
    assert_eq!(std::fs::read(d.path().join("old.txt")).unwrap(), b"");
    g.limits.max_write_bytes = airlock_abi::ENTRY_WRITE_BYTES;
    assert_eq!(ok(&empty("/data/new.txt", &g))["ok"], json!(0));
    assert!(d.path().join("new.txt").is_file());
}

/// A grant whose path has a symbolic link swapped in after the policy was
/// checked (the race the review won against a `..` path) is refused, not
/// followed; so is a path that would leave its root.
#[test]
fn a_grant_is_opened_beneath_its_root_without_following_links() {
    let l = load("files");
    let root = tempfile::tempdir().unwrap();
    let root_path = std::fs::canonicalize(root.path()).unwrap();
    let secret = tempfile::tempdir().unwrap();
    std::fs::write(secret.path().join("shadow"), "root:secret\n").unwrap();
    // `x` was a real directory when checked; now it is a link out.
    std::os::unix::fs::symlink(secret.path(), root_path.join("x")).unwrap();
    let grant = |root: &std::path::Path, host: std::path::PathBuf| GrantSet {
        dirs: vec![DirGrant {
            root: root.to_path_buf(),
            host_path: host,
            guest_path: "/data".into(),
            writable: false,
            origin: None,
            refused: None,
        }],
        ..GrantSet::default()
    };
    let out = call(
        &l,
        "files_read",
        json!({"path": "/data/shadow"}),
        &grant(&root_path, root_path.join("x")),
    );
    assert!(
        matches!(err(&out), CallError::Grant { message } if message.contains("symbolic link")),
        "{out:?}"
    );
    // A link higher up (the root's own child dir replaced by a link to
    // a tree that has the same shape) is refused too.
    std::fs::create_dir_all(secret.path().join("y/z")).unwrap();
    std::os::unix::fs::symlink(secret.path().join("y"), root_path.join("y")).unwrap();
    let out = call(
        &l,
        "files_list",
        json!({"dir": "/data"}),
        &grant(&root_path, root_path.join("y/z")),
    );
    assert!(matches!(err(&out), CallError::Grant { .. }), "{out:?}");
    // A path outside its root never opens.
    let out = call(
        &l,
        "files_list",
        json!({"dir": "/data"}),
        &grant(&root_path, secret.path().to_path_buf()),
    );
    assert!(
        matches!(err(&out), CallError::Grant { message } if message.contains("not inside its root")),
        "{out:?}"
    );
    // The real directory, by its real path, opens.
    std::fs::create_dir(root_path.join("real")).unwrap();
    std::fs::write(root_path.join("real/notes.txt"), "ok\n").unwrap();
    let out = call(
        &l,
        "files_read",
        json!({"path": "/data/notes.txt"}),
        &grant(&root_path, root_path.join("real")),
    );
    assert_eq!(ok(&out)["ok"], json!("ok\n"));
}

#[test]
fn a_missing_granted_directory_is_a_grant_error() {
    let l = load("files");
    let g = GrantSet {
        dirs: vec![DirGrant {
            root: "/".into(),
            host_path: "/nonexistent/airlock".into(),
            guest_path: "/data".into(),
            writable: false,
            origin: None,
            refused: None,
        }],
        ..GrantSet::default()
    };
    let out = call(&l, "files_list", json!({"dir": "/data"}), &g);
    assert!(
        matches!(err(&out), CallError::Grant { message } if message.contains("/nonexistent/airlock"))
    );
}

// ---------- HTTP ----------

fn http_grant(allow: &[&str], deny: &[&str]) -> GrantSet {
    GrantSet {
        http: HttpGrant {
            allow: allow.iter().map(|r| HttpRule::parse(r).unwrap()).collect(),
            deny: deny.iter().map(|r| HttpRule::parse(r).unwrap()).collect(),
        },
        ..GrantSet::default()
    }
}

#[test]
fn http_allowed_host_is_reached() {
    let addr = common::http_server();
    let l = load("fetch");
    let g = http_grant(&[&format!("http://127.0.0.1:{}", addr.port())], &[]);
    let out = call(
        &l,
        "fetch",
        json!({"url": format!("http://{addr}/weather")}),
        &g,
    );
    let v = ok(&out);
    assert_eq!(v["ok"]["status"], json!(200));
    assert_eq!(v["ok"]["body"], json!("hello from /weather"));
    assert_eq!(v["ok"]["content-type"], json!("text/plain"));
    assert!(out.audit.iter().any(|e| e.action == "http.request"
        && e.decision == Decision::Allow
        && e.target.contains("/weather")));
}

#[test]
fn http_unlisted_host_and_deny_rules_are_denied() {
    let addr = common::http_server();
    let l = load("fetch");
    // No rules at all.
    let out = call(
        &l,
        "fetch",
        json!({"url": format!("http://{addr}/x")}),
        &GrantSet::default(),
    );
    assert!(
        ok(&out)["err"]
            .as_str()
            .unwrap()
            .contains("HttpRequestDenied"),
        "{out:?}"
    );
    assert!(out.audit.iter().any(|e| e.action == "http.request"
        && e.decision == Decision::Deny
        && e.reason == "no allow rule matches"));
    // Allowed by wildcard but a deny rule wins.
    let g = http_grant(&["*"], &[&format!("127.0.0.1:{}", addr.port())]);
    let out = call(&l, "fetch", json!({"url": format!("http://{addr}/x")}), &g);
    assert!(
        ok(&out)["err"]
            .as_str()
            .unwrap()
            .contains("HttpRequestDenied")
    );
    assert!(
        out.audit
            .iter()
            .any(|e| e.decision == Decision::Deny && e.reason.contains("deny rule"))
    );
    // Another port on the same host is not covered.
    let g = http_grant(
        &[&format!("http://127.0.0.1:{}", addr.port() as u32 + 1)],
        &[],
    );
    let out = call(&l, "fetch", json!({"url": format!("http://{addr}/x")}), &g);
    assert!(has_event(&out, "http.request", Decision::Deny));
}

/// A real HTTP server on 127.0.0.1 that counts the requests it gets.
fn counting_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nsecret",
            );
        }
    });
    (addr, hits)
}

/// Review item 5: a rule naming a host reached a loopback server once the
/// name resolved to 127.0.0.1 (and `airlock serve` itself on 8420). Now a
/// name never reaches a special-purpose address; the IP literal rule does.
#[test]
fn a_granted_name_that_resolves_to_loopback_is_refused_at_the_address() {
    let (addr, hits) = counting_server();
    let l = load("fetch");
    // `localhost` resolves to 127.0.0.1 here (/etc/hosts), as `rebind.test`
    // did in the review.
    let g = http_grant(&[&format!("http://localhost:{}", addr.port())], &[]);
    let out = call(
        &l,
        "fetch",
        json!({"url": format!("http://localhost:{}/x", addr.port())}),
        &g,
    );
    let err = ok(&out)["err"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("HttpRequestDenied"), "{out:?}");
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the server was reached"
    );
    // The guest-side check allowed the name; the proxy refused the address
    // and says which.
    let proxy: Vec<_> = out
        .audit
        .iter()
        .filter(|e| e.action == "http.proxy")
        .collect();
    assert_eq!(proxy.len(), 1, "{:?}", out.audit);
    assert_eq!(proxy[0].decision, Decision::Deny);
    // (127.0.0.1 or ::1, whichever the resolver gave first.)
    assert!(
        proxy[0].target.ends_with("-> 127.0.0.1") || proxy[0].target.ends_with("-> ::1"),
        "{:?}",
        proxy[0]
    );
    assert!(proxy[0].reason.contains("loopback"), "{:?}", proxy[0]);
    // The rule naming the literal reaches it, and the event names the IP.
    let g = http_grant(&[&format!("http://127.0.0.1:{}", addr.port())], &[]);
    let out = call(&l, "fetch", json!({"url": format!("http://{addr}/x")}), &g);
    assert_eq!(ok(&out)["ok"]["body"], json!("secret"), "{out:?}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(out.audit.iter().any(|e| e.action == "http.proxy"
        && e.decision == Decision::Allow
        && e.target.ends_with("-> 127.0.0.1")));
}

/// Review item 6: `allow = ["*"]`, `deny = ["127.0.0.1"]` was bypassed by
/// other spellings of the address and by a name resolving to it.
#[test]
fn a_deny_rule_holds_for_every_spelling_and_every_name_of_its_address() {
    let (addr, hits) = counting_server();
    let l = load("fetch");
    let port = addr.port();
    let g = http_grant(&["*"], &["127.0.0.1"]);
    for host in [
        "127.1",
        "2130706433",
        "0x7f000001",
        "[::ffff:127.0.0.1]",
        "localhost",
    ] {
        let out = call(
            &l,
            "fetch",
            json!({"url": format!("http://{host}:{port}/x")}),
            &g,
        );
        let err = ok(&out)["err"].as_str().unwrap_or_default().to_string();
        assert!(err.contains("HttpRequestDenied"), "{host}: {out:?}");
        assert!(
            out.audit
                .iter()
                .any(|e| e.decision == Decision::Deny && e.reason.contains("deny rule")),
            "{host}: {:?}",
            out.audit
        );
    }
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the server was reached"
    );
}

/// The microVM's egress path without the VM: the runner hands allowed
/// requests to an `Egress` that speaks the egress protocol over a socket
/// pair to the host's real proxy, which sends them to a real server.
struct Bridge(airlock::egress::Proxy);

impl airlock_guest::Egress for Bridge {
    fn send(
        &self,
        req: airlock_guest::EgressRequest,
        _call: &airlock_guest::EgressCall,
    ) -> Result<airlock_guest::EgressResponse, airlock_guest::EgressFailure> {
        let (mut guest, mut host) = std::os::unix::net::UnixStream::pair().unwrap();
        let proxy = self.0.clone();
        let t = std::thread::spawn(move || {
            airlock_guest::egress::serve_one(&mut host, |r| proxy.handle(r)).unwrap();
        });
        let r = airlock_guest::egress::exchange(&mut guest, 1, req);
        t.join().unwrap();
        r
    }
}

/// A runner whose allowed requests go through a real host proxy (as in the
/// microVM), the proxy, and `fetch` loaded in that runner.
fn fetch_via_proxy() -> (Runner, airlock::egress::Proxy, airlock_guest::Loaded) {
    let proxy = airlock::egress::Proxy::new(std::time::Duration::from_secs(10)).unwrap();
    let runner = Runner::new(EngineConfig {
        pooling: false,
        ..EngineConfig::default()
    })
    .unwrap()
    .with_egress(std::sync::Arc::new(Bridge(proxy.clone())));
    let l = runner.load_wasm(&common::example_bytes("fetch")).unwrap();
    (runner, proxy, l)
}

#[test]
fn http_through_the_host_egress_proxy_is_checked_again_by_the_host() {
    let addr = common::http_server();
    let (runner, proxy, l) = fetch_via_proxy();
    let allowed = http_grant(&[&format!("http://127.0.0.1:{}", addr.port())], &[]);
    let url = json!({"url": format!("http://{addr}/weather")});

    // Host and guest agree: the request goes out through the proxy.
    proxy.begin_call(allowed.http.clone());
    let out = runner.invoke(&l, "fetch", &url, &allowed);
    let host_events = proxy.end_call();
    let v = ok(&out);
    assert_eq!(v["ok"]["status"], json!(200), "{v}");
    assert_eq!(v["ok"]["body"], json!("hello from /weather"));
    assert_eq!(v["ok"]["content-type"], json!("text/plain"));
    assert!(has_event(&out, "http.request", Decision::Allow));
    assert_eq!(host_events.len(), 1, "{host_events:?}");
    assert_eq!(host_events[0].action, "http.proxy");
    assert_eq!(host_events[0].decision, Decision::Allow);

    // A guest that claims a wider grant than the host gave: the host refuses.
    proxy.begin_call(HttpGrant::default());
    let out = runner.invoke(&l, "fetch", &url, &allowed);
    let host_events = proxy.end_call();
    let err = ok(&out)["err"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("HttpRequestDenied"), "{out:?}");
    assert_eq!(host_events.len(), 1, "{host_events:?}");
    assert_eq!(host_events[0].decision, Decision::Deny);
    assert_eq!(host_events[0].reason, "no allow rule matches");
}

#[test]
fn a_failed_request_gives_the_component_the_same_error_through_the_proxy_as_in_process() {
    // A port nothing listens on: wasmtime-wasi-http's own client (process
    // isolation) and the host proxy (VM isolation) must report it alike.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let grant = http_grant(&[&format!("http://127.0.0.1:{port}")], &[]);
    let url = json!({"url": format!("http://127.0.0.1:{port}/x")});
    let direct = load("fetch");
    let in_process = call(&direct, "fetch", url.clone(), &grant);
    let (runner, proxy, l) = fetch_via_proxy();
    proxy.begin_call(grant.http.clone());
    let via_proxy = runner.invoke(&l, "fetch", &url, &grant);
    proxy.end_call();
    assert_eq!(
        ok(&in_process),
        ok(&via_proxy),
        "{in_process:?}\n{via_proxy:?}"
    );
    let err = ok(&via_proxy)["err"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("ConnectionRefused"), "{via_proxy:?}");
}

// ---------- environment ----------

#[test]
fn only_granted_environment_is_visible() {
    let l = load("escape");
    let g = GrantSet {
        env: [("API_BASE".to_string(), "https://x".to_string())].into(),
        ..GrantSet::default()
    };
    let out = call(&l, "read-env", json!({"key": "API_BASE"}), &g);
    assert_eq!(ok(&out)["ok"], json!("https://x"));
    assert!(
        out.audit
            .iter()
            .any(|e| e.action == "env.read" && e.target == "API_BASE")
    );
    let out = call(&l, "read-env", json!({"key": "HOME"}), &g);
    assert!(ok(&out)["err"].as_str().unwrap().contains("HOME"));
    assert!(has_event(&out, "env.read", Decision::Allow));
}

// ---------- the escape component ----------

#[test]
fn escape_attempts_are_all_denied_or_stopped() {
    let l = load("escape");
    let d = data_dir();
    let mut g = dir_grant(&d, false);
    g.limits = Limits {
        memory_bytes: 32 << 20,
        fuel: 50_000_000,
        timeout_ms: 3_000,
        max_output_bytes: 64 << 10,
        ..Limits::default()
    };

    // Absolute path outside any grant: WASI has no ambient paths at all.
    let out = call(&l, "read-outside", json!({"path": "/etc/passwd"}), &g);
    assert!(ok(&out)["err"].as_str().unwrap().contains("/etc/passwd"));
    assert!(
        out.audit
            .iter()
            .any(|e| e.action == "fs.preopens" && e.target == "/data")
    );

    // Climbing out of the grant with `..`.
    let out = call(&l, "climb-out", json!({"dir": "/data", "depth": 3}), &g);
    assert!(ok(&out).get("err").is_some(), "{out:?}");
    assert!(
        out.audit.iter().any(|e| e.action == "fs.open"
            && e.decision == Decision::Deny
            && e.target.contains("..")),
        "{:?}",
        out.audit
    );

    // Writing into a read-only grant.
    let out = call(&l, "write-readonly", json!({"path": "/data/pwned"}), &g);
    assert!(ok(&out).get("err").is_some());
    assert!(has_event(&out, "fs.open", Decision::Deny));
    assert!(!d.path().join("pwned").exists());

    // Review item 10: changing a read-only grant any other way is refused
    // and each attempt leaves an event (before, only opens did).
    let out = call(&l, "change-readonly", json!({"dir": "/data"}), &g);
    assert_eq!(ok(&out)["err"], "every change was refused", "{out:?}");
    for op in ["mkdir", "rename", "unlink", "link", "symlink", "rmdir"] {
        assert!(
            out.audit.iter().any(|e| e.action == "fs.change"
                && e.decision == Decision::Deny
                && e.target.starts_with(op)),
            "no denied fs.change for {op}: {:?}",
            out.audit
        );
    }
    assert!(d.path().join("notes.txt").exists() && d.path().join("sub").exists());

    // An unlisted host.
    let out = call(&l, "reach-host", json!({"url": "http://example.com/"}), &g);
    assert!(
        ok(&out)["err"]
            .as_str()
            .unwrap()
            .contains("HttpRequestDenied")
    );
    assert!(has_event(&out, "http.request", Decision::Deny));

    // Env it was not granted.
    let out = call(&l, "read-env", json!({"key": "PATH"}), &g);
    assert!(ok(&out).get("err").is_some());
    assert!(
        out.audit
            .iter()
            .any(|e| e.action == "env.read" && e.target == "(none)")
    );

    // Raw sockets: not even created.
    let out = call(&l, "open-socket", json!({"addr": "127.0.0.1:22"}), &g);
    assert!(ok(&out).get("err").is_some());
    assert!(
        out.audit.iter().any(|e| e.action == "socket.create"
            && e.decision == Decision::Deny
            && e.target == "tcp ipv4"),
        "{:?}",
        out.audit
    );

    // Endless loop: stopped by the CPU budget.
    let out = call(&l, "spin", json!({}), &g);
    assert_eq!(err(&out), &CallError::CpuLimit { fuel: 50_000_000 });
    assert!(has_event(&out, "limit.cpu", Decision::Deny));
    assert!(out.metering.fuel_used >= 50_000_000);

    // Unbounded allocation: stopped by the memory limit.
    let out = call(&l, "hog-memory", json!({}), &g);
    assert_eq!(
        err(&out),
        &CallError::OutOfMemory {
            limit_bytes: 32 << 20
        }
    );
    assert!(has_event(&out, "limit.memory", Decision::Deny));
    assert!(out.metering.peak_memory_bytes <= 32 << 20);

    // Gigabytes of output: stopped at the cap.
    let out = call(&l, "flood-output", json!({}), &g);
    assert!(
        matches!(err(&out), CallError::OutputLimit { stream, limit_bytes } if stream == "stdout" && *limit_bytes == 64 << 10),
        "{:?}",
        out.result
    );
    assert!(out.stdout.len() <= 64 << 10);
    assert!(has_event(&out, "limit.output", Decision::Deny));
}

/// Review item 4: 15,000 header fields of 64 KiB cost the server 1.28 GB
/// while the call's linear memory peaked at 1.1 MB. Fields are capped at
/// 32 KiB and the resource table at memory-limit / 32 KiB entries, so what
/// a call holds in host memory is bounded by its own memory limit.
#[test]
fn host_memory_held_by_a_call_is_bounded_by_its_memory_limit() {
    fn peak_rss_kib() -> i64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }
    let l = load("escape");
    let g = GrantSet::default();
    // One field over the per-fields cap is refused outright (wasmtime-wasi
    // traps the call).
    let out = call(
        &l,
        "hoard-fields",
        json!({"count": 15_000, "size": 65_536}),
        &g,
    );
    let CallError::Trap { message } = err(&out) else {
        panic!("{:?}", out.result)
    };
    assert!(message.contains("fields exceeds limit"), "{message}");
    // Fields under the cap: the table fills at 64 MiB / 32 KiB = 2048.
    let out = call(
        &l,
        "hoard-fields",
        json!({"count": 15_000, "size": 16_000}),
        &g,
    );
    let CallError::Trap { message } = err(&out) else {
        panic!("{:?}", out.result)
    };
    assert!(message.to_lowercase().contains("table"), "{message}");
    // Neither came near the 1 GB the review saw (the whole test process,
    // other tests included, stays far below it).
    assert!(
        peak_rss_kib() < 700 << 10,
        "peak RSS {} KiB",
        peak_rss_kib()
    );
}

/// Review items 4 and 13: a 32 MiB result is refused at `limits.max_result`
/// (1 MiB by default) with a structured error, the same in both walls.
#[test]
fn a_result_over_max_result_is_a_structured_error() {
    let l = load("escape");
    let mut g = GrantSet::default();
    let out = call(&l, "big-result", json!({"bytes": 32 << 20}), &g);
    assert_eq!(
        err(&out),
        &CallError::ResultLimit {
            limit_bytes: 1 << 20
        }
    );
    assert!(has_event(&out, "limit.result", Decision::Deny));
    // The cap is on the JSON: 1000 bytes of string are 1002 with quotes.
    let out = call(&l, "big-result", json!({"bytes": 1000}), &g);
    assert_eq!(ok(&out).as_str().unwrap().len(), 1000);
    g.limits.max_result_bytes = 1002;
    assert!(matches!(
        call(&l, "big-result", json!({"bytes": 1000}), &g).result,
        CallResult::Ok(_)
    ));
    g.limits.max_result_bytes = 1001;
    assert_eq!(
        err(&call(&l, "big-result", json!({"bytes": 1000}), &g)),
        &CallError::ResultLimit { limit_bytes: 1001 }
    );
}

/// Review item 14: a stack overflow came back as "error while executing at
/// wasm backtrace:" and nothing else.
#[test]
fn a_stack_overflow_is_named_and_says_where() {
    let l = load("escape");
    let out = call(
        &l,
        "recurse",
        json!({"depth": 1_000_000_000u64}),
        &GrantSet::default(),
    );
    let CallError::StackOverflow { message } = err(&out) else {
        panic!("{:?}", out.result)
    };
    assert!(message.contains("call stack exhausted"), "{message}");
    assert!(message.contains("recurse"), "{message}");
    assert!(has_event(&out, "limit.stack", Decision::Deny));
    let v = serde_json::to_value(&out.result).unwrap();
    assert_eq!(v["error"]["kind"], "stack_overflow", "{v}");
}

/// Review item 3: a tool with no grants made ~20,000 real host sockets and
/// the server ran out of descriptors, with no audit event. Now no socket is
/// ever created: each attempt is refused, audited, and past the first few,
/// slowed; the process's descriptor count does not move.
#[test]
fn a_tool_cannot_hoard_host_sockets() {
    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }
    let l = load("escape");
    let mut g = GrantSet::default();
    g.limits.timeout_ms = 3_000;
    let before = open_fds();
    let out = call(&l, "hoard-sockets", json!({"count": 20_000}), &g);
    let after = open_fds();
    assert!(
        after <= before + 8,
        "descriptors went from {before} to {after}"
    );
    let e = ok(&out)["err"].as_str().unwrap_or_default().to_string();
    assert!(
        e.starts_with("socket 0:") && e.contains("access-denied"),
        "{out:?}"
    );
    assert!(
        out.audit.iter().any(|e| e.action == "socket.create"
            && e.decision == Decision::Deny
            && e.target == "tcp ipv4"),
        "{:?}",
        out.audit
    );
}

/// Review item 2: a tool with no grants sent thousands of denied requests
/// with 60 KB URLs and the host kept every one (180 MB per call). Now the
/// trail is capped and counted, and denials past the first few are slowed
/// so the flood runs into the call's own wall clock.
#[test]
fn a_flood_of_denied_requests_costs_the_host_a_bounded_trail() {
    let l = load("escape");
    let mut g = GrantSet::default();
    g.limits.timeout_ms = 2_000;
    let t = std::time::Instant::now();
    let out = call(
        &l,
        "flood-denied",
        json!({"url": "http://denied.test", "count": 17_500, "pad": 60_000}),
        &g,
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(
        err(&out),
        &CallError::Timeout { limit_ms: 2_000 },
        "{:?}",
        out.result
    );
    let cap = airlock_guest::audit::caps::MAX_EVENTS;
    assert!(out.audit.len() <= cap, "{} events", out.audit.len());
    // Rate-limited: 32 at full speed, then one per 20 ms for 2 s.
    let denied = out
        .audit
        .iter()
        .filter(|e| e.action == "http.request")
        .count() as u64;
    assert!(
        denied + out.audit_dropped < 200,
        "{denied} denials recorded, {} dropped: not slowed down",
        out.audit_dropped
    );
    assert!(
        out.audit.iter().all(|e| e.target.len() <= 512),
        "an event's target is not capped"
    );
    // The limit that ended the call is in the trail despite the flood.
    assert!(
        has_event(&out, "limit.time", Decision::Deny),
        "{:?}",
        out.audit.last()
    );
    let bytes = serde_json::to_vec(&out).unwrap().len();
    assert!(bytes < 512 << 10, "the outcome is {bytes} bytes");
}

#[test]
fn wall_clock_limit_stops_spinning_and_sleeping_calls() {
    let l = load("escape");
    let mut g = GrantSet::default();
    g.limits.timeout_ms = 300;
    g.limits.fuel = u64::MAX / 2;
    for tool in ["spin", "sleep-forever"] {
        let t = std::time::Instant::now();
        let out = call(&l, tool, json!({}), &g);
        assert_eq!(err(&out), &CallError::Timeout { limit_ms: 300 }, "{tool}");
        assert!(has_event(&out, "limit.time", Decision::Deny));
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{tool} was not stopped promptly"
        );
    }
}

#[test]
fn metering_is_reported() {
    let l = load("kitchen");
    let out = call(
        &l,
        "recipes_summarize",
        json!({"values": [1, 2, 3]}),
        &GrantSet::default(),
    );
    ok(&out);
    assert!(out.metering.fuel_used > 0 && out.metering.fuel_used < out.metering.fuel_limit);
    assert!(out.metering.peak_memory_bytes >= 64 << 10);
    assert!(out.metering.wall_us > 0);
}

// ---------- artifacts and malformed components ----------

#[test]
fn precompiled_artifacts_load_and_mismatches_are_refused() {
    let wasm = common::example_bytes("kitchen");
    let r = runner();
    let art = r.precompile(&wasm).unwrap();
    let docs = airlock_wasm_tools::docs::from_component(&wasm);
    let l = r.load_precompiled(&art, &docs).unwrap();
    assert_eq!(
        ok(&r.invoke(&l, "greet", &json!({"name": "P"}), &GrantSet::default())),
        &json!("Hello, P.")
    );
    assert_eq!(
        l.tools.tool("greet").unwrap().description.as_deref(),
        Some("Greet someone by name.")
    );

    let other = Runner::new(EngineConfig {
        max_memory_bytes: 1 << 30,
        pooling: false,
        ..EngineConfig::default()
    })
    .unwrap();
    let e = other
        .load_precompiled(&art, &docs)
        .err()
        .expect("mismatch refused");
    assert!(e.to_string().contains("recompile"), "{e}");

    let mut corrupt = art.clone();
    let n = corrupt.len();
    corrupt[n - 100] ^= 0xff;
    assert!(
        r.load_precompiled(&corrupt, &docs)
            .err()
            .unwrap()
            .to_string()
            .contains("sha256")
    );
    assert!(
        r.load_precompiled(&wasm, &docs)
            .err()
            .unwrap()
            .to_string()
            .contains("bad magic")
    );
}

#[test]
fn malformed_components_are_clear_errors() {
    let r = runner();
    let wasm = common::example_bytes("kitchen");
    for (bytes, want) in [
        (&wasm[..wasm.len() / 2], "invalid"),
        (&b"not wasm at all"[..], "magic"),
        (&b"\0asm\x01\0\0\0"[..], "core WebAssembly module"),
        (&b""[..], "too short"),
    ] {
        let e = r.load_wasm(bytes).err().expect("refused").to_string();
        assert!(e.contains(want), "{e}");
    }
}
