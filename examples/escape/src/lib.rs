//! `escape`: tries, one tool per attempt, to get out of the sandbox. Every
//! attempt must be denied or stopped by Airlock, with an audit event.

wit_bindgen::generate!({ path: "wit", world: "escape" });

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
}

export!(Escape);
