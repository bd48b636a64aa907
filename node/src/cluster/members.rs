//! The cluster's membership as a replicated state machine: the members and their peer
//! (QUIC) addresses. It lives in the meta group, a Raft group every member holds a replica
//! of; partitions place their replicas by it (`meta::replicas_of`), so adding or removing a
//! member here is what moves replicas.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use sundial_engine::state::{Applied, ApplyError};

/// The meta group's id on the wire (partitions are numbered from 0).
pub const META_GROUP: u32 = u32::MAX;
/// Members a cluster may have at most.
pub const MEMBERS_MAX: usize = 64;

/// Members by id, each with the address its peers dial.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub nodes: BTreeMap<u64, String>,
}

/// A change of membership, proposed to the meta group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembersCommand {
    Add { node_id: u64, raft: String },
    Remove { node_id: u64 },
}

impl Members {
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Applies a change; a refused one changes nothing. Adding a member again with the same
    /// address is a no-op (a retried request).
    pub fn apply(&mut self, command: MembersCommand) -> Result<Applied, ApplyError> {
        match command {
            MembersCommand::Add { node_id, raft } => match self.nodes.get(&node_id) {
                Some(existing) if *existing == raft => Ok(Applied::AlreadyExists),
                Some(existing) => Err(ApplyError::Conflict(format!("node {node_id} is a member at {existing}"))),
                None if node_id == 0 => Err(ApplyError::Conflict("node ids start at 1".into())),
                None if self.nodes.len() >= MEMBERS_MAX => {
                    Err(ApplyError::Conflict(format!("a cluster has at most {MEMBERS_MAX} members")))
                }
                None => {
                    self.nodes.insert(node_id, raft);
                    Ok(Applied::Created)
                }
            },
            MembersCommand::Remove { node_id } => {
                if !self.nodes.contains_key(&node_id) {
                    return Err(ApplyError::NotFound(format!("member {node_id}")));
                }
                if self.nodes.len() == 1 {
                    return Err(ApplyError::Conflict(format!("node {node_id} is the last member and stays")));
                }
                self.nodes.remove(&node_id);
                Ok(Applied::Done)
            }
        }
    }

    pub fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("members serialize")
    }

    pub fn restore(bytes: &[u8]) -> Result<Members, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// The membership as this node last applied it, shared by its shards, router and mesh.
pub struct Membership {
    current: std::sync::RwLock<Members>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Membership {
    pub fn new(members: Members) -> Membership {
        Membership { current: std::sync::RwLock::new(members), changed: tokio::sync::watch::Sender::new(0) }
    }

    pub fn get(&self) -> Members {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).ids()
    }

    /// Publishes the membership the meta group applied (a no-op when unchanged).
    pub fn publish(&self, members: &Members) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if *current != *members {
            *current = members.clone();
            drop(current);
            self.changed.send_modify(|version| *version += 1);
        }
    }

    /// Wakes on every change.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_and_removes_keep_at_least_one_member_and_refuse_conflicts() {
        let mut members = Members::default();
        let add = |id: u64, raft: &str| MembersCommand::Add { node_id: id, raft: raft.into() };
        assert_eq!(members.apply(add(1, "a:1")), Ok(Applied::Created));
        assert_eq!(members.apply(add(1, "a:1")), Ok(Applied::AlreadyExists), "a retry");
        assert!(matches!(members.apply(add(1, "b:1")), Err(ApplyError::Conflict(_))));
        assert!(members.apply(MembersCommand::Remove { node_id: 1 }).is_err(), "the last member stays");
        assert_eq!(members.apply(add(2, "b:2")), Ok(Applied::Created));
        assert_eq!(members.apply(MembersCommand::Remove { node_id: 1 }), Ok(Applied::Done));
        assert_eq!(members.ids(), [2]);
        assert_eq!(Members::restore(&members.snapshot()), Ok(members));
    }
}
