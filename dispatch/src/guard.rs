//! The SSRF guard: a target may not reach loopback, private, link-local or other internal
//! addresses unless the configuration allows them. Names are checked after resolution, by
//! the resolver the HTTP client connects through, so a name cannot be re-pointed between
//! the check and the connection.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    pub allow_loopback: bool,
    /// RFC 1918, unique-local, link-local, CGNAT and the like.
    pub allow_private: bool,
}

impl AddressPolicy {
    /// Why `ip` is refused, or `None` if allowed.
    pub fn refuses(&self, ip: IpAddr) -> Option<&'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if ip.is_loopback() {
            return (!self.allow_loopback).then_some("loopback");
        }
        if ip.is_unspecified() || ip.is_multicast() {
            return Some("unspecified or multicast");
        }
        let private = match ip {
            IpAddr::V4(v4) => {
                let [a, b, ..] = v4.octets();
                v4.is_private()
                    || v4.is_link_local()
                    || v4.is_broadcast()
                    || (a == 100 && (64..128).contains(&b)) // CGNAT
                    || a == 0
                    || (a == 192 && b == 0)
                    || (a == 198 && (18..20).contains(&b))
                    || a >= 240
            }
            IpAddr::V6(v6) => {
                let segments = v6.segments();
                // An IPv4 address carried inside IPv6 (NAT64, 6to4, IPv4-compatible) is judged
                // as that IPv4 address.
                let embedded = if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || segments[..6] == [0; 6] {
                    Some(std::net::Ipv4Addr::from(((segments[6] as u32) << 16) | segments[7] as u32))
                } else if segments[0] == 0x2002 {
                    Some(std::net::Ipv4Addr::from(((segments[1] as u32) << 16) | segments[2] as u32))
                } else {
                    None
                };
                if let Some(v4) = embedded {
                    return self.refuses(IpAddr::V4(v4));
                }
                let first = segments[0];
                (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80 || (first & 0xffc0) == 0xfec0
            }
        };
        (private && !self.allow_private).then_some("private or link-local")
    }
}

/// A resolver for hyper-util's connector that drops refused addresses (and fails when none
/// is left), so the connection only ever goes to an address that passed the guard.
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    pub policy: AddressPolicy,
}

impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                resolved.iter().copied().filter(|a| policy.refuses(a.ip()).is_none()).collect();
            if allowed.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("ssrf guard: {host} resolves only to refused addresses"),
                ));
            }
            Ok(allowed.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        let strict = AddressPolicy::default();
        for ip in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "0.0.0.0",
        ] {
            assert!(strict.refuses(ip.parse().expect("ip")).is_some(), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1::1"] {
            assert_eq!(strict.refuses(ip.parse().expect("ip")), None, "{ip}");
        }
        let loopback = AddressPolicy { allow_loopback: true, allow_private: false };
        assert_eq!(loopback.refuses("127.0.0.1".parse().expect("ip")), None);
        assert!(loopback.refuses("10.0.0.1".parse().expect("ip")).is_some());
    }
}
