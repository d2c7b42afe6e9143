//! Where webhooks may go: a session's `callback_url` must start with one of its tenant's
//! `callback_prefixes` and carry no userinfo, and no delivery may reach a loopback, private,
//! link-local, unspecified or cloud-metadata address unless `webhooks.allow_private_addresses`.
//!
//! The address check happens twice. When a session is created, [`check_callback`] refuses the
//! literal cases (an IP host in a refused range). When a delivery connects, [`GuardedResolver`]
//! drops refused addresses from every name it resolves — so a name that resolves (or is re-pointed
//! later) to `127.0.0.1` is refused too, with no window between a check and the connect — and
//! [`check_destination`] covers IP hosts, which the HTTP client connects to without resolving.
//!
//! ```
//! use agentfleet::webhooks::address::{refused_range, check_callback, CallbackError};
//!
//! assert_eq!(refused_range("169.254.169.254".parse().unwrap()), Some("cloud metadata"));
//! assert_eq!(refused_range("93.184.215.14".parse().unwrap()), None);
//! let prefixes = ["https://hooks.acme.example/".to_owned()];
//! assert!(check_callback("https://hooks.acme.example/agentfleet", &prefixes, false).is_ok());
//! let evil = check_callback("https://hooks.acme.example.evil.test/", &prefixes, false);
//! assert!(matches!(evil, Err(CallbackError::NoPrefix)));
//! ```

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use thiserror::Error;
use url::{Host, Url};

use crate::config::Config;

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CallbackError {
    /// Not an absolute http(s) URL.
    #[error("must be an absolute http(s) URL")]
    NotHttp,
    /// A URL with `user:password@`.
    #[error("must not carry userinfo (`user:password@`)")]
    Userinfo,
    /// The session's tenant has no callback prefixes (or the session has no tenant).
    #[error("the tenant has no callback_prefixes configured, so its sessions may not set a callback_url")]
    NoPrefixes,
    /// The URL starts with none of the tenant's prefixes.
    #[error("does not start with any of the tenant's callback_prefixes")]
    NoPrefix,
    /// The host is an address in a refused range.
    #[error(transparent)]
    Address(#[from] RefusedAddress),
}

/// A destination address in a refused range: the decision that a delivery is never to be retried.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{host} is a {range} address ({ip}); webhooks.allow_private_addresses is false")]
pub struct RefusedAddress {
    /// The host as named in the URL.
    pub host: String,
    /// The refused address.
    pub ip: IpAddr,
    /// The range it is in, e.g. `loopback`.
    pub range: &'static str,
}

/// The refused range `ip` is in, or `None` for a public address. IPv4-mapped IPv6 addresses are
/// judged as the IPv4 address they map.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or_else(|| refused_v6(v6), refused_v4),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    Some(match ip {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) => "cloud metadata",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_private() => "private",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_unspecified() || ip.octets()[0] == 0 => "unspecified",
        _ if ip.is_broadcast() => "broadcast",
        _ => return None,
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(match ip {
        _ if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) => "cloud metadata",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if first & 0xfe00 == 0xfc00 => "unique-local",
        _ if first & 0xffc0 == 0xfe80 => "link-local",
        _ => return None,
    })
}

/// Checks `ip` (reached as `host`) unless private addresses are allowed.
fn check_ip(host: &str, ip: IpAddr, allow_private: bool) -> Result<(), RefusedAddress> {
    match refused_range(ip).filter(|_| !allow_private) {
        Some(range) => Err(RefusedAddress { host: host.to_owned(), ip, range }),
        None => Ok(()),
    }
}

/// Checks what can be checked of a destination without resolving it: an http(s) URL, no
/// userinfo, and an IP host (which is connected to without resolving) outside the refused ranges.
pub fn check_destination(url: &Url, allow_private: bool) -> Result<(), CallbackError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(CallbackError::NotHttp);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(CallbackError::Userinfo);
    }
    let ip = match url.host() {
        Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(Host::Domain(_)) => return Ok(()),
        None => return Err(CallbackError::NotHttp),
    };
    Ok(check_ip(&ip.to_string(), ip, allow_private)?)
}

/// Checks a session's `callback_url` against its tenant's `prefixes` and returns it normalized
/// (the form that is signed and POSTed to). The prefix is compared with the normalized URL, so a
/// differently spelled host or a `..` cannot step outside it.
pub fn check_callback(url: &str, prefixes: &[String], allow_private: bool) -> Result<Url, CallbackError> {
    let parsed = Url::parse(url).map_err(|_| CallbackError::NotHttp)?;
    check_destination(&parsed, allow_private)?;
    if prefixes.is_empty() {
        return Err(CallbackError::NoPrefixes);
    }
    let normalized = |p: &String| Url::parse(p).map(String::from).unwrap_or_else(|_| p.clone());
    if !prefixes.iter().map(normalized).any(|p| parsed.as_str().starts_with(&p)) {
        return Err(CallbackError::NoPrefix);
    }
    Ok(parsed)
}

/// [`check_callback`] with the prefixes of `tenant` (none without a tenant) and the fleet's
/// `webhooks.allow_private_addresses`.
pub fn check_callback_for(cfg: &Config, tenant: Option<&str>, url: &str) -> Result<Url, CallbackError> {
    let prefixes = tenant.and_then(|t| cfg.tenant(t)).map_or(&[][..], |t| &t.callback_prefixes[..]);
    check_callback(url, prefixes, cfg.webhooks.allow_private_addresses)
}

