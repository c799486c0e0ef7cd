//! Where the generic HTTP step may connect. A workflow's URL comes from configuration that
//! users influence, so by default it may only reach public addresses: private, loopback,
//! link-local and other special-purpose addresses are refused unless `http.allow` lists the
//! host name or a network containing the address.
//!
//! Checked twice: before a request is sent (a refusal is a permanent failure with a clear
//! reason), and again in the client's DNS resolver, so a name that resolves differently the
//! second time (DNS rebinding) cannot reach what the first check refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::core::failure::{Failure, FailureKind};

#[derive(Debug, Clone, Default)]
pub struct Outbound {
    hosts: Vec<String>,
    networks: Vec<IpNet>,
}

impl Outbound {
    /// `allow` entries are networks (`10.1.0.0/16`), addresses (`127.0.0.1`) or host names.
    pub fn new(allow: &[String]) -> Result<Outbound, String> {
        let mut outbound = Outbound::default();
        for entry in allow.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if let Ok(network) = entry.parse::<IpNet>() {
                outbound.networks.push(network);
            } else if let Ok(address) = entry.parse::<IpAddr>() {
                outbound.networks.push(IpNet::from(address));
            } else if entry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            {
                outbound.hosts.push(entry.to_ascii_lowercase());
            } else {
                return Err(format!(
                    "http.allow: {entry:?} is not a network, an address or a host name"
                ));
            }
        }
        Ok(outbound)
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.contains(&host)
    }

    /// `None` when the address may be reached, else why not.
    fn refuses(&self, address: IpAddr) -> Option<&'static str> {
        if self
            .networks
            .iter()
            .any(|network| network.contains(&address))
        {
            return None;
        }
        special_purpose(address)
    }

    /// The check before sending: the URL's host must be allowed by name, or every address it
    /// resolves to must be public or in an allowed network.
    pub async fn check(&self, url: &str) -> Result<(), Failure> {
        let refused = |message: String| {
            Failure::new(FailureKind::Permanent, message).with_code("OUTBOUND_REFUSED")
        };
        let url = Url::parse(url).map_err(|e| refused(format!("invalid URL {url:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refused(format!(
                "scheme {} is not http or https",
                url.scheme()
            )));
        }
        let host = url
            .host_str()
            .ok_or_else(|| refused("URL without a host".to_owned()))?;
        if self.allows_host(host) {
            return Ok(());
        }
        let port = url.port_or_known_default().unwrap_or(443);
        let addresses: Vec<IpAddr> = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(literal) => vec![literal],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| {
                    Failure::new(
                        FailureKind::Transient,
                        format!("cannot resolve {host}: {e}"),
                    )
                })?
                .map(|socket| socket.ip())
                .collect(),
        };
        for address in addresses {
            if let Some(kind) = self.refuses(address) {
                return Err(refused(format!(
                    "outbound request to {host} refused: {address} is {kind}; list the host or network in http.allow to reach it"
                )));
            }
        }
        Ok(())
    }

    /// A DNS resolver that drops refused addresses, for the generic HTTP client.
    pub fn resolver(self: Arc<Self>) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver { outbound: self })
    }
}

/// Resolves with the system resolver and keeps only addresses the policy allows.
pub struct GuardedResolver {
    outbound: Arc<Outbound>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let outbound = self.outbound.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if outbound.allows_host(&host) {
                return Ok(Box::new(resolved.into_iter()) as Addrs);
            }
            let permitted: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|socket| outbound.refuses(socket.ip()).is_none())
                .collect();
            if permitted.is_empty() {
                return Err(format!("{host} resolves only to addresses outside http.allow").into());
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// What kind of special-purpose address this is, or `None` for a public one.
pub fn special_purpose(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => special_v4(v4),
            None => special_v6(v6),
        },
    }
}

fn special_v4(address: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = address.octets();
    if address.is_loopback() {
        Some("a loopback address")
    } else if address.is_private() {
        Some("a private address")
    } else if address.is_link_local() {
        Some("a link-local address (cloud metadata lives there)")
    } else if address.is_unspecified() || a == 0 {
        Some("an unspecified address")
    } else if address.is_broadcast() || address.is_multicast() || a >= 240 {
        Some("a broadcast, multicast or reserved address")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a shared (carrier-grade NAT) address")
    } else if address.is_documentation() || (a == 198 && (b == 18 || b == 19)) {
        Some("a documentation or benchmarking address")
    } else {
        None
    }
}

fn special_v6(address: Ipv6Addr) -> Option<&'static str> {
    let first = address.segments()[0];
    if address.is_loopback() {
        Some("a loopback address")
    } else if address.is_unspecified() {
        Some("an unspecified address")
    } else if first & 0xfe00 == 0xfc00 {
        Some("a private (unique local) address")
    } else if first & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else if address.is_multicast() {
        Some("a multicast address")
    } else if first == 0x2001 && address.segments()[1] == 0x0db8 {
        Some("a documentation address")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn special_purpose_addresses_are_recognised() {
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::",
        ] {
            assert!(special_purpose(ip(refused)).is_some(), "{refused}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "1.1.1.1"] {
            assert_eq!(special_purpose(ip(public)), None, "{public}");
        }
    }

    #[tokio::test]
    async fn literals_and_allowed_networks() {
        let closed = Outbound::new(&[]).expect("policy");
        let err = closed
            .check("http://127.0.0.1:8080/x")
            .await
            .expect_err("refused");
        assert_eq!(err.kind, FailureKind::Permanent);
        assert_eq!(err.code.as_deref(), Some("OUTBOUND_REFUSED"));
        assert!(err.message.contains("loopback"), "{}", err.message);
        assert!(closed.check("http://[::1]:8080/").await.is_err());
        assert!(closed.check("ftp://example.com/").await.is_err());

        let open = Outbound::new(&["127.0.0.0/8".into(), "localhost".into()]).expect("policy");
        assert!(open.check("http://127.0.0.1:8080/x").await.is_ok());
        assert!(open.check("http://localhost:8080/x").await.is_ok());
        assert!(open.check("http://10.0.0.1/").await.is_err());
        assert!(Outbound::new(&["not a host!".into()]).is_err());
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_unless_allowed() {
        let closed = Outbound::new(&[]).expect("policy");
        let err = closed
            .check("http://localhost:9/")
            .await
            .expect_err("refused");
        assert!(err.message.contains("localhost"), "{}", err.message);
        let resolver = Arc::new(closed).resolver();
        let name: Name = "localhost".parse().expect("name");
        assert!(
            resolver.resolve(name).await.is_err(),
            "the resolver refuses it too"
        );
    }
}
