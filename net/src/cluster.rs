//! Talking to a cluster: `ClusterClient`, which keeps one
//! `Client` per member and sends each job's requests straight to its partition's leader
//! (any member would forward them; going direct saves that hop).

use crate::client::{Client, ClientError, ClientOptions};
use crate::codec::Item;
use crate::topology::Topology;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long a map is used before it is fetched again (leaders move on failures and when
/// a member comes back).
const TOPOLOGY_MAX_AGE: Duration = Duration::from_secs(5);

/// A client of a whole cluster: requests for a job go to the leader of its partition (by
/// the map, refreshed every few seconds and after a failure); creates without an id go to
/// any member. Answers are the same as a single node's.
pub struct ClusterClient {
    seeds: Vec<SocketAddr>,
    options: ClientOptions,
    state: Mutex<(Topology, Instant)>,
    clients: Mutex<HashMap<SocketAddr, Arc<Client>>>,
    /// Held by the one call fetching a new map; the others go on with the old one (a
    /// member that is not a partition's leader forwards) instead of all asking at once.
    refreshing: Mutex<()>,
}

impl ClusterClient {
    /// Connects to the first seed that answers and fetches the map.
    pub async fn connect(seeds: &[SocketAddr], options: ClientOptions) -> Result<ClusterClient, ClientError> {
        let mut last = ClientError::Invalid("no seed address given".into());
        for seed in seeds {
            match Client::connect(*seed, options.clone()).await {
                Ok(client) => match client.topology().await {
                    Ok(topology) => {
                        let clients = HashMap::from([(*seed, Arc::new(client))]);
                        return Ok(ClusterClient {
                            seeds: seeds.to_vec(),
                            options,
                            state: Mutex::new((topology, Instant::now())),
                            clients: Mutex::new(clients),
                            refreshing: Mutex::new(()),
                        });
                    }
                    Err(e) => last = e,
                },
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The map in use (refreshed when older than a few seconds).
    pub async fn topology(&self) -> Topology {
        self.refresh_if_old().await;
        self.state.lock().await.0.clone()
    }

    /// Creates a job; with an `id`, on its partition's leader.
    pub async fn create(&self, request: &serde_json::Value) -> Result<Item, ClientError> {
        let target = self.target(request["id"].as_str()).await?;
        let outcome = target.create(request).await;
        self.after(outcome).await
    }

    /// Creates many jobs: those with an id grouped by their partition's leader, the rest
    /// sent to one member; answers in order.
    pub async fn create_many(&self, requests: &[serde_json::Value]) -> Result<Vec<Item>, ClientError> {
        let mut groups: HashMap<SocketAddr, (Arc<Client>, Vec<usize>)> = HashMap::new();
        for (position, request) in requests.iter().enumerate() {
            let client = self.target(request["id"].as_str()).await?;
            let key = client.address();
            groups.entry(key).or_insert_with(|| (client, Vec::new())).1.push(position);
        }
        let mut items: Vec<Option<Item>> = vec![None; requests.len()];
        // One task per member, so the members work at once.
        let sent: Vec<_> = groups
            .into_values()
            .map(|(client, positions)| {
                let batch: Vec<serde_json::Value> = positions.iter().map(|p| requests[*p].clone()).collect();
                (positions, tokio::spawn(async move { client.create_many(&batch).await }))
            })
            .collect();
        for (positions, task) in sent {
            let answers =
                task.await.unwrap_or_else(|e| Err(ClientError::Connection(format!("a send task failed: {e}"))));
            let answers = self.after(answers).await?;
            for (position, item) in positions.into_iter().zip(answers) {
                items[position] = Some(item);
            }
        }
        Ok(items.into_iter().map(|item| item.expect("every request sent")).collect())
    }

    /// Reads a job on its partition's leader (linearizable).
    pub async fn get(&self, id: &str) -> Result<Item, ClientError> {
        let target = self.target(Some(id)).await?;
        let outcome = target.get(id).await;
        self.after(outcome).await
    }

    pub async fn cancel(&self, id: &str) -> Result<Item, ClientError> {
        let target = self.target(Some(id)).await?;
        let outcome = target.cancel(id).await;
        self.after(outcome).await
    }

    /// A failed connection may be a member that went away: the next call fetches a new map.
    async fn after<T>(&self, outcome: Result<T, ClientError>) -> Result<T, ClientError> {
        if matches!(outcome, Err(ClientError::Connection(_) | ClientError::Connect { .. } | ClientError::Timeout(_))) {
            self.state.lock().await.1 = Instant::now() - TOPOLOGY_MAX_AGE;
        }
        outcome
    }

    /// The client for the leader of `id`'s partition, or any member's.
    async fn target(&self, id: Option<&str>) -> Result<Arc<Client>, ClientError> {
        self.refresh_if_old().await;
        let address = {
            let state = self.state.lock().await;
            id.and_then(|id| state.0.leader_of(id))
        };
        match address {
            Some(address) => self.client(address).await,
            None => self.any().await,
        }
    }

    async fn client(&self, address: SocketAddr) -> Result<Arc<Client>, ClientError> {
        if let Some(client) = self.clients.lock().await.get(&address) {
            return Ok(client.clone());
        }
        let client = match Client::connect(address, self.options.clone()).await {
            Ok(client) => Arc::new(client),
            // The leader is unreachable: any member forwards (or answers 503 to retry).
            Err(_) => return self.any().await,
        };
        Ok(self.clients.lock().await.entry(address).or_insert(client).clone())
    }

    /// A connected member, or the first seed that answers.
    async fn any(&self) -> Result<Arc<Client>, ClientError> {
        if let Some(client) = self.clients.lock().await.values().next() {
            return Ok(client.clone());
        }
        let mut last = ClientError::Invalid("no seed address given".into());
        for seed in &self.seeds {
            match Client::connect(*seed, self.options.clone()).await {
                Ok(client) => return Ok(self.clients.lock().await.entry(*seed).or_insert(Arc::new(client)).clone()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn refresh_if_old(&self) {
        if self.state.lock().await.1.elapsed() < TOPOLOGY_MAX_AGE {
            return;
        }
        let Ok(_only_me) = self.refreshing.try_lock() else { return };
        if self.state.lock().await.1.elapsed() < TOPOLOGY_MAX_AGE {
            return; // fetched while this call waited for the state
        }
        let Ok(client) = self.any().await else { return };
        match client.topology().await {
            Ok(topology) => *self.state.lock().await = (topology, Instant::now()),
            Err(_) => {
                // That member is gone: forget it, so the next call tries another.
                self.clients.lock().await.retain(|_, c| !Arc::ptr_eq(c, &client));
            }
        }
    }
}
