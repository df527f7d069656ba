//! Cluster mode's metadata store on a real PostgreSQL server (issue 18):
//! the same behaviour as the embedded SQLite store, one audit chain when
//! several nodes append at once, a newer schema refused, a server that
//! went away and came back.

mod common;

use airlock::service::audit::{Filter, NewRecord};
use airlock::service::store::postgres::{Postgres as PgMeta, SCHEMA_VERSION};
use airlock::service::store::{SignedBy, StagedBlob, Store, StoreError};
use common::postgres::Postgres;

fn stage(s: &Store, bytes: &[u8]) -> StagedBlob {
    let mut w = s.begin_upload().unwrap();
    w.write(bytes).unwrap();
    w.finish().unwrap()
}

fn record<'a>(tenant: &'a str, i: usize) -> NewRecord<'a> {
    NewRecord {
        tenant,
        actor: "tok",
        kind: "invoke",
        component: "kitchen",
        tool: "greet",
        decision: if i.is_multiple_of(3) { "deny" } else { "allow" },
        body: serde_json::json!({ "i": i }),
    }
}

/// What every metadata store must do, checked on `s`.
fn exercise(s: &Store) {
    let (created, seq) = s
        .register(
            "a",
            "tok",
            "c1",
            stage(s, b"one"),
            Some("version = 1\n"),
            SignedBy::default(),
        )
        .unwrap();
    assert!(created && seq == Some(1));
    // The same bytes again: nothing new; other bytes: the name is taken.
    assert_eq!(
        s.register(
            "a",
            "tok",
            "c1",
            stage(s, b"one"),
            None,
            SignedBy::default()
        )
        .unwrap(),
        (false, None)
    );
    assert!(matches!(
        s.register(
            "a",
            "tok",
            "c1",
            stage(s, b"two"),
            None,
            SignedBy::default()
        ),
        Err(StoreError::Exists(_))
    ));
    // Tenants do not see each other's components.
    assert!(s.list("b").unwrap().is_empty());
    assert!(matches!(s.get("b", "c1"), Err(StoreError::NoComponent(_))));
    s.register(
        "b",
        "tok",
        "c1",
        stage(s, b"one"),
        None,
        SignedBy::default(),
    )
    .unwrap();
    // Policy versions accumulate, each with its record.
    assert_eq!(
        s.put_policy("a", "tok", "c1", "version = 1 \n", Some("ed25519:00"))
            .unwrap()
            .0,
        2
    );
    let p = s.policy("a", "c1", None).unwrap();
    assert_eq!((p.version, p.signed_by.as_deref()), (2, Some("ed25519:00")));
    assert_eq!(s.policy("a", "c1", Some(1)).unwrap().text, "version = 1\n");
    assert_eq!(s.policy_versions("a", "c1").unwrap().len(), 2);
    assert!(matches!(
        s.policy("b", "c1", None),
        Err(StoreError::NoPolicy { .. })
    ));
    assert_eq!(s.get("a", "c1").unwrap().policy_version, 2);
    // Deleting one tenant's copy keeps the blob the other still uses.
    let digest = s.get("a", "c1").unwrap().digest;
    s.delete("a", "tok", "c1").unwrap();
    assert!(s.read_blob(&digest).is_ok());
    assert!(matches!(
        s.delete("a", "tok", "c1"),
        Err(StoreError::NoComponent(_))
    ));
    s.delete("b", "tok", "c1").unwrap();
    assert!(s.read_blob(&digest).is_err());
    // Calls' records, filtered and paged.
    for i in 0..6 {
        s.audit_append(&record("a", i)).unwrap();
    }
    let all = s.audit_query("a", &Filter::default()).unwrap();
    assert_eq!(all.len(), 9, "upload, policy, delete and 6 calls: {all:?}");
    let denied = s
        .audit_query(
            "a",
            &Filter {
                decision: Some("deny".into()),
                ..Filter::default()
            },
        )
        .unwrap();
    assert_eq!(denied.len(), 2);
    let page = s
        .audit_query(
            "a",
            &Filter {
                after_seq: Some(all[2].seq),
                limit: Some(1),
                ..Filter::default()
            },
        )
        .unwrap();
    assert_eq!((page.len(), page[0].seq), (1, all[3].seq));
    assert_eq!(page[0].body["i"], all[3].body["i"]);
    let v = s.audit_verify(None).unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.records, 11);
    assert!(s.audit_verify(Some((v.head_seq, &v.head_hash))).unwrap().ok);
    assert!(
        !s.audit_verify(Some((v.head_seq + 1, &v.head_hash)))
            .unwrap()
            .ok
    );
}

