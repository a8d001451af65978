//! The client's IP behind load balancers: `X-Forwarded-For` and `Forwarded` are believed only
//! when the TCP peer is a trusted proxy, and then only as far as the chain of trusted hops goes.
//!
//! Any client can send these headers, so they name the client only when written by a proxy we
//! run. Each proxy appends the address it saw, so the chain is walked from the right: the first
//! address that is not one of our proxies is the client. Addresses further left were written by
//! the client itself and are never believed.

use http::HeaderMap;
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// `server.trusted_proxies`, ready for per-request lookups.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Arc<[IpNet]>);

impl TrustedProxies {
    pub fn new(nets: &[IpNet]) -> Self {
        Self(nets.into())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for a request from `peer`. `X-Forwarded-For` is read when present,
    /// otherwise `Forwarded`'s `for=` parameters.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let hops = forwarded_for(headers);
        let mut client = peer;
        for hop in hops.iter().rev() {
            // An entry we cannot read (`unknown`, an obfuscated name, garbage) ends the chain:
            // what is left of it cannot be tied to a trusted hop.
            let Some(ip) = hop else {
                break;
            };
            client = *ip;
            if !self.contains(*ip) {
                break;
            }
        }
        client
    }
}

/// The addresses of the forwarding headers, left to right; `None` for an entry that is not an
/// address.
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let xff: Vec<Option<IpAddr>> = headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|value| {
            let text = value.to_str().ok();
            text.unwrap_or("\u{0}")
                .split(',')
                .map(|entry| parse_node(entry.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    if !xff.is_empty() {
        return xff;
    }
    headers
        .get_all(http::header::FORWARDED)
        .iter()
        .flat_map(|value| {
            let text = value.to_str().ok();
            text.unwrap_or("\u{0}")
                .split(',')
                .filter_map(forwarded_element_for)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The `for=` parameter of one `Forwarded` element (RFC 7239), if it has one.
fn forwarded_element_for(element: &str) -> Option<Option<IpAddr>> {
    element.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| parse_node(value.trim().trim_matches('"')))
    })
}

/// `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]` or `[::1]:80`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip().to_canonical());
    }
    node.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies() -> TrustedProxies {
        TrustedProxies::new(&[
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ])
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(proxies().client_ip(ip("8.8.8.8"), &h), ip("8.8.8.8"));
        assert_eq!(
            TrustedProxies::default().client_ip(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_chain_is_walked_from_the_right_past_trusted_hops_only() {
        // The client forged the leftmost entry; the proxies appended the rest.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.1.1.1")]);
        assert_eq!(proxies().client_ip(ip("10.0.0.2"), &h), ip("203.0.113.7"));
        // Split across lines, the order is the same.
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "203.0.113.7:5555"),
        ]);
        assert_eq!(proxies().client_ip(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        // Every hop trusted: the leftmost is the best we know.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.1.1.1")]);
        assert_eq!(proxies().client_ip(ip("10.0.0.2"), &h), ip("10.9.9.9"));
        // No header: the peer.
        assert_eq!(
            proxies().client_ip(ip("10.0.0.2"), &HeaderMap::new()),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn unreadable_entries_end_the_chain() {
        let h = headers(&[("x-forwarded-for", "203.0.113.7, garbage, 10.1.1.1")]);
        assert_eq!(proxies().client_ip(ip("10.0.0.2"), &h), ip("10.1.1.1"));
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let h = headers(&[(
            "forwarded",
            r#"for=198.51.100.1;proto=https, for="[2001:db8::17]:4711";by=10.0.0.1"#,
        )]);
        assert_eq!(proxies().client_ip(ip("10.0.0.2"), &h), ip("2001:db8::17"));
        let h = headers(&[("forwarded", "proto=https;For=198.51.100.1")]);
        assert_eq!(proxies().client_ip(ip("10.0.0.2"), &h), ip("198.51.100.1"));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(proxies().client_ip(ip("10.0.0.2"), &h), ip("10.0.0.2"));
    }

    #[test]
    fn mapped_ipv4_addresses_match_ipv4_networks() {
        assert!(proxies().contains(ip("::ffff:10.2.3.4")));
        let h = headers(&[("x-forwarded-for", "::ffff:203.0.113.9")]);
        assert_eq!(
            proxies().client_ip(ip("::ffff:127.0.0.1"), &h),
            ip("203.0.113.9")
        );
    }
}
