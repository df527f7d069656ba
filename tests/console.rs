//! The web console (`/console`) through a real `airlock serve`: login and
//! its cookie, roles, what an auditor sees (denials, policy diffs, the
//! chain's state) and that uploaded text is escaped everywhere.

mod common;

use common::server::{ADMIN, AUDITOR, INVOKER, Server};
use std::path::Path;

/// A client that keeps no cookies and follows no redirects: each step is
/// checked as the browser would see it.
fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn login(url: &str, token: &str) -> reqwest::blocking::Response {
    http()
        .post(format!("{url}/console/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .unwrap()
}

/// Log in as `token`; the session cookie (`name=value`).
fn session(url: &str, token: &str) -> String {
    let r = login(url, token);
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set.contains(flag), "{set}");
    }
    set.split(';').next().unwrap().to_string()
}

fn page(url: &str, path: &str, cookie: &str) -> (u16, String) {
    let r = http()
        .get(format!("{url}{path}"))
        .header("cookie", cookie)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    (status, r.text().unwrap())
}

/// kitchen.wasm with its embedded WIT docs replaced by `wit`.
fn kitchen_with_docs(wit: &str) -> Vec<u8> {
    let bytes = common::example_bytes("kitchen");
    let mut out = bytes.clone();
    for p in wasmparser::Parser::new(0).parse_all(&bytes) {
        if let Ok(wasmparser::Payload::CustomSection(c)) = p
            && c.name() == "airlock-wit"
        {
            // Cut the section: its id, size and payload.
            let end = c.range().end;
            let mut start = c.range().start - 1;
            while bytes[start] & 0x80 != 0 || start + 1 == c.range().start {
                start -= 1;
            }
            out = [&bytes[..start], &bytes[end..]].concat();
            break;
        }
    }
    let leb = |mut v: usize| {
        let mut b = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                b.push(byte);
                return b;
            }
            b.push(byte | 0x80);
        }
    };
    let name = b"airlock-wit";
    let mut payload = leb(name.len());
    payload.extend_from_slice(name);
    payload.extend_from_slice(wit.as_bytes());
    out.push(0);
    out.extend(leb(payload.len()));
    out.extend(payload);
    out
}

#[test]
fn an_auditor_logs_in_and_sees_denials_diffs_and_a_broken_chain() {
    let d = tempfile::tempdir().unwrap();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    let url = srv.url.clone();

    // Not logged in: to the login page. An invoker's token: 403. A wrong
    // token: 401.
    let r = http().get(format!("{url}/console")).send().unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console/login");
    assert_eq!(login(&url, INVOKER).status(), 403);
    assert_eq!(login(&url, "not-a-token-at-all").status(), 401);
    let bearer = http()
        .get(format!("{url}/console"))
        .bearer_auth(INVOKER)
        .send()
        .unwrap();
    assert_eq!(bearer.status(), 403);
    // A login posted from another site is refused.
    let r = http()
        .post(format!("{url}/console/login"))
        .header("origin", "http://evil.test")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={AUDITOR}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);

    // A tool whose docs carry markup, a policy in two versions, a denial.
    let shared = d.path().join("shared");
    let evil = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kitchen/wit/kitchen.wit"),
    )
    .unwrap()
    .replace(
        "  export greet:",
        "  /// <script>alert('pwned')</script><img src=x onerror=alert(1)>\n  export greet:",
    );
    assert_eq!(
        c.upload(ADMIN, "kitchen", kitchen_with_docs(&evil)).status,
        201
    );
    c.files_with_two_policies(&shared);
    let r = c.invoke(
        INVOKER,
        "files__files_write",
        serde_json::json!({"path": "/data/x.txt", "content": "no"}),
    );
    assert!(r.json["result"]["ok"]["err"].is_string(), "{}", r.json);

    let cookie = session(&url, AUDITOR);
    let (status, home) = page(&url, "/console", &cookie);
    assert_eq!(status, 200);
    assert!(home.contains("Intact"), "{home}");
    assert!(
        home.contains("DENIED") && home.contains("files__files_write"),
        "{home}"
    );
    assert!(home.contains("href=\"/console/components/files\""));
    // Escaped everywhere it shows.
    let (_, kitchen) = page(&url, "/console/components/kitchen", &cookie);
    assert!(kitchen.contains("&lt;script&gt;alert("), "{kitchen}");
    assert!(
        !kitchen.contains("<script>") && !kitchen.contains("<img src=x"),
        "{kitchen}"
    );
    // The denial in the audit trail, filtered.
    let (_, denied) = page(
        &url,
        "/console/audit?decision=deny&actor=acme-invoker",
        &cookie,
    );
    assert!(
        denied.contains("DENIED") && denied.contains("d-deny"),
        "{denied}"
    );
    assert!(!denied.contains("component.upload"), "{denied}");
    let (status, _) = page(&url, "/console/audit?decision=maybe", &cookie);
    assert_eq!(status, 400);
    // The policy diff.
    let (_, diff) = page(&url, "/console/components/files/diff?from=1&to=2", &cookie);
    assert!(
        diff.contains("limits.timeout_ms") && diff.contains("5000") && diff.contains("7000"),
        "{diff}"
    );

    // Someone edits the audit database behind the server's back.
    let db = rusqlite::Connection::open(srv.data().join("airlock.db")).unwrap();
    db.execute(
        "UPDATE audit SET decision = 'allow' WHERE decision = 'deny'",
        [],
    )
    .unwrap();
    drop(db);
    let (_, home) = page(&url, "/console", &cookie);
    assert!(home.contains("BROKEN"), "{home}");

    // Logged out: the session is gone.
    let r = http()
        .post(format!("{url}/console/logout"))
        .header("cookie", &cookie)
        .send()
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = http()
        .get(format!("{url}/console"))
        .header("cookie", &cookie)
        .send()
        .unwrap();
    assert_eq!(r.status(), 303);
}