fn node(url: &str) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let meta = PgMeta::connect(url).expect("connect to the test database");
    let s = Store::with(dir.path(), Box::new(meta)).unwrap();
    (dir, s)
}

#[test]
fn the_postgres_store_behaves_as_the_embedded_one() {
    let d = tempfile::tempdir().unwrap();
    exercise(&Store::open(d.path()).unwrap());
    let pg = Postgres::start();
    let (_dir, s) = node(&pg.database("behaves"));
    exercise(&s);
}

#[test]
fn nodes_appending_at_once_make_one_chain() {
    let pg = Postgres::start();
    let url = pg.database("chain");
    const NODES: usize = 4;
    const EACH: usize = 40;
    let nodes: Vec<_> = (0..NODES).map(|_| node(&url)).collect();
    // One component every node changes the policy of, while all append.
    nodes[0]
        .1
        .register(
            "a",
            "tok",
            "shared",
            stage(&nodes[0].1, b"x"),
            None,
            SignedBy::default(),
        )
        .unwrap();
    let barrier = std::sync::Barrier::new(NODES);
    let versions: Vec<Vec<i64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|(_, s)| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let mut versions = Vec::new();
                    for i in 0..EACH {
                        s.audit_append(&record("a", i)).unwrap();
                        if i.is_multiple_of(10) {
                            versions.push(
                                s.put_policy("a", "tok", "shared", "version = 1\n", None)
                                    .unwrap()
                                    .0,
                            );
                        }
                    }
                    versions
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Every policy PUT got its own version, none lost or doubled.
    let mut all: Vec<i64> = versions.concat();
    all.sort_unstable();
    let puts = NODES * EACH.div_ceil(10);
    assert_eq!(all, (1..=puts as i64).collect::<Vec<_>>());
    // One valid chain holding every record, read from any node.
    for (_, s) in &nodes {
        let v = s.audit_verify(None).unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.records as usize, 1 + NODES * EACH + puts);
    }
}

#[test]
fn a_node_refuses_a_newer_schema() {
    let pg = Postgres::start();
    let url = pg.database("newer");
    drop(node(&url));
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.execute(
        "UPDATE airlock_schema SET version = $1",
        &[&(SCHEMA_VERSION + 1)],
    )
    .unwrap();
    let e = PgMeta::connect(&url).unwrap_err();
    assert!(matches!(e, StoreError::Schema { .. }), "{e}");
    assert!(e.to_string().contains("Upgrade this node"), "{e}");
}

#[test]
fn a_lost_server_fails_requests_cleanly_and_is_reconnected() {
    let mut pg = Postgres::start();
    let url = pg.database("lost");
    let (_dir, s) = node(&url);
    s.audit_append(&record("a", 0)).unwrap();
    pg.kill();
    // The upload fails as a whole: no row, no record, the staged bytes gone.
    let e = s
        .register("a", "tok", "c", stage(&s, b"x"), None, SignedBy::default())
        .unwrap_err();
    assert!(matches!(e, StoreError::Postgres(_)), "{e}");
    assert!(matches!(
        s.audit_append(&record("a", 1)),
        Err(StoreError::Postgres(_))
    ));
    pg.run();
    s.audit_append(&record("a", 2)).unwrap();
    assert!(s.list("a").unwrap().is_empty());
    let v = s.audit_verify(None).unwrap();
    assert!(v.ok && v.records == 2, "{v:?}");
}

