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

#[test]
fn a_refresh_hands_the_seed_and_clock_to_the_hook_and_a_bad_seed_is_refused() {
    use std::sync::{Arc, Mutex};
    type Seen = Vec<(Vec<u8>, u64)>;
    let got: Arc<Mutex<Seen>> = Arc::default();
    let seen = got.clone();
    let (mut host, t) = serve_refreshing(move |f| {
        seen.lock().unwrap().push((f.seed.to_vec(), f.unix_ns));
        Ok(())
    });
    assert!(matches!(recv(&mut host), Message::Hello { .. }));
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
    assert_eq!(recv(&mut host), Message::Refreshed);
    // Too little entropy is refused, and never reaches the hook.
    proto::write_frame(
        &mut host,
        &Message::Refresh {
            unix_ns: now,
            mounts: vec![],
        },
        &[1u8; 8],
    )
    .unwrap();
    match recv(&mut host) {
        Message::Error { message, .. } => assert!(message.contains("8 bytes"), "{message}"),
        other => panic!("{other:?}"),
    }
    proto::write_frame(&mut host, &Message::Shutdown, b"").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), SessionEnd::Shutdown);
    assert_eq!(*got.lock().unwrap(), vec![(seed.to_vec(), now)]);
}

#[test]
fn shares_are_mounted_once_before_any_load_and_only_plain_paths() {
    use std::sync::{Arc, Mutex};
    let got: Arc<Mutex<Vec<proto::Mount>>> = Arc::default();
    let seen = got.clone();
    let (mut host, t) = serve_refreshing(move |f| {
        seen.lock().unwrap().extend_from_slice(f.mounts);
        Ok(())
    });
    assert!(matches!(recv(&mut host), Message::Hello { .. }));
    let seed = [3u8; proto::REFRESH_SEED];
    let m = |tag: &str, path: &str| proto::Mount {
        tag: tag.into(),
        path: path.into(),
        read_only: true,
    };
    let mut refresh = |mounts: Vec<proto::Mount>| {
        proto::write_frame(&mut host, &Message::Refresh { unix_ns: 1, mounts }, &seed).unwrap();
        recv(&mut host)
    };
    // What a lying or confused host could ask for never reaches the hook.
    for (bad, why) in [
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
    ] {
        match refresh(bad) {
            Message::Error { message, .. } => assert!(message.contains(why), "{why}: {message}"),
            other => panic!("{why}: {other:?}"),
        }
    }
    assert_eq!(
        refresh(vec![m("fs0", "/data"), m("fs1", "/state")]),
        Message::Refreshed
    );
    // Once a session.
    match refresh(vec![m("fs2", "/more")]) {
        Message::Error { message, .. } => assert!(message.contains("once"), "{message}"),
        other => panic!("{other:?}"),
    }
    // A refresh without mounts is still taken.
    assert_eq!(refresh(vec![]), Message::Refreshed);
    proto::write_frame(&mut host, &Message::Shutdown, b"").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), SessionEnd::Shutdown);
    assert_eq!(
        *got.lock().unwrap(),
        vec![m("fs0", "/data"), m("fs1", "/state")]
    );
}

#[test]
fn a_refresh_sent_before_the_hello_is_read_is_answered_after_it() {
    // The host pipelines: Refresh right after connecting, then reads
    // Hello, then Refreshed.
    let (mut host, t) = serve_refreshing(|_| Ok(()));
    let seed = [9u8; proto::REFRESH_SEED];
    proto::write_frame(
        &mut host,
        &Message::Refresh {
            unix_ns: 1,
            mounts: vec![],
        },
        &seed,
    )
    .unwrap();
    assert!(matches!(recv(&mut host), Message::Hello { .. }));
    assert_eq!(recv(&mut host), Message::Refreshed);
    proto::write_frame(&mut host, &Message::Shutdown, b"").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), SessionEnd::Shutdown);
}

#[test]
fn an_agent_without_a_refresh_hook_refuses_one() {
    let (mut host, guest, _runner) = start();
    assert!(matches!(recv(&mut host), Message::Hello { .. }));
    proto::write_frame(
        &mut host,
        &Message::Refresh {
            unix_ns: 1,
            mounts: vec![],
        },
        &[0u8; proto::REFRESH_SEED],
    )
    .unwrap();
    assert!(matches!(recv(&mut host), Message::Error { .. }));
    proto::write_frame(&mut host, &Message::Shutdown, b"").unwrap();
    assert_eq!(guest.join().unwrap().unwrap(), SessionEnd::Shutdown);
}
