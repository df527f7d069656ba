//! Signed components and policies through the service and the CLI
//! (issue 17): keys made by `airlock keygen`, signatures by `airlock sign`,
//! each tenant trusting only its own keys.

mod common;

use common::server::{ADMIN, AUDITOR, OTHER_ADMIN, Server};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn airlock(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// A key pair under `dir`: (secret key file, public key id).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let prefix = dir.join(name);
    let (ok, out) = airlock(&["keygen", "--out", prefix.to_str().unwrap()]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    (
        prefix.with_extension("sec"),
        v["public_key"].as_str().unwrap().to_string(),
    )
}

fn sign_component(dir: &Path, key: &Path, example: &str) -> Vec<u8> {
    let out = dir.join(format!(
        "{example}-{}.wasm",
        key.file_stem().unwrap().to_str().unwrap()
    ));
    let (ok, text) = airlock(&[
        "sign",
        "--key",
        key.to_str().unwrap(),
        common::example(example).to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    std::fs::read(out).unwrap()
}

fn sign_policy(dir: &Path, key: &Path, tenant: &str, component: &str, text: &str) -> String {
    let p = dir.join("policy.toml");
    std::fs::write(&p, text).unwrap();
    let (ok, out) = airlock(&[
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--policy",
        p.to_str().unwrap(),
        "--tenant",
        tenant,
        "--for",
        component,
    ]);
    assert!(ok, "{out}");
    out.trim().to_string()
}

fn put_signed_policy(
    c: &common::server::Client,
    token: &str,
    name: &str,
    text: &str,
    sig: &str,
) -> common::server::Reply {
    c.send(
        c.http
            .put(format!("{}/v1/components/{name}/policy", c.url))
            .bearer_auth(token)
            .header("airlock-signature", sig)
            .body(text.to_string()),
    )
}

fn refused(r: &common::server::Reply, field: &str) {
    assert_eq!(r.status, 400, "{}", r.json);
    assert_eq!(r.json["error"]["code"], "signature_invalid", "{}", r.json);
    assert_eq!(r.json["error"]["field"], field, "{}", r.json);
}

#[test]
fn signed_components_and_policies_verify_against_their_tenants_keys_only() {
    let d = tempfile::tempdir().unwrap();
    let (acme_key, acme_id) = keygen(d.path(), "acme");
    let (globex_key, globex_id) = keygen(d.path(), "globex");
    let srv = Server::start_tenants(
        d.path(),
        "",
        &format!("trusted_keys = [{acme_id:?}]"),
        &format!("trusted_keys = [{globex_id:?}]"),
    );
    let c = srv.client();

    // Signed by acme's key: verified, and the audit record names the key.
    let signed = sign_component(d.path(), &acme_key, "kitchen");
    let r = c.upload(ADMIN, "kitchen", signed.clone());
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(
        (r.json["signature"].as_str(), r.json["signed_by"].as_str()),
        (Some("verified"), Some(acme_id.as_str()))
    );
    let got = c.get(ADMIN, "/v1/components/kitchen").json;
    assert_eq!(got["signature"], "verified", "{got}");
    let recs = c.get(AUDITOR, "/v1/audit?component=kitchen").json;
    assert!(recs.to_string().contains(&acme_id), "{recs}");
    // The signed component still runs.
    let r = c.invoke(ADMIN, "kitchen__greet", serde_json::json!({"name": "Ada"}));
    assert_eq!(r.json["result"]["ok"], "Hello, Ada.", "{}", r.json);

    // Unsigned, where not required: accepted and marked.
    let r = c.upload(ADMIN, "plain", common::example_bytes("kitchen"));
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["signature"], "unsigned");

    // Another tenant's key, a changed byte after signing, a broken
    // signature section: refused, nothing stored.
    let by_globex = sign_component(d.path(), &globex_key, "kitchen");
    refused(&c.upload(ADMIN, "forged", by_globex.clone()), "component");
    let mut changed = signed.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0x01; // inside the trailing WIT text: still a valid component
    refused(&c.upload(ADMIN, "changed", changed), "component");
    let mut broken = signed.clone();
    broken[40] ^= 0xff; // inside the signature section
    let r = c.upload(ADMIN, "broken", broken);
    assert_eq!(r.status, 400, "{}", r.json);
    let list = c.get(ADMIN, "/v1/components").json.to_string();
    for name in ["forged", "changed", "broken"] {
        assert!(!list.contains(&format!("\"{name}\"")), "{list}");
    }
    // globex trusts its own key only.
    let r = c.upload(OTHER_ADMIN, "kitchen", by_globex);
    assert_eq!(r.json["signature"], "verified", "{}", r.json);
    refused(&c.upload(OTHER_ADMIN, "acmes", signed), "component");

    // Policies: signed for (tenant, component, text).
    let text = "version = 1\n[limits]\ntimeout = \"5s\"\n";
    let sig = sign_policy(d.path(), &acme_key, "acme", "kitchen", text);
    let r = put_signed_policy(&c, ADMIN, "kitchen", text, &sig);
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.json["signed_by"], acme_id.as_str());
    let recs = c.get(AUDITOR, "/v1/audit?component=kitchen").json;
    let put = recs["records"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|x| x["kind"] == "policy.put")
        .unwrap()
        .to_string();
    assert!(put.contains(&acme_id), "{put}");
    // The same signature replayed onto another component, onto an edited
    // text, or by another tenant: refused.
    refused(
        &put_signed_policy(&c, ADMIN, "plain", text, &sig),
        "policy_signature",
    );
    refused(
        &put_signed_policy(&c, ADMIN, "kitchen", "version = 1\n", &sig),
        "policy_signature",
    );
    refused(
        &put_signed_policy(&c, OTHER_ADMIN, "kitchen", text, &sig),
        "policy_signature",
    );
    refused(
        &put_signed_policy(&c, ADMIN, "kitchen", text, "ed25519:00"),
        "policy_signature",
    );
    // Unsigned policies are accepted (not required here) and marked.
    let r = c.put_policy(ADMIN, "plain", text);
    assert_eq!(
        (r.status, r.json["signature"].as_str()),
        (201, Some("unsigned")),
        "{}",
        r.json
    );
}

#[test]
fn a_tenant_that_requires_signatures_refuses_unsigned_components_and_policies() {
    let d = tempfile::tempdir().unwrap();
    let (acme_key, acme_id) = keygen(d.path(), "acme");
    let srv = Server::start_tenants(
        d.path(),
        "",
        &format!("trusted_keys = [{acme_id:?}]\nrequire_signed = true"),
        "",
    );
    let c = srv.client();
    refused(
        &c.upload(ADMIN, "plain", common::example_bytes("kitchen")),
        "component",
    );
    // A signed component with a signed first policy, in one multipart upload.
    let text = "version = 1\n";
    let form = reqwest::blocking::multipart::Form::new()
        .text("name", "kitchen")
        .text("policy", text)
        .text(
            "policy_signature",
            sign_policy(d.path(), &acme_key, "acme", "kitchen", text),
        )
        .part(
            "component",
            reqwest::blocking::multipart::Part::bytes(sign_component(
                d.path(),
                &acme_key,
                "kitchen",
            )),
        );
    let r = c.send(
        c.http
            .post(format!("{}/v1/components", c.url))
            .bearer_auth(ADMIN)
            .multipart(form),
    );
    assert_eq!(r.status, 201, "{}", r.json);
    // An unsigned policy is refused, a signed one accepted.
    refused(&c.put_policy(ADMIN, "kitchen", text), "policy_signature");
    let sig = sign_policy(d.path(), &acme_key, "acme", "kitchen", text);
    assert_eq!(
        put_signed_policy(&c, ADMIN, "kitchen", text, &sig).status,
        201
    );
    // globex requires nothing (its own table says nothing, the top level is off).
    let r = c.upload(OTHER_ADMIN, "plain", common::example_bytes("kitchen"));
    assert_eq!(r.status, 201, "{}", r.json);
}

#[test]
fn the_cli_verifies_what_it_signed_and_names_what_fails() {
    let d = tempfile::tempdir().unwrap();
    let (key, id) = keygen(d.path(), "k");
    let (_, other) = keygen(d.path(), "other");
    let signed = d.path().join("kitchen-k.wasm");
    sign_component(d.path(), &key, "kitchen");
    let (ok, out) = airlock(&["verify", "--key", &id, signed.to_str().unwrap()]);
    assert!(ok && out.contains("verified"), "{out}");
    let (ok, out) = airlock(&["verify", "--key", &other, signed.to_str().unwrap()]);
    assert!(!ok && out.contains("failed"), "{out}");
    let (ok, out) = airlock(&[
        "verify",
        "--key",
        &id,
        common::example("kitchen").to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("unsigned"), "{out}");
    // A second keygen to the same place never overwrites a secret key.
    let (ok, _) = airlock(&["keygen", "--out", d.path().join("k").to_str().unwrap()]);
    assert!(!ok);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
}
