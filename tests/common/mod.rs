//! Shared helpers for integration tests: example components and a real HTTP
//! server on 127.0.0.1.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

/// Path of a built example component. Panics with the fix if it is missing.
pub fn example(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/out")
        .join(format!("{name}.wasm"));
    assert!(p.exists(), "{} is missing: run `cargo xtask examples` first", p.display());
    p
}

/// Bytes of a built example component.
pub fn example_bytes(name: &str) -> Vec<u8> {
    std::fs::read(example(name)).expect("read example")
}

/// A real HTTP/1.1 server on 127.0.0.1 (hyper), answering every request with
/// `hello from <path>`; it runs until the process exits.
pub fn http_server() -> SocketAddr {
    use http_body_util::Full;
    use hyper::service::service_fn;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("hello from {}", req.uri().path());
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "text/plain")
                                .body(Full::new(bytes::Bytes::from(body)))
                                .unwrap(),
                        )
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
