//! Cluster control: N `sundial` processes, node i on its own loopback address (127.0.0.<base+i>)
//! with its own ports, data directory and log file, started, killed (SIGKILL), paused
//! (SIGSTOP/SIGCONT) and restarted with the same settings; optionally under libfaketime so
//! the clock nemesis can move each node's wall clock. Every process is stopped when the
//! `Cluster` is dropped, whatever ended the run.

use crate::client;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian puts libfaketime (`apt-get install faketime`), per architecture.
const LIBFAKETIME_PATHS: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
];

/// The libfaketime library to preload, if installed.
pub fn libfaketime() -> Option<PathBuf> {
    LIBFAKETIME_PATHS.iter().map(PathBuf::from).find(|path| path.is_file())
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub binary: PathBuf,
    pub nodes: u8,
    pub partitions: u32,
    /// Node i listens on 127.0.0.<address_base + i>.
    pub address_base: u8,
    /// Logs go here (`node-<i>.log`).
    pub log_dir: PathBuf,
    /// Data directories and certificates go here.
    pub data_dir: PathBuf,
    /// Preload libfaketime (from this path) so node clocks can be moved.
    pub faketime: Option<PathBuf>,
}

pub struct Node {
    pub id: u8,
    pub ip: Ipv4Addr,
    pub http: SocketAddr,
    binary: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    pub log: PathBuf,
    clock_file: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Stopped by `kill` (the nemesis), as opposed to exited on its own.
    killed: bool,
}

