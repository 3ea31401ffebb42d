//! The intercept set: configured CIDRs plus the current addresses of
//! configured host names, flattened into LPM-trie entries.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use gateway_common::{PortSet, MAX_PORTS};
use ipnet::IpNet;

use crate::config::{DestinationSpec, Target};

/// Ports of one entry: `None` means every port.
type Ports = Option<BTreeSet<u16>>;

fn union(a: &Ports, b: &Ports) -> Ports {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.union(b).copied().collect()),
        _ => None,
    }
}

/// The flattened intercept set, ready to be written to the tries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterceptSet {
    entries: BTreeMap<IpNet, Ports>,
}

/// An entry whose merged port list does not fit a map value.
#[derive(Debug, thiserror::Error)]
#[error("{net}: {count} distinct ports after merging overlapping entries; at most {MAX_PORTS} fit (list fewer ports or intercept every port)")]
pub struct TooManyPorts {
    net: IpNet,
    count: usize,
}

impl InterceptSet {
    /// Builds the set from the configuration and the current host-name resolutions.
    pub fn build(specs: &[DestinationSpec], resolved: &HashMap<String, Vec<IpAddr>>) -> InterceptSet {
        let mut entries: BTreeMap<IpNet, Ports> = BTreeMap::new();
        let mut add = |net: IpNet, ports: &[u16]| {
            let p: Ports = (!ports.is_empty()).then(|| ports.iter().copied().collect());
            let merged = match entries.get(&net) {
                Some(old) => union(old, &p),
                None => p,
            };
            entries.insert(net.trunc(), merged);
        };
        for spec in specs {
            match &spec.target {
                Target::Cidr(net) => add(*net, &spec.ports),
                Target::Host(host) => {
                    for ip in resolved.get(host).into_iter().flatten() {
                        add(IpNet::from(*ip), &spec.ports);
                    }
                }
            }
        }
        // A trie lookup stops at the longest prefix, so a specific entry must
        // also carry the ports of every broader entry that covers it.
        let snapshot = entries.clone();
        for (net, ports) in entries.iter_mut() {
            for (outer, outer_ports) in &snapshot {
                if outer != net && outer.contains(net) {
                    *ports = union(ports, outer_ports);
                }
            }
        }
        InterceptSet { entries }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries as map values.
    pub fn map_entries(&self) -> Result<Vec<(IpNet, PortSet)>, TooManyPorts> {
        self.entries
            .iter()
            .map(|(net, ports)| {
                let set = match ports {
                    None => PortSet::ALL,
                    Some(p) if p.len() > MAX_PORTS => return Err(TooManyPorts { net: *net, count: p.len() }),
                    Some(p) => {
                        let mut set = PortSet { ports: [0; MAX_PORTS], len: p.len() as u16 };
                        for (slot, port) in set.ports.iter_mut().zip(p) {
                            *slot = *port;
                        }
                        set
                    }
                };
                Ok((*net, set))
            })
            .collect()
    }

    /// Whether `ip:port` is intercepted (what the eBPF lookup decides).
    pub fn contains(&self, ip: IpAddr, port: u16) -> bool {
        self.entries
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .is_some_and(|(_, ports)| ports.as_ref().is_none_or(|p| p.contains(&port)))
    }
}

/// Host names of the configuration, deduplicated.
pub fn hosts(specs: &[DestinationSpec]) -> Vec<String> {
    let set: BTreeSet<&str> = specs
        .iter()
        .filter_map(|s| match &s.target {
            Target::Host(h) => Some(h.as_str()),
            Target::Cidr(_) => None,
        })
        .collect();
    set.into_iter().map(str::to_owned).collect()
}

/// Resolves every host at once; a host that fails keeps its previous
/// addresses (dropping them would silently stop intercepting it).
pub async fn resolve_all(
    hosts: &[String],
    previous: &HashMap<String, Vec<IpAddr>>,
    timeout: Duration,
) -> HashMap<String, Vec<IpAddr>> {
    let mut lookups = tokio::task::JoinSet::new();
    for host in hosts {
        let host = host.clone();
        lookups.spawn(async move {
            let result = tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), 0)))
                .await
                .map(|r| r.map(|addrs| addrs.map(|a| a.ip()).collect::<Vec<IpAddr>>()));
            (host, result)
        });
    }
    let mut out = HashMap::new();
    while let Some(joined) = lookups.join_next().await {
        let Ok((host, result)) = joined else { continue };
        match result {
            Ok(Ok(addrs)) => {
                let mut ips = addrs;
                ips.sort();
                ips.dedup();
                out.insert(host, ips);
            }
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(host, reason, "cannot resolve intercepted host; keeping its previous addresses");
                if let Some(old) = previous.get(&host) {
                    out.insert(host, old.clone());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(target: Target, ports: &[u16]) -> DestinationSpec {
        DestinationSpec { target, ports: ports.to_vec() }
    }

    #[test]
    fn specific_entries_inherit_broader_ports() {
        let specs = vec![
            spec(Target::Cidr("10.0.0.0/8".parse().unwrap()), &[443]),
            spec(Target::Host("git.internal".into()), &[22]),
        ];
        let resolved = HashMap::from([("git.internal".to_owned(), vec!["10.1.2.3".parse().unwrap()])]);
        let set = InterceptSet::build(&specs, &resolved);
        assert!(set.contains("10.1.2.3".parse().unwrap(), 22));
        assert!(set.contains("10.1.2.3".parse().unwrap(), 443));
        assert!(!set.contains("10.1.2.3".parse().unwrap(), 80));
        assert!(set.contains("10.9.9.9".parse().unwrap(), 443));
        assert!(!set.contains("10.9.9.9".parse().unwrap(), 22));
        assert!(!set.contains("11.0.0.1".parse().unwrap(), 443));
    }

    #[test]
    fn empty_port_list_means_every_port() {
        let specs = vec![
            spec(Target::Cidr("127.0.0.2/32".parse().unwrap()), &[]),
            spec(Target::Cidr("127.0.0.2/32".parse().unwrap()), &[80]),
        ];
        let set = InterceptSet::build(&specs, &HashMap::new());
        assert_eq!(set.len(), 1);
        assert!(set.contains("127.0.0.2".parse().unwrap(), 9999));
        assert_eq!(set.map_entries().unwrap()[0].1, PortSet::ALL);
    }

    #[test]
    fn too_many_ports_is_an_error() {
        let ports: Vec<u16> = (1..=17).collect();
        let specs = vec![spec(Target::Cidr("::1/128".parse().unwrap()), &ports)];
        let err = InterceptSet::build(&specs, &HashMap::new()).map_entries().unwrap_err();
        assert!(err.to_string().contains("17 distinct ports"));
    }
}