/// The config lines of a node named `node` on the database at `url`.
fn node_config(node: &str, url: &str) -> String {
    format!("node = \"{node}\"\n[storage]\nkind = \"postgres\"\nurl = \"{url}\"\n")
}

#[test]
fn serve_nodes_share_components_policies_and_one_audit_chain() {
    use common::server::{ADMIN, AUDITOR, Server};
    let mut pg = Postgres::start();
    let url = pg.database("nodes");
    let base = tempfile::tempdir().unwrap();
    let dirs = [base.path().join("n1"), base.path().join("n2")];
    let n1 = Server::start(&dirs[0], &node_config("n1", &url));
    let n2 = Server::start(&dirs[1], &node_config("n2", &url));
    let (c1, c2) = (n1.client(), n2.client());

    // Uploaded on one node, listed on the other; a policy put on one is
    // what the other serves next.
    c1.upload_example(ADMIN, "kitchen", "kitchen");
    let listed = c2.get(AUDITOR, "/v1/components");
    assert_eq!(
        listed.json["components"][0]["name"], "kitchen",
        "{}",
        listed.json
    );
    let put = c1.put_policy(
        ADMIN,
        "kitchen",
        "version = 1\n[limits]\ntimeout = \"9s\"\n",
    );
    assert_eq!(put.status, 201, "{}", put.json);
    let got = c2.get(AUDITOR, "/v1/components/kitchen/policy");
    assert_eq!(got.json["version"], put.json["version"], "{}", got.json);
    let called = c1.invoke(ADMIN, "kitchen__greet", serde_json::json!({"name": "n1"}));
    assert_eq!(called.status, 200, "{}", called.json);

    // Every answer and every record names its node; metrics carry it.
    for (c, node) in [(&c1, "n1"), (&c2, "n2")] {
        let r = c.http.get(format!("{}/healthz", c.url)).send().unwrap();
        assert_eq!(r.headers()["airlock-node"], node);
        let m = c
            .http
            .get(format!("{}/metrics", c.url))
            .bearer_auth(AUDITOR)
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert!(m.contains(&format!("node=\"{node}\"")), "{m}");
    }
    let records = c2.get(AUDITOR, "/v1/audit").json["records"].clone();
    let nodes: Vec<&str> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["body"]["node"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(nodes, ["n1", "n1", "n1"], "upload, policy, call: {records}");

    // The chain, checked from the other node's config (its database).
    let verify = |dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["audit", "verify", "--config"])
            .arg(dir.join("config.toml"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .output()
            .unwrap()
    };
    let out = verify(&dirs[1]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        out.status.success() && v["ok"] == true && v["records"] == 3,
        "{v}"
    );

    // The database gone: uploads fail whole with 503, nothing half-written;
    // back, the nodes reconnect.
    pg.kill();
    let r = c1.upload(ADMIN, "later", common::example_bytes("kitchen"));
    assert_eq!(
        (r.status, r.json["error"]["code"].as_str()),
        (503, Some("storage_unavailable")),
        "{}",
        r.json
    );
    assert_eq!(c2.get(AUDITOR, "/v1/components").status, 503);
    pg.run();
    let listed = c2.get(AUDITOR, "/v1/components");
    assert_eq!(listed.status, 200, "{}", listed.json);
    assert_eq!(listed.json["components"].as_array().unwrap().len(), 1);
    assert!(
        std::fs::read_dir(dirs[0].join("data/tmp"))
            .unwrap()
            .next()
            .is_none(),
        "the failed upload left its bytes"
    );
    c2.upload_example(ADMIN, "kitchen2", "kitchen");
    let out = verify(&dirs[0]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ok"] == true && v["records"] == 4, "{v}");
}
