//! The host's egress proxy: the only way an outgoing HTTP request leaves a
//! microVM (the guest kernel has no network stack). The guest's runner has
//! already checked the request against the call's grant; the proxy checks
//! again with the grant the *host* holds for the call in flight, because the
//! guest is the thing we do not trust. Then it sends the request itself,
//! without following redirects (a redirect could leave the allow-list), and
//! records its own audit event for the call.
//!
//! **Invariants:** with no call in flight every request is refused; a
//! request is sent only if the host's copy of the grant allows its scheme,
//! host and port; bodies are capped at [`EGRESS_MAX_BODY`] both ways.
//! Plain `http://` only for now — TLS origination is not built, so `https`
//! requests that the grant allows are answered with an error.

use airlock_guest::grants::{HttpGrant, HttpVerdict};
use airlock_guest::runner::EGRESS_MAX_BODY;
use airlock_guest::{AuditEvent, Decision, EgressRequest, EgressResponse};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Egress errors (setting the proxy up; refused requests are answers).
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// The HTTP client could not be built.
    #[error("The egress HTTP client could not be built: {0}.")]
    Client(String),
}

/// The grant of the call in flight, and the proxy's audit events for it.
#[derive(Debug, Default)]
struct Current {
    grant: Option<HttpGrant>,
    started: Option<Instant>,
    events: Vec<AuditEvent>,
}

/// The proxy. Cheap to clone; clones share the call state.
///
/// The HTTP client is built per request on the proxy's own thread: reqwest's
/// blocking client owns a runtime that must never be dropped inside an async
/// context, and a `Proxy` may be dropped anywhere (the service drops
/// sandboxes from its runtime's blocking pool).
#[derive(Debug, Clone)]
pub struct Proxy {
    current: Arc<Mutex<Current>>,
    timeout: Duration,
}

impl Proxy {
    /// A proxy with no call in flight.
    ///
    /// # Errors
    /// [`EgressError::Client`].
    pub fn new(timeout: Duration) -> Result<Self, EgressError> {
        Ok(Self {
            current: Arc::default(),
            timeout,
        })
    }

    fn client(&self) -> Result<reqwest::blocking::Client, EgressError> {
        reqwest::blocking::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout)
            .no_proxy()
            .build()
            .map_err(|e| EgressError::Client(e.to_string()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A call starts: requests are checked against `grant` until [`end_call`](Self::end_call).
    pub fn begin_call(&self, grant: HttpGrant) {
        let mut c = self.lock();
        c.grant = Some(grant);
        c.started = Some(Instant::now());
        c.events.clear();
    }

    /// The call ended: refuse everything again; return the proxy's events.
    pub fn end_call(&self) -> Vec<AuditEvent> {
        let mut c = self.lock();
        c.grant = None;
        c.started = None;
        std::mem::take(&mut c.events)
    }

    fn record(&self, target: &str, decision: Decision, reason: String) {
        let mut c = self.lock();
        let at_us = c.started.map_or(0, |s| {
            s.elapsed().as_micros().try_into().unwrap_or(u64::MAX)
        });
        c.events.push(AuditEvent {
            at_us,
            action: "http.proxy".into(),
            target: target.into(),
            decision,
            reason,
        });
    }

    /// Decide on one request from the guest and, if allowed, send it.
    ///
    /// # Errors
    /// A sentence for the guest: refused, unreachable, or too large.
    pub fn handle(&self, req: EgressRequest) -> Result<EgressResponse, String> {
        let url = reqwest::Url::parse(&req.url).map_err(|e| {
            let m = format!("The URL {:?} is not valid: {e}.", req.url);
            self.record(&req.url, Decision::Deny, m.clone());
            m
        })?;
        let scheme = url.scheme().to_ascii_lowercase();
        let host = url.host_str().unwrap_or("").to_string();
        let port = url.port_or_known_default().unwrap_or(0);
        let target = format!("{} {scheme}://{host}:{port}{}", req.method, url.path());
        let grant = self.lock().grant.clone();
        let verdict = match &grant {
            None => HttpVerdict::Denied("no call is in flight".into()),
            Some(g) => g.check(&scheme, &host, port),
        };
        match verdict {
            HttpVerdict::Denied(reason) => {
                self.record(&target, Decision::Deny, reason.clone());
                return Err(format!(
                    "The host's egress proxy refused {target}: {reason}."
                ));
            }
            HttpVerdict::Allowed(reason) => self.record(&target, Decision::Allow, reason),
        }
        if scheme != "http" {
            return Err(format!(
                "The host's egress proxy only speaks plain HTTP; {scheme} is not supported yet."
            ));
        }
        self.send(req, url)
    }

    fn send(&self, req: EgressRequest, url: reqwest::Url) -> Result<EgressResponse, String> {
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| format!("The method {:?} is not valid.", req.method))?;
        let client = self.client().map_err(|e| e.to_string())?;
        let mut rb = client.request(method, url);
        for (k, v) in &req.headers {
            // Hop-by-hop and routing headers are the proxy's business.
            if matches!(
                k.to_ascii_lowercase().as_str(),
                "host"
                    | "connection"
                    | "content-length"
                    | "transfer-encoding"
                    | "proxy-authorization"
            ) {
                continue;
            }
            rb = rb.header(k, v);
        }
        let resp = rb
            .body(req.body)
            .send()
            .map_err(|e| format!("The request failed: {e}."))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut body = Vec::new();
        resp.take(EGRESS_MAX_BODY as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| format!("Reading the response failed: {e}."))?;
        if body.len() > EGRESS_MAX_BODY {
            return Err(format!(
                "The response body is larger than {EGRESS_MAX_BODY} bytes."
            ));
        }
        Ok(EgressResponse {
            status,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_guest::grants::HttpRule;

    fn grant(allow: &str) -> HttpGrant {
        HttpGrant {
            allow: vec![HttpRule::parse(allow).unwrap()],
            deny: Vec::new(),
        }
    }

    fn get(url: &str) -> EgressRequest {
        EgressRequest {
            method: "GET".into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    #[test]
    fn without_a_call_in_flight_everything_is_refused() {
        let p = Proxy::new(Duration::from_secs(5)).unwrap();
        let e = p.handle(get("http://127.0.0.1:9/")).unwrap_err();
        assert!(e.contains("no call is in flight"), "{e}");
    }

    #[test]
    fn the_host_checks_the_grant_again_and_audits_it() {
        let p = Proxy::new(Duration::from_secs(5)).unwrap();
        p.begin_call(grant("http://example.test:8080"));
        // Not in the grant: refused before any connection is made.
        let e = p.handle(get("http://127.0.0.1:9/secret")).unwrap_err();
        assert!(e.contains("no allow rule matches"), "{e}");
        let e = p.handle(get("not a url")).unwrap_err();
        assert!(e.contains("is not valid"), "{e}");
        let events = p.end_call();
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.decision == Decision::Deny));
        assert_eq!(events[0].action, "http.proxy");
        assert!(events[0].target.contains("127.0.0.1:9/secret"));
        // After the call, the grant is gone.
        let e = p.handle(get("http://example.test:8080/")).unwrap_err();
        assert!(e.contains("no call is in flight"), "{e}");
    }

    #[test]
    fn https_is_refused_until_tls_is_built() {
        let p = Proxy::new(Duration::from_secs(5)).unwrap();
        p.begin_call(grant("https://example.test"));
        let e = p.handle(get("https://example.test/")).unwrap_err();
        assert!(e.contains("only speaks plain HTTP"), "{e}");
    }
}