/// A DNS resolver for the webhook client that drops addresses in the refused ranges, and fails
/// with a [`RefusedAddress`] when none is left. Install it only when private addresses are refused.
#[derive(Debug, Default, Clone, Copy)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let (allowed, refused) = allowed_addresses(&host, resolved);
            match (allowed.is_empty(), refused) {
                (true, Some(refused)) => Err(Box::new(refused) as Box<dyn StdError + Send + Sync>),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

/// The addresses of `host` outside the refused ranges, and the first refused one (if any).
fn allowed_addresses(host: &str, resolved: Vec<SocketAddr>) -> (Vec<SocketAddr>, Option<RefusedAddress>) {
    let mut refused = None;
    let allowed = resolved
        .into_iter()
        .filter(|a| match check_ip(host, a.ip(), false) {
            Ok(()) => true,
            Err(e) => {
                refused.get_or_insert(e);
                false
            }
        })
        .collect();
    (allowed, refused)
}

/// The [`RefusedAddress`] somewhere in an error's chain of causes (a refused connect), if any.
pub fn refused_in<'e>(error: &'e (dyn StdError + 'static)) -> Option<&'e RefusedAddress> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(refused) = e.downcast_ref::<RefusedAddress>() {
            return Some(refused);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIXES: &[&str] = &["https://hooks.acme.example/", "http://127.0.0.1:9/"];

    fn prefixes() -> Vec<String> {
        PREFIXES.iter().map(|p| (*p).to_owned()).collect()
    }

    fn range(ip: &str) -> Option<&'static str> {
        refused_range(ip.parse().expect("an IP"))
    }

    #[test]
    fn the_refused_ranges() {
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("10.0.0.1", "private"),
            ("172.16.5.4", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "cloud metadata"),
            ("169.254.1.1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("fd00:ec2::254", "cloud metadata"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
        ];
        for (ip, want) in cases {
            assert_eq!(range(ip), Some(want), "{ip}");
        }
        for public in ["93.184.215.14", "8.8.8.8", "172.32.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(range(public), None, "{public}");
        }
    }

    #[test]
    fn literal_private_hosts_are_refused_at_create_unless_allowed() {
        let p = prefixes();
        for url in ["http://127.0.0.1:9/x", "http://10.0.0.1/", "http://169.254.169.254/latest", "http://[::1]:9/"] {
            let e = check_callback(url, &p, false).expect_err(url);
            assert!(matches!(e, CallbackError::Address(_)), "{url}: {e:?}");
            assert!(e.to_string().contains("allow_private_addresses"), "{e}");
        }
        assert!(check_callback("http://127.0.0.1:9/x", &p, true).is_ok());
        // Other spellings of an IPv4 address are parsed as one, and refused alike.
        for url in ["http://2130706433/", "http://0x7f.1/", "http://[::ffff:10.0.0.1]/"] {
            assert!(matches!(check_callback(url, &p, false), Err(CallbackError::Address(_))), "{url}");
        }
        // A name is judged when it is resolved, at connect time.
        let hosts = ["https://hooks.acme.example/a"];
        assert!(check_callback(hosts[0], &p, false).is_ok());
    }

    #[test]
    fn userinfo_is_refused() {
        let p = prefixes();
        let e = check_callback("https://user:pw@hooks.acme.example/x", &p, false).expect_err("userinfo");
        assert_eq!(e, CallbackError::Userinfo);
        assert_eq!(check_callback("https://user@hooks.acme.example/x", &p, false), Err(CallbackError::Userinfo));
    }

    #[test]
    fn the_url_must_start_with_a_prefix_of_the_tenant() {
        let p = prefixes();
        let no = |url: &str| check_callback(url, &p, false).err();
        assert_eq!(no("https://hooks.acme.example.evil.test/x"), Some(CallbackError::NoPrefix));
        assert_eq!(no("http://hooks.acme.example/x"), Some(CallbackError::NoPrefix), "another scheme");
        assert_eq!(no("https://other.example/"), Some(CallbackError::NoPrefix));
        assert_eq!(no("ftp://hooks.acme.example/"), Some(CallbackError::NotHttp));
        assert_eq!(no("not a url"), Some(CallbackError::NotHttp));
        let ok = check_callback("HTTPS://HOOKS.acme.example/a/../b", &p, false).expect("normalized into the prefix");
        assert_eq!(ok.as_str(), "https://hooks.acme.example/b");
        assert_eq!(check_callback("https://hooks.acme.example/", &[], false).err(), Some(CallbackError::NoPrefixes));
    }

    #[test]
    fn the_resolver_filter_drops_refused_addresses() {
        let addr = |s: &str| SocketAddr::new(s.parse().expect("ip"), 0);
        let (allowed, refused) = allowed_addresses("mixed.example", vec![addr("127.0.0.1"), addr("93.184.215.14")]);
        assert_eq!(allowed, [addr("93.184.215.14")]);
        assert_eq!(refused.map(|r| r.range), Some("loopback"));
        let (allowed, refused) =
            allowed_addresses("meta.example", vec![addr("169.254.169.254"), addr("fd00:ec2::254")]);
        assert!(allowed.is_empty());
        assert_eq!(refused.map(|r| r.range), Some("cloud metadata"));
    }

    /// `localhost` resolves to loopback: the guarded resolver refuses it, and the client's error
    /// says so in a type the deliverer reads (not in its text).
    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_at_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let client =
            reqwest::Client::builder().dns_resolver(std::sync::Arc::new(GuardedResolver)).build().expect("client");
        let e = client.get(format!("http://localhost:{port}/")).send().await.expect_err("refused");
        let refused = refused_in(&e).expect("a RefusedAddress in the chain");
        assert_eq!((refused.host.as_str(), refused.range), ("localhost", "loopback"));
        assert!(refused_in(&std::io::Error::other("unrelated")).is_none());
    }
}
