//! `escape`: tries, one tool per attempt, to get out of the sandbox. Every
//! attempt must be denied or stopped by Airlock, with an audit event.

wit_bindgen::generate!({ path: "wit", world: "escape" });

/// The standard `wasi:nn` imports.
mod nn {
    wit_bindgen::generate!({ path: "../wasi-nn", world: "ml" });
}

fn nn_err(e: nn::wasi::nn::errors::Error) -> String {
    format!("{:?}: {}", e.code(), e.data())
}

use std::io::Write;

struct Escape;

impl Guest for Escape {
    fn read_outside(path: String) -> Result<String, String> {
        std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))
    }

    fn climb_out(dir: String, depth: u8) -> Result<String, String> {
        let path = format!(
            "{}/{}etc/passwd",
            dir.trim_end_matches('/'),
            "../".repeat(depth as usize)
        );
        std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))
    }

    fn write_readonly(path: String) -> Result<String, String> {
        std::fs::write(&path, b"pwned").map_err(|e| format!("write {path}: {e}"))?;
        Ok(format!("wrote {path}"))
    }

    fn reach_host(url: String) -> Result<String, String> {
        use wasi::http::outgoing_handler;
        use wasi::http::types::{Fields, OutgoingRequest, Scheme};
        let (scheme, rest) = url.split_once("://").ok_or("not an absolute URL")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let req = OutgoingRequest::new(Fields::new());
        let scheme = if scheme == "https" {
            Scheme::Https
        } else {
            Scheme::Http
        };
        req.set_scheme(Some(&scheme)).map_err(|()| "bad scheme")?;
        req.set_authority(Some(authority))
            .map_err(|()| "bad authority")?;
        req.set_path_with_query(Some(path))
            .map_err(|()| "bad path")?;
        let pending =
            outgoing_handler::handle(req, None).map_err(|e| format!("request refused: {e:?}"))?;
        pending.subscribe().block();
        match pending.get() {
            Some(Ok(Ok(resp))) => Ok(format!("reached {url}: status {}", resp.status())),
            Some(Ok(Err(e))) => Err(format!("request failed: {e:?}")),
            _ => Err("no response".into()),
        }
    }

    fn read_env(key: String) -> Result<String, String> {
        std::env::var(&key).map_err(|e| format!("env {key}: {e}"))
    }

    fn open_socket(addr: String) -> Result<String, String> {
        match std::net::TcpStream::connect(&addr) {
            Ok(_) => Ok(format!("connected to {addr}")),
            Err(e) => Err(format!("connect {addr}: {e}")),
        }
    }

    fn spin() -> Result<String, String> {
        let mut x: u64 = 0;
        loop {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    }

    fn sleep_forever() -> Result<String, String> {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        Ok("slept an hour".into())
    }

    fn hog_memory() -> Result<String, String> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![0xA5; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }

    fn flood_output() -> Result<String, String> {
        let line = [b'x'; 4095];
        let mut out = std::io::stdout();
        for _ in 0..(1u64 << 20) {
            if let Err(e) = out.write_all(&line).and_then(|()| out.write_all(b"\n")) {
                return Err(format!("stdout: {e}"));
            }
        }
        Ok("printed 4 GiB".into())
    }

    fn flood_denied(url: String, count: u32, pad: u32) -> Result<String, String> {
        let url = format!("{}/{}", url.trim_end_matches('/'), "p".repeat(pad as usize));
        let mut refused = 0u32;
        for _ in 0..count {
            if Self::reach_host(url.clone()).is_err() {
                refused += 1;
            }
        }
        Ok(format!("{refused} of {count} refused"))
    }

    fn hoard_sockets(count: u32) -> Result<String, String> {
        use wasi::sockets::network::IpAddressFamily;
        use wasi::sockets::tcp_create_socket::create_tcp_socket;
        let mut hoard = Vec::new();
        for i in 0..count {
            match create_tcp_socket(IpAddressFamily::Ipv4) {
                Ok(s) => hoard.push(s),
                Err(e) => return Err(format!("socket {i}: {e:?}")),
            }
        }
        Ok(format!("holding {} sockets", hoard.len()))
    }

    fn hoard_fields(count: u32, size: u32) -> Result<String, String> {
        use wasi::http::types::Fields;
        let value = vec![b'v'; size as usize];
        let mut hoard = Vec::new();
        for i in 0..count {
            let f = Fields::new();
            f.append("x-hoard", &value)
                .map_err(|e| format!("field {i}: {e:?}"))?;
            hoard.push(f);
        }
        Ok(format!("holding {} fields of {size} bytes", hoard.len()))
    }

    fn hoard_tensors(count: u32, size: u32) -> Result<String, String> {
        use nn::wasi::nn::tensor::{Tensor, TensorType};
        let data = vec![7u8; size as usize];
        let mut hoard = Vec::new();
        for _ in 0..count {
            hoard.push(Tensor::new(&[size], TensorType::U8, &data));
        }
        Ok(format!("holding {} tensors of {size} bytes", hoard.len()))
    }

    fn load_model_bytes(size: u32) -> Result<String, String> {
        use nn::wasi::nn::graph::{ExecutionTarget, GraphEncoding, load};
        let bytes = vec![0u8; size as usize];
        load(&[bytes], GraphEncoding::Onnx, ExecutionTarget::Cpu)
            .map(|_| "the host loaded our model".to_string())
            .map_err(nn_err)
    }

    fn nn_compute(model: String, batch: u32, seq: u32, id: i64) -> Result<String, String> {
        use nn::wasi::nn::tensor::{Tensor, TensorType};
        let graph = nn::wasi::nn::graph::load_by_name(&model).map_err(nn_err)?;
        let ctx = graph.init_execution_context().map_err(nn_err)?;
        let n = batch as usize * seq as usize;
        let ids: Vec<u8> = std::iter::repeat_n(id.to_le_bytes(), n).flatten().collect();
        let t = Tensor::new(&[batch, seq], TensorType::I64, &ids);
        let out = ctx
            .compute(vec![("input_ids".to_string(), t)])
            .map_err(nn_err)?;
        Ok(format!("computed {} outputs", out.len()))
    }

    fn change_readonly(dir: String) -> Result<String, String> {
        let d = dir.trim_end_matches('/');
        let attempts: [(&str, std::io::Result<()>); 6] = [
            ("mkdir", std::fs::create_dir(format!("{d}/newdir"))),
            (
                "rename",
                std::fs::rename(format!("{d}/notes.txt"), format!("{d}/moved.txt")),
            ),
            ("unlink", std::fs::remove_file(format!("{d}/notes.txt"))),
            (
                "link",
                std::fs::hard_link(format!("{d}/notes.txt"), format!("{d}/hard.txt")),
            ),
            ("symlink", symlink_in(d, "/etc", "link")),
            ("rmdir", std::fs::remove_dir(format!("{d}/sub"))),
        ];
        let done: Vec<&str> = attempts
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(name, _)| *name)
            .collect();
        if done.is_empty() {
            Err("every change was refused".into())
        } else {
            Ok(format!("changed: {}", done.join(", ")))
        }
    }

    fn big_result(bytes: u32) -> String {
        "r".repeat(bytes as usize)
    }

    fn make_files(dir: String, count: u32) -> Result<u32, String> {
        for i in 0..count {
            let path = format!("{}/empty-{i}", dir.trim_end_matches('/'));
            if let Err(e) = std::fs::File::create(&path) {
                return Err(format!("made {i}; {path}: {e}"));
            }
        }
        Ok(count)
    }

    fn fresh_state() -> Freshness {
        let random = wasi::random::random::get_random_bytes(16)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Freshness { random, unix_ms }
    }

    fn recurse(depth: u64) -> u64 {
        if depth == 0 {
            return 0;
        }
        // black_box on the result keeps the compiler from turning this into
        // a loop; nothing is kept on the shadow stack in linear memory, so
        // it is wasm's own call stack that runs out.
        std::hint::black_box(Self::recurse(std::hint::black_box(depth - 1))) + 1
    }
}

/// `name` → `target` in the preopened directory `dir` (through WASI, as
/// std has no stable symlink call on this target).
fn symlink_in(dir: &str, target: &str, name: &str) -> std::io::Result<()> {
    use wasi::filesystem::preopens::get_directories;
    let (d, _) = get_directories()
        .into_iter()
        .find(|(_, p)| p == dir)
        .ok_or_else(|| std::io::Error::other(format!("{dir} is not a preopened directory")))?;
    d.symlink_at(target, name)
        .map_err(|e| std::io::Error::other(format!("{e:?}")))
}

export!(Escape);
