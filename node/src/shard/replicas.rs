//! A shard's upkeep of its replicas in a cluster: peers' Raft messages stepped in, replicas
//! created when a leader reaches this node, the meta group (membership) driven, replicas
//! moved toward the placement, and leaderships handed back to preferred members.

use super::*;

impl Shard {
    /// Steps messages from peer replicas into their partitions.
    pub(super) fn step(&mut self, messages: Vec<(u32, Message)>) {
        for (partition, message) in messages {
            if partition == META_GROUP {
                if let Some(meta) = &mut self.meta {
                    meta.step(message);
                }
                continue;
            }
            if !self.replicas.contains_key(&partition) && !self.add_replica(partition) {
                continue;
            }
            if let Some(replica) = self.replicas.get_mut(&partition) {
                replica.step(message);
            }
        }
    }

    /// A leader reached this node for a partition it holds no replica of: the replica is
    /// created, empty, when the membership places one here (it starts from the leader's
    /// snapshot). Messages for a partition placed elsewhere are dropped.
    pub(super) fn add_replica(&mut self, partition: u32) -> bool {
        let Some(cluster) = &self.config.cluster else { return false };
        if partition >= self.config.partitions || partition as usize % self.config.shards != self.config.index {
            return false;
        }
        let placed = replicas_of(partition, &cluster.membership.ids(), cluster.replication);
        if !placed.contains(&self.config.node_id) {
            return false;
        }
        let dir = self.config.data.join(format!("partition-{partition}"));
        let options = PartitionOptions { voters: Vec::new(), ..self.config.partition.clone() };
        let runtime_config = RuntimeConfig { node_id: self.config.node_id, partition, ..self.config.runtime.clone() };
        match Replica::open(&dir, options, runtime_config, self.results_sender.clone(), self.turn_ms) {
            Ok(mut replica) => {
                tracing::info!(partition, "a new replica of this partition, filled by its leader");
                replica.write_commands_in(self.command_format);
                self.replicas.insert(partition, replica);
                true
            }
            Err(error) => {
                tracing::error!(partition, %error, "cannot create a replica of this partition");
                false
            }
        }
    }

    /// Drives the meta group: membership changes applied are published, their requests
    /// answered.
    pub(super) fn settle_meta(&mut self, outgoing: &mut Vec<(u32, Message)>) {
        let Some(meta) = &mut self.meta else { return };
        let applied = match sundial_dispatch::runtime::CommandLog::advance(meta) {
            Ok(applied) => applied,
            Err(error) => {
                // Like a partition's: the node stops, and a restart recovers the log.
                for (_, reply) in self.meta_waiting.drain() {
                    let _ = reply.send(ops::retry_later(503, "unavailable", "the membership log failed", 5));
                }
                self.meta_failure.get_or_insert(error.to_string());
                return;
            }
        };
        for committed in applied {
            let Some(ticket) = committed.ticket else { continue };
            if let Some(reply) = self.meta_waiting.remove(&ticket) {
                let answer = match committed.verdict {
                    Ok(_) => ops::answer(200, json!({"members": members_view(meta.members())})),
                    Err(e) => ops::apply_error(e),
                };
                let _ = reply.send(answer);
            }
        }
        if let (Some(cluster), Some(members)) = (&self.config.cluster, meta.members()) {
            cluster.membership.publish(members);
        }
        outgoing.extend(meta.take_messages().into_iter().map(|m| (META_GROUP, m)));
    }

    /// A membership change: proposed on the meta group's leader, answered once applied.
    pub(super) fn change_members(&mut self, command: MembersCommand, reply: oneshot::Sender<Answer>) {
        let Some(meta) = &mut self.meta else {
            let _ = reply.send(ops::error(409, "not_a_cluster", "this node is not a member of a cluster"));
            return;
        };
        if !meta.is_leader() {
            let _ = reply.send(ops::not_leader(META_GROUP, meta.leader()));
            return;
        }
        match meta.propose_members(&command) {
            Ok(ticket) => {
                self.meta_waiting.insert(ticket, reply);
            }
            Err(error) => {
                let _ = reply.send(ops::retry_later(503, "unavailable", error.to_string(), 1));
            }
        }
    }

    /// Moves each group this node leads one step toward the replicas the membership places
    /// (one single-server change at a time, each after the last committed): a missing
    /// replica joins as a learner (after a snapshot, which carries the group's membership),
    /// a caught-up learner becomes a voter, and only then is a replica no longer placed
    /// removed. A leader that is itself to go hands leadership to a placed voter first.
    pub(super) fn reconcile_replicas(&mut self) {
        let Some(cluster) = &self.config.cluster else { return };
        let members = cluster.membership.ids();
        let me = self.config.node_id;
        if let Some(meta) = &mut self.meta {
            meta.reconcile(&members, me, "meta");
        }
        let mut removed = Vec::new();
        for (partition, replica) in self.replicas.iter_mut() {
            let placed = replicas_of(*partition, &members, cluster.replication);
            replica.reconcile(&placed, me);
            // Out of the group by its own log (it applied its removal: committed) and by the
            // placement: this replica is done. A replica removed before it saw the commit
            // of its removal (the leader stops writing to it) stays until the node stops:
            // deleting a voter's log on a guess could lose a quorum's data.
            if !placed.contains(&me) && replica.partition().is_removed() {
                removed.push(*partition);
            }
        }
        for partition in removed {
            // Requests still waiting on it are told to retry (they reach the group's leader).
            let stranded: Vec<Ticket> = self.tickets.keys().filter(|(p, _)| *p == partition).map(|(_, t)| *t).collect();
            for ticket in stranded {
                self.resolve(partition, ticket, Err(ApplyError::Unavailable("this replica was removed".into())));
            }
            self.replicas.remove(&partition);
            let dir = self.config.data.join(format!("partition-{partition}"));
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(
                    partition,
                    "this node's replica was removed from the partition; its files are deleted"
                ),
                Err(error) => tracing::warn!(partition, %error, "a removed replica's files could not be deleted"),
            }
        }
    }

    /// A leader hands each partition whose preferred leader (its first replica) is another
    /// member, caught up with the log, back to it: leaders spread evenly over the members,
    /// and return to a member that restarted once it has caught up.
    pub(super) fn balance_leaders(&mut self) {
        let Some(cluster) = &self.config.cluster else { return };
        let members = cluster.membership.ids();
        let me = self.config.node_id;
        for (partition, replica) in self.replicas.iter_mut() {
            let placed = replicas_of(*partition, &members, cluster.replication);
            let Some(preferred) = placed.first().copied() else { continue };
            if preferred != me && replica.hand_leadership_to(preferred) {
                tracing::info!(partition, to = preferred, "handing leadership to the partition's preferred leader");
            }
        }
    }
}

/// The membership as the API shows it.
fn members_view(members: Option<&Members>) -> Value {
    let nodes = members
        .map(|m| m.nodes.iter().map(|(id, raft)| json!({"node_id": id, "raft": raft})).collect())
        .unwrap_or_default();
    Value::Array(nodes)
}
