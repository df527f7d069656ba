//! The host's egress proxy: the only way an outgoing HTTP request leaves a
//! microVM (the guest kernel has no network stack). The guest's runner has
//! already checked the request against the call's grant; the proxy checks
//! again with the grant the *host* holds for the call in flight, because the
//! guest is the thing we do not trust. Then it sends the request itself,
//! without following redirects (a redirect could leave the allow-list), and
//! records its own audit event for the call.
//!
//! `https` requests are sent over TLS from the host (ureq: rustls with ring): the
//! guest never holds a TLS session. The proxy trusts the Mozilla roots
//! (`webpki-root-certs`) — exactly what `wasmtime-wasi-http` trusts for
//! `--isolation process`, so a call sees the same servers as valid in both
//! isolation modes — plus any roots given to [`Proxy::with_extra_roots`].
//!
//! **Invariants:** with no call in flight every request is refused; a
//! request is sent only if the host's copy of the grant allows its scheme,
//! host and port, and only over `http` or `https`; certificates are always
//! verified; bodies are capped at [`EGRESS_MAX_BODY`] both ways.

use airlock_guest::grants::{HttpGrant, HttpVerdict};
use airlock_guest::runner::EGRESS_MAX_BODY;
use airlock_guest::{
    AuditEvent, Decision, EgressFailure, EgressFailureKind, EgressRequest, EgressResponse,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Egress errors (setting the proxy up; refused requests are answers).
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// Extra trusted roots that are not usable PEM certificates.
    #[error("The extra trusted roots for egress are not valid PEM certificates: {0}.")]
    Roots(String),
    /// The CA file cannot be read.
    #[error("The egress CA file {path} cannot be read: {source}.")]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The grant of the call in flight, and the proxy's audit events for it.
#[derive(Debug, Default)]
struct Current {
    grant: Option<HttpGrant>,
    started: Option<Instant>,
    events: Vec<AuditEvent>,
}

/// The proxy. Cheap to clone; clones share the call state and the client
/// configuration.
#[derive(Debug, Clone)]
pub struct Proxy {
    current: Arc<Mutex<Current>>,
    config: ureq::config::Config,
    timeout: Duration,
}

/// Resolves every request to the addresses the proxy already checked, so
/// the client connects to exactly those (no second lookup a DNS rebinding
/// could answer differently).
#[derive(Debug)]
struct Checked(Vec<std::net::SocketAddr>);

impl ureq::unversioned::resolver::Resolver for Checked {
    fn resolve(
        &self,
        _uri: &http::Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        for a in self.0.iter().take(16) {
            out.push(*a);
        }
        if out.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(out)
    }
}

impl Proxy {
    /// A proxy with no call in flight, trusting the Mozilla roots.
    ///
    /// # Errors
    /// None today; kept fallible like [`Proxy::with_extra_roots`].
    pub fn new(timeout: Duration) -> Result<Self, EgressError> {
        Self::with_extra_roots(timeout, &[])
    }

    /// Like [`Proxy::new`], also trusting the CA certificates in `pem` (for
    /// a private CA; empty for none).
    ///
    /// # Errors
    /// [`EgressError::Roots`] when `pem` is not empty but holds no usable
    /// certificate.
    pub fn with_extra_roots(timeout: Duration, pem: &[u8]) -> Result<Self, EgressError> {
        use ureq::tls::{Certificate, RootCerts, TlsConfig};
        let mut roots: Vec<Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        if !pem.is_empty() {
            roots.extend(extra_roots(pem)?);
        }
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .build();
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .proxy(None)
            .timeout_global(Some(timeout))
            .tls_config(tls)
            .build();
        Ok(Self {
            current: Arc::default(),
            config,
            timeout,
        })
    }

    /// A proxy with no call in flight and this one's trust and timeout:
    /// no state shared with `self` (a microVM's own proxy, made from one
    /// template without reading the roots again).
    pub fn fresh(&self) -> Self {
        Self {
            current: Arc::default(),
            config: self.config.clone(),
            timeout: self.timeout,
        }
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

    /// Decide on one request from the guest (with the host's copy of the
    /// grant of the call in flight) and, if allowed, send it.
    ///
    /// # Errors
    /// For the guest: refused, unreachable, TLS, too large — with its class.
    pub fn handle(&self, req: EgressRequest) -> Result<EgressResponse, EgressFailure> {
        let grant = self.lock().grant.clone();
        self.decide_and_send(req, grant.as_ref(), &mut |t, d, r| self.record(t, d, r))
    }

    /// The one decision, for both walls: the URL, its scheme, the name
    /// against the grant, then every address the name resolves to against
    /// the grant ([`HttpGrant::check_address`]: no special-purpose address
    /// unless a rule names it, no address a deny rule names); the request
    /// goes only to addresses that passed. One `http.proxy` event per
    /// request, naming the address.
    fn decide_and_send(
        &self,
        req: EgressRequest,
        grant: Option<&HttpGrant>,
        record: &mut dyn FnMut(&str, Decision, String),
    ) -> Result<EgressResponse, EgressFailure> {
        let denied = |m: String| EgressFailure::new(EgressFailureKind::Denied, m);
        let url = url::Url::parse(&req.url).map_err(|e| {
            let m = format!("The URL {:?} is not valid: {e}.", req.url);
            record(&req.url, Decision::Deny, m.clone());
            denied(m)
        })?;
        let scheme = url.scheme().to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            let m = format!(
                "The host's egress proxy sends only http and https requests, not {scheme}."
            );
            record(&req.url, Decision::Deny, m.clone());
            return Err(denied(m));
        }
        let host = url.host_str().unwrap_or("").to_string();
        let port = url.port_or_known_default().unwrap_or(0);
        let target = format!("{} {scheme}://{host}:{port}{}", req.method, url.path());
        let (grant, name_reason) = match grant.map(|g| (g, g.check(&scheme, &host, port))) {
            Some((g, HttpVerdict::Allowed(reason))) => (g, reason),
            refused => {
                let reason = match refused {
                    Some((_, HttpVerdict::Denied(reason))) => reason,
                    _ => "no call is in flight".to_string(),
                };
                record(&target, Decision::Deny, reason.clone());
                return Err(denied(format!(
                    "The host's egress proxy refused {target}: {reason}."
                )));
            }
        };
        let addrs = match self.resolve(&url, port) {
            Ok(a) => a,
            Err(e) => {
                record(
                    &target,
                    Decision::Allow,
                    format!("{name_reason}; {}", e.message),
                );
                return Err(e);
            }
        };
        let mut allowed = Vec::new();
        // The refusal to report: a deny rule's over any other.
        let mut refusal: Option<(std::net::IpAddr, String)> = None;
        for a in &addrs {
            match grant.check_address(&scheme, &host, port, a.ip()) {
                HttpVerdict::Allowed(_) => allowed.push(*a),
                HttpVerdict::Denied(r) => {
                    let by_rule = r.contains("deny rule");
                    if refusal.is_none() || by_rule {
                        refusal = Some((a.ip(), r));
                    }
                }
            }
        }
        let Some(first) = allowed.first() else {
            let (ip, reason) =
                refusal.unwrap_or_else(|| (addrs[0].ip(), "no address to connect to".into()));
            let at = format!("{target} -> {ip}");
            record(&at, Decision::Deny, reason.clone());
            return Err(denied(format!(
                "The host's egress proxy refused {target}: {reason}."
            )));
        };
        record(
            &format!("{target} -> {}", first.ip()),
            Decision::Allow,
            format!("{name_reason}; connects to {}", first.ip()),
        );
        self.send(req, url, allowed).inspect_err(|e| {
            tracing::warn!(target = %target, error = %e, "egress request failed");
        })
    }

    /// The addresses `url`'s host names: an IP literal as it is, a name
    /// through the system resolver (within the proxy's time limit).
    fn resolve(
        &self,
        url: &url::Url,
        port: u16,
    ) -> Result<Vec<std::net::SocketAddr>, EgressFailure> {
        use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
        let name = match url.host() {
            Some(url::Host::Ipv4(ip)) => return Ok(vec![SocketAddr::new(IpAddr::V4(ip), port)]),
            Some(url::Host::Ipv6(ip)) => return Ok(vec![SocketAddr::new(IpAddr::V6(ip), port)]),
            Some(url::Host::Domain(d)) => d.to_string(),
            None => {
                return Err(EgressFailure::new(
                    EgressFailureKind::Dns,
                    "The URL has no host.",
                ));
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let lookup = name.clone();
        std::thread::Builder::new()
            .name("airlock-dns".into())
            .stack_size(airlock_vmm::devices::THREAD_STACK)
            .spawn(move || {
                let _ = tx.send((lookup.as_str(), port).to_socket_addrs());
            })
            .map_err(|e| EgressFailure::other(format!("Cannot start a DNS lookup: {e}.")))?;
        let found = rx.recv_timeout(self.timeout).map_err(|_| {
            EgressFailure::new(
                EgressFailureKind::Timeout,
                format!("Resolving {name} took longer than {:?}.", self.timeout),
            )
        })?;
        let addrs: Vec<SocketAddr> = found.map(Iterator::collect).unwrap_or_default();
        if addrs.is_empty() {
            return Err(EgressFailure::new(
                EgressFailureKind::Dns,
                format!("The name {name} did not resolve."),
            ));
        }
        Ok(addrs)
    }

    fn send(
        &self,
        req: EgressRequest,
        url: url::Url,
        to: Vec<std::net::SocketAddr>,
    ) -> Result<EgressResponse, EgressFailure> {
        let method = http::Method::from_bytes(req.method.as_bytes()).map_err(|_| {
            EgressFailure::new(
                EgressFailureKind::Denied,
                format!("The method {:?} is not valid.", req.method),
            )
        })?;
        let mut rb = http::Request::builder().method(method).uri(url.as_str());
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
        let request = rb.body(req.body).map_err(|e| {
            EgressFailure::new(
                EgressFailureKind::Denied,
                format!("The request is not valid: {e}."),
            )
        })?;
        // A client per request, whose resolver gives only the checked
        // addresses.
        let agent = ureq::Agent::with_parts(
            self.config.clone(),
            ureq::unversioned::transport::DefaultConnector::new(),
            Checked(to),
        );
        let resp = agent.run(request).map_err(|e| {
            EgressFailure::new(
                failure_kind(&e),
                format!("The request failed: {}.", error_chain(&e)),
            )
        })?;
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
        let body = resp
            .into_body()
            .with_config()
            .limit(EGRESS_MAX_BODY as u64)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => EgressFailure::new(
                    EgressFailureKind::TooLarge,
                    format!("The response body is larger than {EGRESS_MAX_BODY} bytes."),
                ),
                e => EgressFailure::new(
                    failure_kind(&e),
                    format!("Reading the response failed: {}.", error_chain(&e)),
                ),
            })?;
        Ok(EgressResponse {
            status,
            headers,
            body,
        })
    }
}

/// Process isolation: the runner hands allowed requests straight to the
/// proxy, which decides with the call's grant and records into the call's
/// trail — the same decision and the same `http.proxy` events as for a
/// microVM.
impl airlock_guest::Egress for Proxy {
    fn send(
        &self,
        request: EgressRequest,
        call: &airlock_guest::EgressCall,
    ) -> Result<EgressResponse, EgressFailure> {
        self.decide_and_send(request, Some(&call.grant), &mut |t, d, r| {
            call.audit.record("http.proxy", t, d, r);
        })
    }
}

/// The CA certificates in `pem`, for [`Proxy::with_extra_roots`]: at least
/// one, and nothing else (a private key in the file is refused).
///
/// # Errors
/// [`EgressError::Roots`] naming what is wrong.
pub fn extra_roots(pem: &[u8]) -> Result<Vec<ureq::tls::Certificate<'static>>, EgressError> {
    use ureq::tls::PemItem;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item.map_err(|e| EgressError::Roots(e.to_string()))? {
            PemItem::Certificate(c) => certs.push(c.to_owned()),
            _ => {
                return Err(EgressError::Roots(
                    "only CERTIFICATE blocks belong in it (found a key)".into(),
                ));
            }
        }
    }
    if certs.is_empty() {
        return Err(EgressError::Roots("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Read an extra-CA file (`--egress-ca`, `isolation.egress_ca`) and check
/// it now, so a bad file is refused before any call or VM. Returns the PEM.
///
/// # Errors
/// [`EgressError::CaFile`] or [`EgressError::Roots`].
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<u8>, EgressError> {
    let pem = std::fs::read(path).map_err(|source| EgressError::CaFile {
        path: path.to_path_buf(),
        source,
    })?;
    extra_roots(&pem)?;
    Ok(pem)
}

/// The class of a client error, as wasi-http tells them apart.
fn failure_kind(e: &ureq::Error) -> EgressFailureKind {
    use std::io::ErrorKind;
    match e {
        ureq::Error::HostNotFound => EgressFailureKind::Dns,
        ureq::Error::Timeout(_) => EgressFailureKind::Timeout,
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => EgressFailureKind::Tls,
        ureq::Error::BodyExceedsLimit(_) => EgressFailureKind::TooLarge,
        ureq::Error::Io(io) => {
            // rustls reports handshake and certificate failures as I/O
            // errors that wrap its own error.
            if io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
            {
                return EgressFailureKind::Tls;
            }
            match io.kind() {
                ErrorKind::ConnectionRefused => EgressFailureKind::ConnectionRefused,
                ErrorKind::TimedOut => EgressFailureKind::Timeout,
                _ => EgressFailureKind::Other,
            }
        }
        _ => EgressFailureKind::Other,
    }
}

/// An error and its sources, `: `-separated (reqwest's own message leaves
/// out the cause, e.g. which certificate check failed).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
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
        assert!(e.message.contains("no call is in flight"), "{e}");
    }

    #[test]
    fn the_host_checks_the_grant_again_and_audits_it() {
        let p = Proxy::new(Duration::from_secs(5)).unwrap();
        p.begin_call(grant("http://example.test:8080"));
        // Not in the grant: refused before any connection is made.
        let e = p.handle(get("http://127.0.0.1:9/secret")).unwrap_err();
        assert!(e.message.contains("no allow rule matches"), "{e}");
        assert_eq!(e.kind, EgressFailureKind::Denied);
        let e = p.handle(get("not a url")).unwrap_err();
        assert!(e.message.contains("is not valid"), "{e}");
        let events = p.end_call();
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.decision == Decision::Deny));
        assert_eq!(events[0].action, "http.proxy");
        assert!(events[0].target.contains("127.0.0.1:9/secret"));
        // After the call, the grant is gone.
        let e = p.handle(get("http://example.test:8080/")).unwrap_err();
        assert!(e.message.contains("no call is in flight"), "{e}");
    }

    #[test]
    fn a_fresh_proxy_shares_no_call_with_its_template() {
        let template = Proxy::new(Duration::from_secs(5)).unwrap();
        let (a, b) = (template.fresh(), template.fresh());
        a.begin_call(grant("http://127.0.0.1:9"));
        // b (another VM's) and the template have no call in flight.
        for p in [&b, &template] {
            let e = p.handle(get("http://127.0.0.1:9/")).unwrap_err();
            assert!(e.message.contains("no call is in flight"), "{e}");
        }
        let _ = a.handle(get("http://127.0.0.1:9/x"));
        let seen = |p: &Proxy| p.end_call().iter().any(|e| e.target.contains("/x"));
        assert!(!seen(&b) && !seen(&template));
        assert!(seen(&a));
    }

    /// A private CA and a real TLS server on loopback for `localhost` and
    /// `127.0.0.1` (a grant by name never reaches loopback), answering
    /// `hello over tls` to every request on `accepts` connections. Returns
    /// the CA (PEM) and the port.
    fn tls_server(accepts: usize) -> (String, u16) {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        use std::io::{Read, Write};
        let airlock_testkit::tls::TestPki { ca, leaf, leaf_key } =
            airlock_testkit::tls::ca_and_leaf(&["localhost", "127.0.0.1"]);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(accepts) {
                let Ok(stream) = stream else { continue };
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, stream);
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                // A refused handshake ends here with an error: fine.
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                if req.is_empty() {
                    continue;
                }
                let body = b"hello over tls";
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = tls.write_all(body);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        });
        (ca.pem(), port)
    }

    #[test]
    fn https_goes_out_over_verified_tls() {
        let (ca, port) = tls_server(1);
        let p = Proxy::with_extra_roots(Duration::from_secs(10), ca.as_bytes()).unwrap();
        p.begin_call(grant(&format!("https://127.0.0.1:{port}")));
        let r = p
            .handle(get(&format!("https://127.0.0.1:{port}/hello")))
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello over tls");
        let events = p.end_call();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].decision, Decision::Allow);
        assert!(
            events[0].target.starts_with("GET https://127.0.0.1:"),
            "{events:?}"
        );
    }

    #[test]
    fn a_certificate_from_an_untrusted_ca_is_refused() {
        let (_ca, port) = tls_server(1);
        let p = Proxy::new(Duration::from_secs(10)).unwrap();
        p.begin_call(grant(&format!("https://127.0.0.1:{port}")));
        let e = p
            .handle(get(&format!("https://127.0.0.1:{port}/hello")))
            .unwrap_err();
        assert!(e.message.contains("certificate"), "{e}");
        assert_eq!(e.kind, EgressFailureKind::Tls);
    }

    /// Review items 5 and 6 at the proxy (the VM's only way out): a name
    /// that resolves to loopback is refused at its address, and a deny rule
    /// holds for other spellings; the event names the address.
    #[test]
    fn names_and_spellings_never_reach_an_address_the_grant_does_not_name() {
        let p = Proxy::new(Duration::from_secs(5)).unwrap();
        p.begin_call(grant("http://localhost:9"));
        let e = p.handle(get("http://localhost:9/")).unwrap_err();
        assert_eq!(e.kind, EgressFailureKind::Denied, "{e}");
        let ev = p.end_call();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(ev[0].reason.contains("loopback"), "{ev:?}");
        assert!(ev[0].target.contains(" -> "), "{ev:?}");
        p.begin_call(HttpGrant {
            allow: vec![HttpRule::parse("*").unwrap()],
            deny: vec![HttpRule::parse("127.0.0.1").unwrap()],
        });
        for url in [
            "http://127.1:9/",
            "http://2130706433:9/",
            "http://0x7f000001:9/",
            "http://[::ffff:127.0.0.1]:9/",
        ] {
            let e = p.handle(get(url)).unwrap_err();
            assert_eq!(e.kind, EgressFailureKind::Denied, "{url}: {e}");
            assert!(e.message.contains("deny rule"), "{url}: {e}");
        }
        p.end_call();
    }

    #[test]
    fn a_closed_port_is_connection_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = Proxy::new(Duration::from_secs(10)).unwrap();
        p.begin_call(grant(&format!("http://127.0.0.1:{port}")));
        let e = p
            .handle(get(&format!("http://127.0.0.1:{port}/")))
            .unwrap_err();
        assert_eq!(e.kind, EgressFailureKind::ConnectionRefused, "{e}");
    }

    #[test]
    fn other_schemes_and_bad_roots_are_refused_with_reasons() {
        let p = Proxy::new(Duration::from_secs(5)).unwrap();
        p.begin_call(grant("https://example.test"));
        let e = p.handle(get("ftp://example.test/file")).unwrap_err();
        assert!(e.message.contains("only http and https"), "{e}");
        assert_eq!(p.end_call()[0].decision, Decision::Deny);
        let e = Proxy::with_extra_roots(Duration::from_secs(5), b"not a certificate").unwrap_err();
        assert!(matches!(e, EgressError::Roots(_)), "{e}");
    }
}
