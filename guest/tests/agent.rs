//! The guest agent over a real socket: the host side speaks the protocol to
//! `agent::serve` running in a thread, exactly as it will over vsock.

use airlock_guest::agent::{self, SessionEnd};
use airlock_guest::proto::{self, FrameLimits, Message, ProtoError};
use airlock_guest::{CallResult, EngineConfig, GrantSet, Runner};
use serde_json::json;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

fn start() -> (
    UnixStream,
    JoinHandle<Result<SessionEnd, ProtoError>>,
    Runner,
) {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let runner = Runner::new(EngineConfig {
            pooling: false,
            ..EngineConfig::default()
        })
        .unwrap();
        agent::serve(&mut guest, &runner, vec![])
    });
    let host_runner = Runner::new(EngineConfig {
        pooling: false,
        ..EngineConfig::default()
    })
    .unwrap();
    (host, t, host_runner)
}

fn recv(s: &mut UnixStream) -> Message {
    proto::read_frame(s, FrameLimits::default()).unwrap().msg
}

#[test]
fn load_invoke_shutdown() {
    let (mut host, guest, runner) = start();
    let Message::Hello {
        protocol, engine, ..
    } = recv(&mut host)
    else {
        panic!("expected hello")
    };
    assert_eq!(protocol, proto::PROTOCOL_VERSION);
    assert_eq!(engine, runner.fingerprint());

    let wasm = example_bytes("kitchen");
    let artifact = runner.precompile(&wasm).unwrap();
    let digest = runner
        .load_precompiled(&artifact, &Default::default())
        .unwrap()
        .digest;
    let docs = airlock_wasm_tools::docs::from_component(&wasm).functions;
    proto::write_frame(
        &mut host,
        &Message::Load {
            digest: digest.clone(),
            docs,
        },
        &artifact,
    )
    .unwrap();
    let Message::Loaded { tools, .. } = recv(&mut host) else {
        panic!("expected loaded")
    };
    assert!(tools.contains(&"greet".to_string()));

    let invoke = Message::Invoke {
        id: 9,
        digest: digest.clone(),
        tool: "greet".into(),
        args: json!({"name": "vsock"}),
        grants: GrantSet::default(),
    };
    proto::write_frame(&mut host, &invoke, b"").unwrap();
    let Message::Result { id, outcome } = recv(&mut host) else {
        panic!("expected result")
    };
    assert_eq!(id, 9);
    assert_eq!(outcome.result, CallResult::Ok(json!("Hello, vsock.")));

    // Unknown digest: an error answer, the session goes on.
    let invoke = Message::Invoke {
        id: 10,
        digest: "nope".into(),
        tool: "greet".into(),
        args: json!({}),
        grants: GrantSet::default(),
    };
    proto::write_frame(&mut host, &invoke, b"").unwrap();
    assert!(matches!(
        recv(&mut host),
        Message::Error { id: Some(10), .. }
    ));

    // A corrupted artifact is refused.
    let mut bad = artifact.clone();
    let n = bad.len();
    bad[n - 10] ^= 1;
    proto::write_frame(
        &mut host,
        &Message::Load {
            digest,
            docs: Default::default(),
        },
        &bad,
    )
    .unwrap();
    assert!(
        matches!(recv(&mut host), Message::Error { message, .. } if message.contains("sha256"))
    );

    proto::write_frame(&mut host, &Message::Shutdown, b"").unwrap();
    assert_eq!(guest.join().unwrap().unwrap(), SessionEnd::Shutdown);
}

#[test]
fn a_bad_frame_ends_the_session_with_an_error() {
    use std::io::Write;
    let (mut host, guest, _runner) = start();
    let _hello = recv(&mut host);
    host.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(matches!(recv(&mut host), Message::Error { id: None, .. }));
    assert!(matches!(guest.join().unwrap(), Err(ProtoError::BadMagic)));
}

/// Bytes of a built example component (`cargo xtask examples`).
fn example_bytes(name: &str) -> Vec<u8> {
    // Runtime value: a test binary reused from a shared target directory
    // must look in the checkout it is run from.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let p = manifest
        .join("../examples/out")
        .join(format!("{name}.wasm"));
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e}; run `cargo xtask examples` first", p.display()))
}

/// An agent applying refreshes with `hook`, on the other end of the
/// returned host socket.
fn serve_refreshing(
    hook: impl Fn(&agent::Fresh<'_>) -> Result<(), String> + Send + 'static,
) -> (UnixStream, JoinHandle<Result<SessionEnd, ProtoError>>) {
    let (host, mut guest) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let runner = Runner::new(EngineConfig {
            pooling: false,
            ..EngineConfig::default()
        })
        .unwrap();
        agent::serve_with(&mut guest, &runner, vec![], &hook)
    });
    (host, t)
}

/// Send a refresh (`seed`, `mounts`, clock 1) and read the answer.
fn refresh(host: &mut UnixStream, seed: &[u8], mounts: Vec<proto::Mount>) -> Message {
    proto::write_frame(host, &Message::Refresh { unix_ns: 1, mounts }, seed).unwrap();
    recv(host)
}

