//! Shared helpers for integration tests: example components and a real HTTP
//! server on 127.0.0.1.
#![allow(dead_code)]

pub mod models;
pub mod server;

#[allow(unused_imports)]
pub use airlock_testkit::{postgres, s3};

use std::net::SocketAddr;
use std::path::PathBuf;

/// Path of a built example component. Panics with the fix if it is missing.
pub fn example(name: &str) -> PathBuf {
    // Runtime value: a test binary reused from a shared target directory must
    // look in the checkout it is run from.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let p = manifest
        .join("../examples/out")
        .join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask examples` first",
        p.display()
    );
    p
}

/// Bytes of a built example component.
pub fn example_bytes(name: &str) -> Vec<u8> {
    std::fs::read(example(name)).expect("read example")
}

/// A real HTTP/1.1 server on 127.0.0.1 (hyper), answering every request with
/// `hello from <path>`; it runs until the process exits.
pub fn http_server() -> SocketAddr {
    http_server_answering(|path, _body| ("text/plain", format!("hello from {path}").into_bytes()))
}

/// A real HTTP/1.1 server on 127.0.0.1 (hyper) answering each request with
/// `answer(path, body)`: (content type, body). It runs until the process
/// exits.
pub fn http_server_answering(
    answer: impl Fn(&str, Vec<u8>) -> (&'static str, Vec<u8>) + Send + Sync + 'static,
) -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    let answer = std::sync::Arc::new(answer);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let answer = answer.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let (kind, out) = answer(&path, body);
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", kind)
                                    .body(Full::new(bytes::Bytes::from(out)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

/// Run a command to completion or until `timeout` (then kill it); return its
/// stdout (carriage returns removed) and whether it exited by itself.
pub fn run_with_timeout(
    cmd: std::process::Command,
    timeout: std::time::Duration,
) -> (String, bool) {
    let (out, ended) = run_watched(cmd, timeout, timeout, None);
    (out, ended == Ended::Exited)
}

/// How a watched child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited by itself.
    Exited,
    /// It ran past the total limit and was killed.
    TimedOut,
    /// It printed nothing for the silence limit and was killed.
    Silent,
}

/// Run `cmd` (stdout piped, `\r` removed), killing it after `total`, or
/// once it has printed nothing for `silence`: a frozen emulator is told
/// apart from a slow one within minutes instead of at the end of `total`.
pub fn run_watched(
    mut cmd: std::process::Command,
    total: std::time::Duration,
    silence: std::time::Duration,
    live: Option<&std::path::Path>,
) -> (String, Ended) {
    use std::io::Read;
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let last = Arc::new(Mutex::new(Instant::now()));
    let seen = last.clone();
    // A copy of the output as it arrives, for watching a long run.
    let mut copy = live.and_then(|p| std::fs::File::create(p).ok());
    let reader = std::thread::spawn(move || {
        use std::io::Write;
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Some(f) = copy.as_mut() {
                let _ = f.write_all(&buf[..n]);
            }
            all.extend_from_slice(&buf[..n]);
            *seen.lock().unwrap() = Instant::now();
        }
        String::from_utf8_lossy(&all).replace('\r', "")
    });
    let start = Instant::now();
    let ended = loop {
        if child.try_wait().unwrap().is_some() {
            break Ended::Exited;
        }
        let quiet = last.lock().unwrap().elapsed();
        let why = if start.elapsed() > total {
            Some(Ended::TimedOut)
        } else if quiet > silence {
            Some(Ended::Silent)
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.kill();
            let _ = child.wait();
            break why;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    (reader.join().unwrap(), ended)
}

/// The cache directory (`$AIRLOCK_CACHE` or `~/.cache/airlock`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("AIRLOCK_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/airlock")
        })
}

/// A manifest written by `cargo xtask <what>` into the cache directory.
pub fn manifest(file: &str, xtask: &str) -> serde_json::Value {
    let p = cache_dir().join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}): run `cargo xtask {xtask}` (scripts/test.sh does)",
            p.display()
        )
    });
    serde_json::from_str(&text).expect("manifest is JSON")
}
