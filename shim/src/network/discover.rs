//! What CNI left in a pod's network namespace, read from iproute2's JSON
//! output (`ip -j`), and turned into the agent's SetNetwork terms.

use serde::Deserialize;

use moat_protocol::agent;

/// One link of `ip -j addr show`.
#[derive(Debug, Clone, Deserialize)]
pub struct Link {
    pub ifname: String,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub link_type: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub addr_info: Vec<Addr>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Addr {
    pub family: String,
    pub local: String,
    pub prefixlen: u8,
    #[serde(default)]
    pub scope: String,
}

/// One entry of `ip -j route show` (either family).
#[derive(Debug, Clone, Deserialize)]
pub struct RouteEntry {
    pub dst: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dev: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub metric: Option<u32>,
}

/// Prefix of the taps the shim creates (never taken for a pod interface).
pub const TAP_PREFIX: &str = "moat";

/// The pod's Ethernet interfaces: not loopback, not our own taps.
pub fn pod_links(links: &[Link]) -> Vec<Link> {
    links
        .iter()
        .filter(|l| l.link_type == "ether" && !l.ifname.starts_with(TAP_PREFIX))
        .cloned()
        .collect()
}

/// The guest interface for `link`: same MAC (so the pod's neighbours need
/// no new ARP entry), its global addresses and MTU.
pub fn interface(link: &Link) -> agent::Interface {
    agent::Interface {
        mac: link.address.clone(),
        addresses: link
            .addr_info
            .iter()
            .filter(|a| (a.family == "inet" || a.family == "inet6") && a.scope == "global")
            .map(|a| format!("{}/{}", a.local, a.prefixlen))
            .collect(),
        mtu: link.mtu,
        ..Default::default()
    }
}

/// The routes the guest needs on the pod's links. Kernel routes of an
/// address's own subnet come back by themselves when the agent adds the
/// address; link routes CNI added (a point-to-point gateway, as Calico's
/// 169.254.1.1) go before the routes through gateways.
pub fn routes(entries: &[RouteEntry], links: &[Link]) -> Vec<agent::Route> {
    let mac_of = |dev: &Option<String>| {
        links
            .iter()
            .find(|l| Some(&l.ifname) == dev.as_ref())
            .map(|l| l.address.clone())
    };
    let mut direct = Vec::new();
    let mut via = Vec::new();
    for e in entries {
        let Some(mac) = mac_of(&e.dev) else { continue };
        // The agent takes CIDRs; `ip` prints host routes bare.
        let destination = if e.dst == "default" || e.dst.contains('/') {
            e.dst.clone()
        } else if e.dst.contains(':') {
            format!("{}/128", e.dst)
        } else {
            format!("{}/32", e.dst)
        };
        let route = agent::Route {
            destination,
            gateway: e.gateway.clone().unwrap_or_default(),
            interface_mac: mac,
            metric: e.metric.unwrap_or(0),
            ..Default::default()
        };
        match &e.gateway {
            Some(_) => via.push(route),
            None if e.protocol.as_deref() == Some("kernel") => {}
            // Multicast and similar entries the kernel keeps per link.
            None if e.dst.starts_with("ff00::") || e.dst.starts_with("fe80::") => {}
            None => direct.push(route),
        }
    }
    direct.extend(via);
    direct
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRS: &str = r#"[
      {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"mtu":65536,"link_type":"loopback",
       "address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
      {"ifindex":2,"link_index":5,"ifname":"eth0","flags":["UP"],"mtu":1450,"link_type":"ether",
       "address":"0a:58:0a:f4:01:07","addr_info":[
         {"family":"inet","local":"10.244.1.7","prefixlen":24,"scope":"global"},
         {"family":"inet6","local":"fd00::7","prefixlen":64,"scope":"global"},
         {"family":"inet6","local":"fe80::858:aff:fef4:107","prefixlen":64,"scope":"link"}]},
      {"ifindex":3,"ifname":"moat0","mtu":1450,"link_type":"ether","address":"12:34:56:78:9a:bc","addr_info":[]}
    ]"#;

    const ROUTES: &str = r#"[
      {"dst":"default","gateway":"169.254.1.1","dev":"eth0","flags":["onlink"]},
      {"dst":"169.254.1.1","dev":"eth0","scope":"link","flags":[]},
      {"dst":"10.244.1.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.244.1.7","flags":[]},
      {"dst":"fe80::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[]},
      {"dst":"10.9.0.0/16","gateway":"10.244.1.1","dev":"eth0","metric":5,"flags":[]},
      {"dst":"default","gateway":"192.168.1.1","dev":"wlan9","flags":[]}
    ]"#;

    #[test]
    fn pod_links_skip_loopback_and_our_taps() {
        let links: Vec<Link> = serde_json::from_str(ADDRS).unwrap();
        let pod = pod_links(&links);
        assert_eq!(pod.len(), 1);
        let i = interface(&pod[0]);
        assert_eq!(i.mac, "0a:58:0a:f4:01:07");
        assert_eq!(i.addresses, ["10.244.1.7/24", "fd00::7/64"]);
        assert_eq!(i.mtu, 1450);
    }

    #[test]
    fn routes_keep_link_routes_first_and_drop_kernel_ones() {
        let links = pod_links(&serde_json::from_str::<Vec<Link>>(ADDRS).unwrap());
        let entries: Vec<RouteEntry> = serde_json::from_str(ROUTES).unwrap();
        let r = routes(&entries, &links);
        let got: Vec<(&str, &str, u32)> = r
            .iter()
            .map(|r| (r.destination.as_str(), r.gateway.as_str(), r.metric))
            .collect();
        assert_eq!(
            got,
            [
                ("169.254.1.1/32", "", 0),
                ("default", "169.254.1.1", 0),
                ("10.9.0.0/16", "10.244.1.1", 5),
            ]
        );
        assert!(r.iter().all(|r| r.interface_mac == "0a:58:0a:f4:01:07"));
    }
}