fn error_text(m: &Message) -> &str {
    match m {
        Message::Error { message, .. } => message,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn hello_answers_the_refresh_once_the_hook_has_the_seed_and_clock() {
    use std::sync::{Arc, Mutex};
    type Seen = Vec<(Vec<u8>, u64)>;
    let got: Arc<Mutex<Seen>> = Arc::default();
    let seen = got.clone();
    let (mut host, t) = serve_refreshing(move |f| {
        seen.lock().unwrap().push((f.seed.to_vec(), f.unix_ns));
        Ok(())
    });
    let seed = [7u8; proto::REFRESH_SEED];
    let now = 1_764_600_000_000_000_000u64;
    proto::write_frame(
        &mut host,
        &Message::Refresh {
            unix_ns: now,
            mounts: vec![],
        },
        &seed,
    )
    .unwrap();
    assert!(matches!(recv(&mut host), Message::Hello { .. }));
    assert_eq!(*got.lock().unwrap(), vec![(seed.to_vec(), now)]);
    // Once a session: a later refresh is refused and never reaches the hook.
    let again = refresh(&mut host, &seed, vec![]);
    assert!(error_text(&again).contains("once"), "{again:?}");
    proto::write_frame(&mut host, &Message::Shutdown, b"").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), SessionEnd::Shutdown);
    assert_eq!(got.lock().unwrap().len(), 1);
}

#[test]
fn a_session_that_does_not_start_fresh_ends_before_any_hello() {
    let m = |tag: &str, path: &str| proto::Mount {
        tag: tag.into(),
        path: path.into(),
        read_only: true,
    };
    let seed = [3u8; proto::REFRESH_SEED];
    // What a lying or confused host could send first never reaches the
    // hook, gets no Hello, and ends the session.
    let bad_mounts = [
        (vec![m("fs0", "relative")], "path"),
        (vec![m("fs0", "/")], "path"),
        (vec![m("fs0", "/data/../etc")], "path"),
        (vec![m("fs0", "/data/./x")], "path"),
        (vec![m("fs0", "/data//x")], "path"),
        (vec![m("fs0", "/data/")], "path"),
        (vec![m("", "/data")], "tag"),
        (vec![m("a/b", "/data")], "tag"),
        (vec![m("fs0", "/a"), m("fs0", "/b")], "twice"),
        (vec![m("fs0", "/a"), m("fs1", "/a")], "twice"),
        (
            (0..5)
                .map(|i| m(&format!("fs{i}"), &format!("/d{i}")))
                .collect(),
            "at most 4",
        ),
    ];
    let cases = bad_mounts
        .into_iter()
        .map(|(mounts, why)| (Some((seed.to_vec(), mounts)), why))
        .chain([
            // Too little entropy.
            (Some((vec![1u8; 8], vec![])), "8 bytes"),
            // A load before any refresh.
            (None, "starts with a refresh"),
        ]);
    for (first, why) in cases {
        let (mut host, t) = serve_refreshing(|_| panic!("the hook must not run"));
        let answer = match first {
            Some((seed, mounts)) => refresh(&mut host, &seed, mounts),
            None => {
                let load = Message::Load {
                    digest: "d".into(),
                    docs: Default::default(),
                };
                proto::write_frame(&mut host, &load, b"").unwrap();
                recv(&mut host)
            }
        };
        assert!(error_text(&answer).contains(why), "{why}: {answer:?}");
        match t.join().unwrap() {
            Err(ProtoError::Refused(message)) => assert!(message.contains(why), "{message}"),
            other => panic!("{why}: {other:?}"),
        }
        assert!(
            proto::read_frame(&mut host, FrameLimits::default()).is_err(),
            "{why}: the session is over"
        );
    }
    // The hook's own failure ends it the same way.
    let (mut host, t) = serve_refreshing(|_| Err("no clock".to_string()));
    assert!(error_text(&refresh(&mut host, &seed, vec![])).contains("no clock"));
    assert!(matches!(t.join().unwrap(), Err(ProtoError::Refused(_))));
}

#[test]
fn shares_come_with_the_refresh_and_reach_the_hook() {
    use std::sync::{Arc, Mutex};
    let got: Arc<Mutex<Vec<proto::Mount>>> = Arc::default();
    let seen = got.clone();
    let (mut host, t) = serve_refreshing(move |f| {
        seen.lock().unwrap().extend_from_slice(f.mounts);
        Ok(())
    });
    let m = |tag: &str, path: &str| proto::Mount {
        tag: tag.into(),
        path: path.into(),
        read_only: true,
    };
    let shares = vec![m("fs0", "/data"), m("fs1", "/state")];
    let seed = [3u8; proto::REFRESH_SEED];
    assert!(matches!(
        refresh(&mut host, &seed, shares.clone()),
        Message::Hello { .. }
    ));
    proto::write_frame(&mut host, &Message::Shutdown, b"").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), SessionEnd::Shutdown);
    assert_eq!(*got.lock().unwrap(), shares);
}

#[test]
fn an_agent_without_a_refresh_hook_says_hello_at_once_and_refuses_one() {
    let (mut host, guest, _runner) = start();
    assert!(matches!(recv(&mut host), Message::Hello { .. }));
    let answer = refresh(&mut host, &[0u8; proto::REFRESH_SEED], vec![]);
    assert!(matches!(answer, Message::Error { .. }), "{answer:?}");
    proto::write_frame(&mut host, &Message::Shutdown, b"").unwrap();
    assert_eq!(guest.join().unwrap().unwrap(), SessionEnd::Shutdown);
}