impl Node {
    pub fn killed(&self) -> bool {
        self.killed
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn data(&self) -> &Path {
        &self.data
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    options: ClusterOptions,
    certs: PathBuf,
    peers: String,
}

/// A node's three ports (HTTP, binary protocol, QUIC peer), picked by binding port 0 and
/// holding every socket until all are picked: a port just released can be handed out again,
/// and picking one at a time is the likeliest cause of a run whose node 4 never started
/// ("binary protocol: address already in use" on every start). Another process can still take
/// a port before the node binds it; the no-crashes property then fails the run.
fn free_ports(ip: Ipv4Addr) -> Result<(u16, u16, u16), String> {
    let bind_error = |e: std::io::Error| format!("bind {ip}: {e}");
    let http = std::net::TcpListener::bind((ip, 0)).map_err(bind_error)?;
    let binary = std::net::TcpListener::bind((ip, 0)).map_err(bind_error)?;
    let peer = std::net::UdpSocket::bind((ip, 0)).map_err(bind_error)?;
    let port = |addr: std::io::Result<SocketAddr>| addr.map(|a| a.port()).map_err(|e| e.to_string());
    Ok((port(http.local_addr())?, port(binary.local_addr())?, port(peer.local_addr())?))
}

impl Cluster {
    /// Creates certificates, picks ports and starts every node (not yet waiting for leaders).
    pub fn start(options: ClusterOptions) -> Result<Cluster, String> {
        if !options.binary.is_file() {
            return Err(format!(
                "--binary: {} is not a file (build it with `cargo build -p sundial-node`)",
                options.binary.display()
            ));
        }
        std::fs::create_dir_all(&options.log_dir).map_err(|e| format!("{}: {e}", options.log_dir.display()))?;
        std::fs::create_dir_all(&options.data_dir).map_err(|e| format!("{}: {e}", options.data_dir.display()))?;
        let certs = options.data_dir.join("certs");
        let names: Vec<String> = (1..=options.nodes).map(|i| format!("node-{i}")).collect();
        let output = Command::new(&options.binary)
            .args(["certs", "init", "--dir"])
            .arg(&certs)
            .args(&names)
            .output()
            .map_err(|e| format!("{}: {e}", options.binary.display()))?;
        if !output.status.success() {
            return Err(format!("sundial certs init: {}", String::from_utf8_lossy(&output.stderr).trim()));
        }
        let mut nodes = Vec::new();
        for id in 1..=options.nodes {
            let ip = Ipv4Addr::new(127, 0, 0, options.address_base.saturating_add(id));
            let (http, binary, peer) = free_ports(ip)?;
            let node = Node {
                id,
                ip,
                http: SocketAddr::from((ip, http)),
                binary: SocketAddr::from((ip, binary)),
                peer: SocketAddr::from((ip, peer)),
                data: options.data_dir.join(format!("node-{id}")),
                log: options.log_dir.join(format!("node-{id}.log")),
                clock_file: options.data_dir.join(format!("clock-{id}")),
                child: None,
                paused: false,
                killed: false,
            };
            std::fs::write(&node.clock_file, "+0\n").map_err(|e| format!("{}: {e}", node.clock_file.display()))?;
            nodes.push(node);
        }
        let peers = nodes.iter().map(|n| format!("{}@{}", n.id, n.peer)).collect::<Vec<_>>().join(",");
        let mut cluster = Cluster { nodes, options, certs, peers };
        for id in 1..=cluster.options.nodes {
            cluster.spawn(id)?;
        }
        Ok(cluster)
    }

    pub fn node(&self, id: u8) -> &Node {
        &self.nodes[usize::from(id - 1)]
    }

    fn node_mut(&mut self, id: u8) -> &mut Node {
        &mut self.nodes[usize::from(id - 1)]
    }

    fn spawn(&mut self, id: u8) -> Result<(), String> {
        let (options, certs, peers) = (self.options.clone(), self.certs.clone(), self.peers.clone());
        let node = self.node_mut(id);
        if node.child.is_some() {
            return Ok(());
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("{}: {e}", node.log.display()))?;
        let _ = writeln!(log, "=== sundial-jepsen: starting node {id} at {} ms", crate::now_us() / 1_000);
        let mut command = Command::new(&options.binary);
        command
            .arg("server")
            .args(["--node-id", &id.to_string(), "--peers", &peers])
            .arg("--certs")
            .arg(&certs)
            .args(["--http", &node.http.to_string(), "--binary", &node.binary.to_string()])
            .args(["--raft", &node.peer.to_string()])
            .args(["--partitions", &options.partitions.to_string(), "--shards", "1", "--segment-mb", "1"])
            .args(["--allow-loopback-targets", "--log-level", "info"])
            .arg("--data")
            .arg(&node.data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if let Some(library) = &options.faketime {
            // Only the wall clock moves; monotonic clocks keep real time, as with an NTP step.
            command
                .env("LD_PRELOAD", library)
                .env("FAKETIME_TIMESTAMP_FILE", &node.clock_file)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        // SAFETY: prctl(2) only, between fork and exec. A node dies with the harness, however
        // the harness ends (SIGKILL included), so no node outlives a run. The signal follows
        // the spawning thread: nodes are spawned from the runtime's worker threads, which live
        // as long as the run.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| format!("start node {id}: {e}"))?;
        let pid = child.id();
        node.child = Some(child);
        node.paused = false;
        node.killed = false;
        if let Some(library) = &options.faketime {
            preloaded(pid, library)?;
        }
        Ok(())
    }

    /// SIGKILL; the node stays down until `restart`.
    pub fn kill(&mut self, id: u8) {
        let node = self.node_mut(id);
        if let Some(mut child) = node.child.take() {
            if node.paused {
                signal(&child, libc::SIGCONT);
            }
            let _ = child.kill();
            let _ = child.wait();
            node.killed = true;
        }
        node.paused = false;
    }

    pub fn restart(&mut self, id: u8) -> Result<(), String> {
        self.spawn(id)
    }

    pub fn pause(&mut self, id: u8) {
        let node = self.node_mut(id);
        if let Some(child) = &node.child {
            signal(child, libc::SIGSTOP);
            node.paused = true;
        }
    }

    pub fn resume(&mut self, id: u8) {
        let node = self.node_mut(id);
        if let Some(child) = &node.child {
            signal(child, libc::SIGCONT);
        }
        node.paused = false;
    }

    /// Moves node `id`'s wall clock `offset_ms` from true time (read within a second).
    pub fn set_clock(&self, id: u8, offset_ms: i64) -> Result<(), String> {
        let node = self.node(id);
        let text =
            format!("{}{:.3}s\n", if offset_ms < 0 { "-" } else { "+" }, offset_ms.unsigned_abs() as f64 / 1_000.0);
        std::fs::write(&node.clock_file, text).map_err(|e| format!("{}: {e}", node.clock_file.display()))
    }

    /// Reaps nodes that exited on their own; returns their ids (a crash the run must report).
    pub fn exited(&mut self) -> Vec<(u8, String)> {
        let mut gone = Vec::new();
        for node in &mut self.nodes {
            if let Some(child) = &mut node.child {
                if let Ok(Some(status)) = child.try_wait() {
                    gone.push((node.id, status.to_string()));
                    node.child = None;
                }
            }
        }
        gone
    }

    /// Partitions led per running, unpaused node, as each reports itself.
    pub async fn leaders(&self) -> BTreeMap<u8, Vec<u64>> {
        let mut led = BTreeMap::new();
        for node in self.nodes.iter().filter(|n| n.running() && !n.paused) {
            let Ok((200, view)) = client::call(node.http, "GET", "/debug/cluster", None, Duration::from_secs(2)).await
            else {
                continue;
            };
            let partitions = view["partitions"].as_array().cloned().unwrap_or_default();
            let mine =
                partitions.iter().filter(|p| p["role"] == "leader").filter_map(|p| p["partition"].as_u64()).collect();
            led.insert(node.id, mine);
        }
        led
    }

    /// The node leading the most partitions now, if any node answers.
    pub async fn busiest_leader(&self) -> Option<u8> {
        self.leaders()
            .await
            .into_iter()
            .max_by_key(|(_, led)| led.len())
            .filter(|(_, led)| !led.is_empty())
            .map(|(id, _)| id)
    }

    /// Waits until every partition has a leader.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let led = self.leaders().await;
            let covered: std::collections::BTreeSet<u64> = led.values().flatten().copied().collect();
            if covered.len() == self.options.partitions as usize {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "the cluster did not elect leaders for all {} partitions within {} s ({} have one); see the node logs",
                    self.options.partitions,
                    timeout.as_secs(),
                    covered.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Resumes and restarts every node (the end of a run: everything healed).
    pub fn heal_all(&mut self) -> Result<(), String> {
        for id in 1..=self.options.nodes {
            let _ = self.set_clock(id, 0);
            if self.node(id).paused {
                self.resume(id);
            }
            if !self.node(id).running() {
                self.restart(id)?;
            }
        }
        Ok(())
    }
}

/// Checks that `library` is mapped into process `pid` (else the clock nemesis would change
/// nothing and a run would pass without its fault), waiting briefly for the exec.
fn preloaded(pid: u32, library: &Path) -> Result<(), String> {
    let name = library.file_name().and_then(|n| n.to_str()).unwrap_or("libfaketime");
    for _ in 0..50 {
        if std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| maps.contains(name)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "node process {pid} did not load {} (LD_PRELOAD refused?): the clock nemesis cannot run",
        library.display()
    ))
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) with the pid of a child this process spawned and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=self.options.nodes {
            self.kill(id);
        }
    }
}
