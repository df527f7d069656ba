//! A real `airlock serve` process on 127.0.0.1 with a fresh data directory.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Tokens in the test config: tenant `acme` has all three roles, tenant
/// `globex` an admin.
pub const ADMIN: &str = "acme-admin-token-000000";
pub const INVOKER: &str = "acme-invoker-token-00000";
pub const AUDITOR: &str = "acme-auditor-token-00000";
pub const OTHER_ADMIN: &str = "globex-admin-token-00000";

/// A running server. Killed (SIGKILL) on drop if still running.
pub struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The working directory: `config.toml`, `data/`, `shared/` (what
    /// tenant acme may grant), `globex/` (what tenant globex may grant).
    pub dir: PathBuf,
}

/// Write the test config into `dir` (keeping `extra` TOML appended).
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    write_config_tenants(dir, extra, "", "")
}

/// [`write_config`] with extra lines in the `[tenants.acme]` and
/// `[tenants.globex]` tables.
pub fn write_config_tenants(
    dir: &Path,
    extra: &str,
    acme_extra: &str,
    globex_extra: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("shared")).unwrap();
    std::fs::create_dir_all(dir.join("globex")).unwrap();
    let shared = std::fs::canonicalize(dir.join("shared")).unwrap();
    let globex = std::fs::canonicalize(dir.join("globex")).unwrap();
    let cfg = format!(
        r#"
allowed_origins = ["http://localhost:5173"]
{extra}

[[tokens]]
name = "acme-admin"
token = "{ADMIN}"
tenant = "acme"
role = "admin"

[[tokens]]
name = "acme-invoker"
token = "{INVOKER}"
tenant = "acme"
role = "invoker"

[[tokens]]
name = "acme-auditor"
token = "{AUDITOR}"
tenant = "acme"
role = "auditor"

[[tokens]]
name = "globex-admin"
token = "{OTHER_ADMIN}"
tenant = "globex"
role = "admin"

[tenants.acme]
allowed_host_dirs = [{shared:?}]
{acme_extra}

[tenants.globex]
allowed_host_dirs = [{globex:?}]
{globex_extra}
"#
    );
    let p = dir.join("config.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

impl Server {
    /// Start a server in `dir` (created if needed), config `extra` lines added.
    pub fn start(dir: &Path, extra: &str) -> Self {
        Self::start_tenants(dir, extra, "", "")
    }

    /// [`Server::start`] with extra lines in the tenants' tables.
    pub fn start_tenants(dir: &Path, extra: &str, acme: &str, globex: &str) -> Self {
        let config = write_config_tenants(dir, extra, acme, globex);
        let mut child = Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start airlock serve");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("airlock: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from airlock serve: {line:?}"))
            .to_string();
        Self {
            child: Some(child),
            url,
            dir: dir.to_path_buf(),
        }
    }

    /// Stop with SIGTERM (graceful) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let status = c.wait().unwrap();
            assert!(
                status.success(),
                "airlock serve exited with {status} after SIGTERM"
            );
        }
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// The data directory.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A blocking client.
    pub fn client(&self) -> Client {
        Client {
            http: reqwest::blocking::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .unwrap(),
            url: self.url.clone(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A blocking HTTP client for the API.
pub struct Client {
    /// The reqwest client.
    pub http: reqwest::blocking::Client,
    /// Base URL.
    pub url: String,
}

/// Status and JSON body of a response.
pub struct Reply {
    pub status: u16,
    pub json: serde_json::Value,
}

impl Client {
    /// Send and decode; a non-JSON body becomes `Value::String`.
    pub fn send(&self, req: reqwest::blocking::RequestBuilder) -> Reply {
        let r = req.send().expect("request");
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Reply { status, json }
    }

    pub fn get(&self, token: &str, path: &str) -> Reply {
        self.send(
            self.http
                .get(format!("{}{path}", self.url))
                .bearer_auth(token),
        )
    }

    pub fn post_json(&self, token: &str, path: &str, body: &serde_json::Value) -> Reply {
        self.send(
            self.http
                .post(format!("{}{path}", self.url))
                .bearer_auth(token)
                .json(body),
        )
    }

    pub fn upload(&self, token: &str, name: &str, bytes: Vec<u8>) -> Reply {
        self.send(
            self.http
                .post(format!("{}/v1/components?name={name}", self.url))
                .bearer_auth(token)
                .header("content-type", "application/wasm")
                .body(bytes),
        )
    }

    /// Upload a built example under `name`; it must be accepted (201).
    pub fn upload_example(&self, token: &str, name: &str, example: &str) {
        let r = self.upload(token, name, super::example_bytes(example));
        assert_eq!(r.status, 201, "upload of {example} as {name}: {}", r.json);
    }

    pub fn put_policy(&self, token: &str, name: &str, text: &str) -> Reply {
        self.send(
            self.http
                .put(format!("{}/v1/components/{name}/policy", self.url))
                .bearer_auth(token)
                .header("content-type", "application/toml")
                .body(text.to_string()),
        )
    }

    /// Upload the `files` example with a policy in two versions (a
    /// read-only grant of `shared` at `/data`; timeout 5 s, then 7 s).
    pub fn files_with_two_policies(&self, shared: &Path) {
        self.upload_example(super::server::ADMIN, "files", "files");
        let v1 = format!(
            "version = 1\n[limits]\ntimeout = \"5s\"\n[[filesystem]]\nhost = {:?}\nguest = \"/data\"\nmode = \"ro\"\n",
            std::fs::canonicalize(shared).unwrap()
        );
        for text in [v1.clone(), v1.replace("\"5s\"", "\"7s\"")] {
            let r = self.put_policy(super::server::ADMIN, "files", &text);
            assert_eq!(r.status, 201, "{}", r.json);
        }
    }

    pub fn invoke(&self, token: &str, tool: &str, args: serde_json::Value) -> Reply {
        self.post_json(
            token,
            &format!("/v1/tools/{tool}:invoke"),
            &serde_json::json!({ "arguments": args }),
        )
    }
}
