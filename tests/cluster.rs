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
    let meta = PgMeta::connect(url, b"").expect("connect to the test database");
    let s = Store::with(dir.path(), Box::new(meta), None).unwrap();
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
    let e = PgMeta::connect(&url, b"").unwrap_err();
    assert!(matches!(e, StoreError::Schema { .. }), "{e}");
    assert!(e.to_string().contains("Upgrade this node"), "{e}");
}

#[test]
fn a_hung_database_fails_the_request_instead_of_holding_it() {
    let pg = Postgres::start();
    let url = pg.database("hung");
    drop(node(&url));
    // Another session holds the chain's head: every append waits on it.
    let mut other = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut hold = other.transaction().unwrap();
    hold.query_one("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE", &[])
        .unwrap();
    let (_dir, s) = node(&format!("{url}?options=-c%20statement_timeout%3D500"));
    let t = std::time::Instant::now();
    let e = s.audit_append(&record("a", 0)).unwrap_err();
    assert!(matches!(e, StoreError::Postgres(_)), "{e}");
    assert!(e.to_string().contains("statement timeout"), "{e}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    hold.rollback().unwrap();
    s.audit_append(&record("a", 1)).unwrap();
    assert!(s.audit_verify(None).unwrap().ok);
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
fn three_serve_nodes_share_one_registry() {
    use common::s3::S3;
    use common::server::{ADMIN, AUDITOR, Server};
    let mut pg = Postgres::start();
    let url = pg.database("nodes");
    let mut s3 = S3::start();
    let base = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| base.path().join(n))
        .collect();
    let mut nodes: Vec<Server> = ["n1", "n2", "n3"]
        .iter()
        .zip(&dirs)
        .map(|(n, d)| Server::start(d, &format!("{}{}", node_config(n, &url), s3.config(d))))
        .collect();
    let c: Vec<_> = nodes.iter().map(Server::client).collect();

    // Uploaded on node 1, listed on node 2, called on node 3 (which reads
    // the bytes from the object store); a policy put on one node is what
    // the next call on another uses.
    c[0].upload_example(ADMIN, "kitchen", "kitchen");
    let listed = c[1].get(AUDITOR, "/v1/components");
    assert_eq!(
        listed.json["components"][0]["name"], "kitchen",
        "{}",
        listed.json
    );
    let put = c[0].put_policy(
        ADMIN,
        "kitchen",
        "version = 1\n[limits]\ntimeout = \"9s\"\n",
    );
    assert_eq!(put.status, 201, "{}", put.json);
    let got = c[1].get(AUDITOR, "/v1/components/kitchen/policy");
    assert_eq!(got.json["version"], put.json["version"], "{}", got.json);
    let called = c[2].invoke(ADMIN, "kitchen__greet", serde_json::json!({"name": "n3"}));
    assert_eq!(called.status, 200, "{}", called.json);
    assert_eq!(
        called.json["policy_version"], put.json["version"],
        "{}",
        called.json
    );

    // Every answer and every record names its node; metrics carry it.
    for (c, node) in c.iter().zip(["n1", "n2", "n3"]) {
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
    let nodes_of = |c: &common::server::Client| -> Vec<String> {
        c.get(AUDITOR, "/v1/audit").json["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["body"]["node"].as_str().unwrap_or("none").to_string())
            .collect()
    };
    assert_eq!(nodes_of(&c[1]), ["n1", "n1", "n3"], "upload, policy, call");

    // Bytes changed in the bucket are refused by a node that has not
    // cached them, never run.
    c[0].upload_example(ADMIN, "files", "files");
    let digest = c[0].get(AUDITOR, "/v1/components/files").json["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let object = s3.object(&format!("airlock/blobs/{digest}"));
    let mut bytes = std::fs::read(&object).expect("the blob is in the bucket");
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&object, bytes).unwrap();
    let r = c[1].invoke(ADMIN, "files__list", serde_json::json!({"dir": "/"}));
    assert_eq!(r.status, 500, "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not match its digest"),
        "{}",
        r.json
    );

    // Node 1 killed in the middle of an upload: nothing of it is listed,
    // the chain is whole.
    let slow = {
        let url = nodes[0].url.clone();
        std::thread::spawn(move || {
            let chunks = (0..50).map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                Ok::<_, std::io::Error>(vec![0u8; 4096])
            });
            let body = reqwest::blocking::Body::new(ChunkReader(Box::new(chunks), Vec::new()));
            reqwest::blocking::Client::new()
                .post(format!("{url}/v1/components?name=half"))
                .bearer_auth(ADMIN)
                .header("content-type", "application/wasm")
                .body(body)
                .send()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(700));
    nodes[0].kill9();
    assert!(slow.join().unwrap().is_err(), "the upload was cut off");
    let names: Vec<String> = c[1].get(AUDITOR, "/v1/components").json["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["files", "kitchen"]);

    // The chain, checked from another node's config (its database).
    let verify = |dir: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["audit", "verify", "--config"])
            .arg(dir.join("config.toml"))
            .arg("--data-dir")
            .arg(dir.join("data"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(out.status.success() && v["ok"] == true, "{v}");
        v["records"].as_i64().unwrap()
    };
    let before = verify(&dirs[1]);

    // The object store gone: an upload fails whole with 503; a call of a
    // component this node has cached still runs.
    s3.stop();
    let r = c[1].upload(ADMIN, "later", common::example_bytes("fetch"));
    unavailable(&r);
    let r = c[2].invoke(
        ADMIN,
        "kitchen__greet",
        serde_json::json!({"name": "cached"}),
    );
    assert_eq!(r.status, 200, "{}", r.json);
    s3.run();

    // The database gone: requests fail with 503, nothing half-written;
    // back, the nodes reconnect.
    pg.kill();
    let r = c[1].upload(ADMIN, "later", common::example_bytes("fetch"));
    unavailable(&r);
    assert_eq!(c[2].get(AUDITOR, "/v1/components").status, 503);
    pg.run();
    assert_eq!(
        c[2].get(AUDITOR, "/v1/components").json["components"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    for d in &dirs[1..] {
        assert!(
            std::fs::read_dir(d.join("data/tmp"))
                .unwrap()
                .next()
                .is_none(),
            "a failed upload left its bytes in {}",
            d.display()
        );
    }
    c[1].upload_example(ADMIN, "later", "fetch");
    // Upload and call records since: the call on node 3 while the object
    // store was down, the last upload.
    assert_eq!(verify(&dirs[2]), before + 2);
}

/// A reader over chunks that come slowly (an upload still in progress).
struct ChunkReader(
    Box<dyn Iterator<Item = std::io::Result<Vec<u8>>> + Send>,
    Vec<u8>,
);

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.1.is_empty() {
            match self.0.next() {
                Some(c) => self.1 = c?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.1.len());
        buf[..n].copy_from_slice(&self.1[..n]);
        self.1.drain(..n);
        Ok(n)
    }
}

/// TLS to the database is verified: with the CA that signed the server's
/// certificate the node connects; with only the public roots it refuses
/// the server; a server without TLS is refused under sslmode=require.
#[test]
fn postgres_tls_is_verified() {
    let airlock_testkit::tls::TestPki {
        ca,
        leaf: cert,
        leaf_key: key,
    } = airlock_testkit::tls::ca_and_leaf(&["127.0.0.1"]);
    let pg = Postgres::start_tls(&cert.pem(), &key.serialize_pem());
    let url = format!("{}?sslmode=require", pg.database("tls"));
    let meta = PgMeta::connect(&url, ca.pem().as_bytes()).expect("TLS with the private CA");
    let dir = tempfile::tempdir().unwrap();
    let s = Store::with(dir.path(), Box::new(meta), None).unwrap();
    s.audit_append(&record("a", 0)).unwrap();
    assert!(s.audit_verify(None).unwrap().ok);
    let e = PgMeta::connect(&url, b"").unwrap_err().to_string();
    assert!(
        e.contains("certificate") || e.contains("UnknownIssuer"),
        "{e}"
    );
    let plain = Postgres::start();
    let e = PgMeta::connect(
        &format!("{}?sslmode=require", plain.database("plain")),
        ca.pem().as_bytes(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.to_lowercase().contains("tls") || e.contains("ssl"), "{e}");
}

/// `r` says the shared storage is unavailable (503), as a client can retry.
fn unavailable(r: &common::server::Reply) {
    assert_eq!(
        (r.status, r.json["error"]["code"].as_str()),
        (503, Some("storage_unavailable")),
        "{}",
        r.json
    );
}
