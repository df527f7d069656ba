//! A real S3-compatible server for tests: `s3s-fs` (objects as files in a
//! temporary directory) behind SigV4 authentication, over HTTP on a
//! loopback port, in a runtime of its own; stopped when dropped.

use std::net::SocketAddr;

/// The credentials it accepts.
pub const ACCESS_KEY: &str = "airlock-test-access";
/// The secret.
pub const SECRET_KEY: &str = "airlock-test-secret-0123456789";
/// The bucket it has.
pub const BUCKET: &str = "airlock";

/// A running server.
pub struct S3 {
    /// Where its objects live (`<root>/<bucket>/<key>`).
    pub root: tempfile::TempDir,
    addr: SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl S3 {
    /// Start a server with an empty bucket [`BUCKET`].
    pub fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let mut s = Self {
            root,
            addr: "127.0.0.1:0".parse().unwrap(),
            rt: None,
        };
        s.run();
        s
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `[blobs]` config table that reaches it (credentials in a file
    /// written into `dir`).
    pub fn config(&self, dir: &std::path::Path) -> String {
        let creds = dir.join("s3-credentials.toml");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            &creds,
            format!("access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n"),
        )
        .unwrap();
        format!(
            "[blobs]\nkind = \"s3\"\nendpoint = \"{}\"\nallow_http = true\nbucket = \"{BUCKET}\"\ncredentials_file = {creds:?}\n",
            self.endpoint()
        )
    }

    /// Serve (again, on the same port once it has one).
    pub fn run(&mut self) {
        use s3s::auth::SimpleAuth;
        use s3s::service::S3ServiceBuilder;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let fs = s3s_fs::FileSystem::new(self.root.path()).unwrap();
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .expect("bind the S3 server's port");
        self.addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        self.rt = Some(rt);
    }

    /// Stop serving (connections refused) until [`S3::run`].
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// The file holding object `key` of the bucket.
    pub fn object(&self, key: &str) -> std::path::PathBuf {
        self.root.path().join(BUCKET).join(key)
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
    }
}
