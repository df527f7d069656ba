//! `fetch`: GET a URL through `wasi:http/outgoing-handler`. Which hosts it may
//! reach is decided by the policy, not by this code.

wit_bindgen::generate!({ path: "wit", world: "fetch-tool" });

use wasi::http::outgoing_handler;
use wasi::http::types::{Fields, Method, OutgoingRequest, Scheme};
use wasi::io::streams::StreamError;

struct Fetch;

const MAX_BODY: usize = 1 << 20;

/// Split `scheme://authority/path?query`.
fn split_url(url: &str) -> Result<(Scheme, String, String), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("not an absolute URL: {url}"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => return Err(format!("unsupported scheme {other:?}")),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() {
        return Err(format!("no host in URL: {url}"));
    }
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path
    };
    Ok((scheme, authority.to_string(), path))
}

impl Guest for Fetch {
    fn fetch(url: String) -> Result<Response, String> {
        let (scheme, authority, path) = split_url(&url)?;
        let req = OutgoingRequest::new(Fields::new());
        req.set_method(&Method::Get).map_err(|()| "bad method")?;
        req.set_scheme(Some(&scheme)).map_err(|()| "bad scheme")?;
        req.set_authority(Some(&authority))
            .map_err(|()| format!("bad authority {authority:?}"))?;
        req.set_path_with_query(Some(&path))
            .map_err(|()| format!("bad path {path:?}"))?;
        let pending =
            outgoing_handler::handle(req, None).map_err(|e| format!("request failed: {e:?}"))?;
        pending.subscribe().block();
        let resp = pending
            .get()
            .ok_or("response not ready")?
            .map_err(|()| "response already taken")?
            .map_err(|e| format!("request failed: {e:?}"))?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get("content-type")
            .first()
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let body = resp.consume().map_err(|()| "no body")?;
        let stream = body.stream().map_err(|()| "no body stream")?;
        let mut buf = Vec::new();
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => {
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= MAX_BODY {
                        buf.truncate(MAX_BODY);
                        break;
                    }
                }
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(format!("reading body: {}", e.to_debug_string()));
                }
            }
        }
        Ok(Response {
            status,
            content_type,
            body: String::from_utf8_lossy(&buf).into_owned(),
        })
    }
}

export!(Fetch);
