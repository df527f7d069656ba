//! The console in a real browser: Debian's `chromium`, headless, driven
//! over WebDriver (`chromium-driver`) — log in with an auditor's token, see
//! a denial appear after a denied call, filter the audit trail, open a
//! policy diff, see a tampered audit database reported as broken, reach the
//! content from the keyboard. With `AIRLOCK_CONSOLE_SCREENSHOTS=<dir>` it
//! also saves the screenshots docs/console.md shows.

mod common;

use common::server::{ADMIN, AUDITOR, INVOKER, Server};
use fantoccini::{ClientBuilder, Locator, key::Key};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// chromedriver on a free loopback port; killed on drop.
struct Driver(Child, u16);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn driver() -> Driver {
    assert!(
        std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
        "the console's browser test needs Debian's chromium and chromium-driver (scripts/apt-packages)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Owned by the guard at once: a panic below still kills and reaps it.
    let d = Driver(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        port,
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return d;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("chromedriver did not listen on {port}");
}

async fn shot(c: &fantoccini::Client, name: &str) {
    if let Some(dir) = std::env::var_os("AIRLOCK_CONSOLE_SCREENSHOTS") {
        let png = c.screenshot().await.unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

async fn source(c: &fantoccini::Client) -> String {
    c.source().await.unwrap()
}

#[test]
fn an_auditor_uses_the_console_in_chromium() {
    let d = tempfile::tempdir().unwrap();
    let srv = Server::start(d.path(), "");
    let c = srv.client();
    c.upload_example(ADMIN, "kitchen", "kitchen");
    c.files_with_two_policies(&d.path().join("shared"));
    let r = c.invoke(
        INVOKER,
        "kitchen__greet",
        serde_json::json!({"name": "Ada"}),
    );
    assert_eq!(r.status, 200);
    let drv = driver();
    let url = srv.url.clone();
    let db_path = srv.data().join("airlock.db");
    // Two TLS backends are linked (ring and aws-lc): say which (the
    // WebDriver connection is plain HTTP on loopback anyway).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1280,1000"]
            }),
        );
        let b = ClientBuilder::rustls()
            .unwrap()
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", drv.1))
            .await
            .expect("a WebDriver session in chromium");

        // Not logged in: the login page. Log in with the auditor's token.
        b.goto(&format!("{url}/console")).await.unwrap();
        assert!(
            b.current_url()
                .await
                .unwrap()
                .as_str()
                .ends_with("/console/login")
        );
        shot(&b, "login").await;
        b.find(Locator::Id("token"))
            .await
            .unwrap()
            .send_keys(AUDITOR)
            .await
            .unwrap();
        b.find(Locator::Css("main button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        if b.wait().for_element(Locator::Id("chain")).await.is_err() {
            panic!(
                "no overview after logging in: at {} {}",
                b.current_url().await.unwrap(),
                source(&b).await
            );
        }
        let home = source(&b).await;
        assert!(
            home.contains("Intact") && !home.contains("DENIED"),
            "{home}"
        );

        // A denied call, then the overview shows it.
        tokio::task::spawn_blocking({
            let url = url.clone();
            move || {
                let r = reqwest::blocking::Client::new()
                    .post(format!("{url}/v1/tools/files__files_write:invoke"))
                    .bearer_auth(INVOKER)
                    .json(
                        &serde_json::json!({"arguments": {"path": "/data/x.txt", "content": "no"}}),
                    )
                    .send()
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
        .await
        .unwrap();
        b.refresh().await.unwrap();
        b.wait().for_element(Locator::Id("denials")).await.unwrap();
        let home = source(&b).await;
        assert!(
            home.contains("DENIED") && home.contains("files__files_write"),
            "{home}"
        );
        shot(&b, "overview").await;

        // From the keyboard: the first Tab reaches the skip link.
        b.find(Locator::Css("body"))
            .await
            .unwrap()
            .send_keys(&Key::Tab.to_string())
            .await
            .unwrap();
        let active = b.active_element().await.unwrap();
        assert_eq!(active.text().await.unwrap(), "Skip to content");

        // The audit trail, filtered to denials with the form.
        b.goto(&format!("{url}/console/audit")).await.unwrap();
        b.find(Locator::Css("#f-decision option[value=deny]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        b.find(Locator::Css("fieldset button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        b.wait()
            .for_element(Locator::Css("#f-decision option[value=deny][selected]"))
            .await
            .unwrap();
        assert!(
            b.current_url()
                .await
                .unwrap()
                .as_str()
                .contains("decision=deny")
        );
        let rows = b
            .find_all(Locator::Css("table.audit tbody tr"))
            .await
            .unwrap();
        assert!(!rows.is_empty());
        for r in rows {
            assert_eq!(r.attr("class").await.unwrap().as_deref(), Some("d-deny"));
        }
        shot(&b, "audit-denials").await;

        // A component, then its policy diff by the link.
        b.goto(&format!("{url}/console/components/files"))
            .await
            .unwrap();
        shot(&b, "component").await;
        b.find(Locator::LinkText("from 1"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        b.wait().for_element(Locator::Id("changes")).await.unwrap();
        let diff = source(&b).await;
        assert!(
            diff.contains("limits.timeout_ms") && diff.contains("7000"),
            "{diff}"
        );
        shot(&b, "policy-diff").await;

        // The audit database edited behind the server's back: BROKEN.
        tokio::task::spawn_blocking(move || {
            let db = rusqlite::Connection::open(db_path).unwrap();
            db.execute(
                "UPDATE audit SET decision = 'allow' WHERE decision = 'deny'",
                [],
            )
            .unwrap();
        })
        .await
        .unwrap();
        b.goto(&format!("{url}/console")).await.unwrap();
        let home = source(&b).await;
        assert!(home.contains("BROKEN"), "{home}");
        shot(&b, "broken-chain").await;
        b.close().await.unwrap();
    });
}
