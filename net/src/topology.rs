//! Where a job lives: which partition a job id belongs to (the same function the nodes use)
//! and the cluster's map as a node reports it (`Message::Topology`). Pure values: the client
//! fetches the map, `ClusterClient` routes by it.

use serde::Deserialize;
use std::net::SocketAddr;

/// The partition of a job id: FNV-1a 64 of its bytes modulo the partition count. Stable
/// forever (a job's log is found by it), and the nodes' own placement.
pub fn partition_of(id: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

/// A member as the map lists it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct MemberAddress {
    pub node_id: u64,
    /// Its binary-protocol address (`None` while the reporting node has not heard it).
    pub binary: Option<String>,
}

/// The cluster's map as one node sees it (`Message::Topology`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Topology {
    pub partitions: u32,
    pub members: Vec<MemberAddress>,
    /// Per partition, the member leading it (`None`: unknown, an election is running).
    pub leaders: Vec<Option<u64>>,
}

impl Topology {
    /// The binary address of the member leading the partition of `id`.
    pub fn leader_of(&self, id: &str) -> Option<SocketAddr> {
        let partition = partition_of(id, self.partitions) as usize;
        let leader = self.leaders.get(partition).copied().flatten()?;
        self.address_of(leader)
    }

    fn address_of(&self, node_id: u64) -> Option<SocketAddr> {
        let member = self.members.iter().find(|m| m.node_id == node_id)?;
        // A member bound to 0.0.0.0 did not say where it can be reached.
        member.binary.as_deref()?.parse::<SocketAddr>().ok().filter(|a| !a.ip().is_unspecified())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_of_is_fnv1a_and_spreads_ids() {
        // FNV-1a 64 of "" is the offset basis; of "a" a published value.
        assert_eq!(partition_of("", u32::MAX), (0xcbf2_9ce4_8422_2325u64 % u64::from(u32::MAX)) as u32);
        assert_eq!(partition_of("a", u32::MAX), (0xaf63_dc4c_8601_ec8cu64 % u64::from(u32::MAX)) as u32);
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("job-{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1_200).contains(c)), "{counts:?}");
    }

    #[test]
    fn a_topology_names_each_ids_leader() {
        let topology = Topology {
            partitions: 2,
            members: vec![
                MemberAddress { node_id: 1, binary: Some("127.0.0.1:7071".into()) },
                MemberAddress { node_id: 2, binary: None },
            ],
            leaders: vec![Some(1), Some(2)],
        };
        let on = |p: u32| (0..).map(|i| format!("j{i}")).find(|id| partition_of(id, 2) == p).expect("an id");
        assert_eq!(topology.leader_of(&on(0)), Some("127.0.0.1:7071".parse().expect("address")));
        assert_eq!(topology.leader_of(&on(1)), None, "a leader whose address is unknown");
    }
}
