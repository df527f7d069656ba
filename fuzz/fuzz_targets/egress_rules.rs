//! The egress decision, up to the point where the proxy would connect:
//! rules as a tenant writes them, a URL as a tool sends it, an address as
//! DNS might answer. Checked: a rule prints back to itself; a host's
//! normal form is stable; every spelling of an IPv4 literal gets the same
//! verdict; a special-purpose address is reached only when an allow rule
//! names it; an address a deny rule names (without a port) is never
//! reached.
#![no_main]

use airlock_guest::grants::{HttpGrant, HttpRule, HttpVerdict, normalize_host, special_purpose};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Arbitrary)]
struct Input {
    allow: Vec<String>,
    deny: Vec<String>,
    url: String,
    https: bool,
    v4: [u8; 4],
    v6: Option<[u8; 16]>,
    port: u16,
}

fn rules(texts: &[String]) -> Vec<HttpRule> {
    texts
        .iter()
        .take(8)
        .filter_map(|t| HttpRule::parse(t).ok())
        .inspect(|r| {
            let back = HttpRule::parse(&r.to_string()).expect("a rule prints as a rule");
            assert_eq!(&back, r, "{r}");
        })
        .collect()
}

fn allowed(v: &HttpVerdict) -> bool {
    matches!(v, HttpVerdict::Allowed(_))
}

/// Spellings of an IPv4 address the URL standard reads as it.
fn spellings(ip: Ipv4Addr) -> Vec<String> {
    let n = u32::from(ip);
    let o = ip.octets();
    vec![
        ip.to_string(),
        n.to_string(),
        format!("0x{n:x}"),
        format!("{}.{}", o[0], n & 0x00ff_ffff),
        format!("0{:o}.{}.{}.{}", o[0], o[1], o[2], o[3]),
        format!("[::ffff:{ip}]"),
        format!("{ip}."),
    ]
}

fuzz_target!(|input: Input| {
    let grant = HttpGrant {
        allow: rules(&input.allow),
        deny: rules(&input.deny),
    };
    let scheme = if input.https { "https" } else { "http" };
    let port = input.port.max(1);

    // The URL as the proxy reads it.
    if let Ok(url) = url::Url::parse(&input.url)
        && let Some(host) = url.host_str()
    {
        let n = normalize_host(host);
        assert_eq!(normalize_host(&n), n, "normal form of {host:?}");
        let p = url.port_or_known_default().unwrap_or(0);
        let by_name = grant.check(scheme, host, p);
        assert_eq!(
            allowed(&by_name),
            allowed(&grant.check(scheme, &n, p)),
            "{host:?} vs {n:?}"
        );
    }

    // One address, many spellings: one verdict.
    let v4 = Ipv4Addr::from(input.v4);
    let first = grant.check(scheme, &v4.to_string(), port);
    for s in spellings(v4) {
        assert_eq!(
            allowed(&grant.check(scheme, &s, port)),
            allowed(&first),
            "{s} vs {v4}"
        );
    }

    // The address check, for the literal and for a name that resolved to it.
    let mut ips = vec![IpAddr::V4(v4)];
    if let Some(b) = input.v6 {
        ips.push(IpAddr::V6(Ipv6Addr::from(b)));
    }
    for ip in ips {
        let plain = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        for host in [plain.to_string(), "resolved.example".to_string()] {
            let verdict = grant.check_address(scheme, &host, port, ip);
            if allowed(&verdict) && special_purpose(ip).is_some() {
                assert!(
                    grant.allow.iter().any(|r| r.ip() == Some(plain)),
                    "{ip} ({:?}) reached without a rule naming it: {verdict:?}",
                    special_purpose(ip)
                );
            }
            let denied_by_rule = grant.deny.iter().any(|r| {
                r.ip() == Some(plain)
                    && r.port.is_none()
                    && r.scheme.as_deref().is_none_or(|s| s == scheme)
            });
            if denied_by_rule {
                assert!(
                    !allowed(&verdict),
                    "{ip} is named by a deny rule: {verdict:?}"
                );
            }
        }
    }
});
