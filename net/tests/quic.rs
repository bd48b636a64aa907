//! The cluster transport over real UDP sockets on 127.0.0.1: peers with certificates from
//! the cluster's CA exchange messages both ways; a peer with a certificate from another CA
//! is refused at the handshake, in either direction.

use std::sync::Arc;
use std::time::Duration;
use sundial_net::certs::{CertificateAuthority, NodeIdentity};
use sundial_net::quic::{Connection, Endpoint};
use tokio::sync::mpsc;

fn identity(ca: &CertificateAuthority, name: &str) -> NodeIdentity {
    let (certificate, key) = ca.issue(name).expect("issue");
    NodeIdentity::from_pem(&ca.certificate_pem, &certificate, &key).expect("identity")
}

/// An endpoint that keeps accepting (as a node does), handing over each peer that passed
/// the handshake.
fn listening(identity: &NodeIdentity) -> (Arc<Endpoint>, mpsc::UnboundedReceiver<Connection>) {
    let endpoint = Arc::new(Endpoint::bind("127.0.0.1:0".parse().expect("address"), identity).expect("bind"));
    let (peers, accepted) = mpsc::unbounded_channel();
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        // Bounded by the endpoint: ends when it is closed.
        while let Some(connection) = accepting.accept().await {
            if peers.send(connection).is_err() {
                break;
            }
        }
    });
    (endpoint, accepted)
}

const LIMIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn peers_of_one_cluster_talk_and_a_peer_of_another_is_refused() {
    let cluster = CertificateAuthority::generate("test").expect("ca");
    let (a, mut a_peers) = listening(&identity(&cluster, "node-a"));
    let (b, _b_peers) = listening(&identity(&cluster, "node-b"));
    let a_addr = a.local_addr().expect("address");

    let to_a = tokio::time::timeout(LIMIT, b.connect(a_addr)).await.expect("in time").expect("connect");
    to_a.send(b"hello".to_vec()).await.expect("send");
    let from_b = tokio::time::timeout(LIMIT, a_peers.recv()).await.expect("in time").expect("a peer");
    let message = from_b.receive().await.expect("a message");
    from_b.send([message.as_slice(), b" back"].concat()).await.expect("reply");
    let reply = tokio::time::timeout(LIMIT, to_a.receive()).await.expect("in time").expect("reply");
    assert_eq!(reply, b"hello back");
    // A large message arrives whole.
    let big = vec![7u8; 1 << 20];
    to_a.send(big.clone()).await.expect("send big");
    assert_eq!(from_b.receive().await.expect("big").len(), big.len());

    // Another cluster's node dials A: it never becomes A's peer, and its connection carries
    // nothing (TLS 1.3 may let the dialler finish before A refuses its certificate).
    let other = CertificateAuthority::generate("other").expect("ca");
    let (stranger, _stranger_peers) = listening(&identity(&other, "node-x"));
    match tokio::time::timeout(LIMIT, stranger.connect(a_addr)).await.expect("in time") {
        Err(refused) => assert!(refused.to_string().contains("connecting to"), "{refused}"),
        Ok(connection) => {
            let used = async {
                connection.send(b"let me in".to_vec()).await?;
                connection.receive().await
            };
            let outcome = tokio::time::timeout(LIMIT, used).await.expect("in time");
            assert!(outcome.is_err(), "a stranger's connection must not carry messages");
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(1), a_peers.recv()).await.is_err(),
        "the stranger never became a peer"
    );
    // A dials the stranger: the stranger's certificate is refused.
    let stranger_addr = stranger.local_addr().expect("address");
    let dialled = tokio::time::timeout(LIMIT, b.connect(stranger_addr)).await.expect("in time");
    assert!(dialled.is_err(), "a server with another CA's certificate is refused");
    // The cluster's own peers are unaffected.
    to_a.send(b"still here".to_vec()).await.expect("send");
    assert_eq!(from_b.receive().await.expect("message"), b"still here");
    a.close();
}

#[tokio::test]
async fn messages_are_accepted_in_the_order_their_streams_were_opened_whatever_order_they_are_written() {
    // The mesh hands a peer's messages on in this order (Raft expects them so): a large
    // message opened first and written last still comes first.
    let cluster = CertificateAuthority::generate("order").expect("ca");
    let (a, mut a_peers) = listening(&identity(&cluster, "node-a"));
    let (b, _b_peers) = listening(&identity(&cluster, "node-b"));
    let to_a = tokio::time::timeout(LIMIT, b.connect(a.local_addr().expect("address"))).await.expect("in time");
    let to_a = to_a.expect("connect");
    let first = to_a.open_message().await.expect("open the first");
    let second = to_a.open_message().await.expect("open the second");
    second.send(b"second".to_vec()).await.expect("send the second");
    let from_b = tokio::time::timeout(LIMIT, a_peers.recv()).await.expect("in time").expect("a peer");
    let accepted = tokio::time::timeout(LIMIT, from_b.accept_message()).await.expect("in time").expect("accepted");
    first.send(vec![1u8; 1 << 20]).await.expect("send the first");
    let read = tokio::time::timeout(LIMIT, accepted.read()).await.expect("in time").expect("read");
    assert_eq!(read.len(), 1 << 20, "the stream opened first is accepted first");
    let next = tokio::time::timeout(LIMIT, from_b.accept_message()).await.expect("in time").expect("accepted");
    assert_eq!(next.read().await.expect("read"), b"second");
    a.close();
}

#[test]
fn certificate_files_round_trip_and_are_not_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::generate("files").expect("ca");
    ca.write(dir.path()).expect("write ca");
    assert!(ca.write(dir.path()).is_err(), "an existing CA is not overwritten");
    let loaded = CertificateAuthority::load(dir.path()).expect("load ca");
    assert_eq!(loaded.cluster, "files");
    loaded.write_node(dir.path(), "node-1").expect("issue node-1");
    assert!(loaded.write_node(dir.path(), "bad/name").is_err());
    assert!(loaded.write_node(dir.path(), "node-1").is_err(), "an issued node is not overwritten");
    NodeIdentity::load(dir.path(), "node-1").expect("load node-1");
    assert!(NodeIdentity::load(dir.path(), "node-2").is_err(), "a node never issued");
    std::fs::write(dir.path().join("node-1.pem"), "not a certificate").expect("corrupt");
    let refused = NodeIdentity::load(dir.path(), "node-1").err().expect("refused").to_string();
    assert!(refused.contains("node-1.pem") && refused.contains("CERTIFICATE"), "{refused}");
}

/// Certificates a loaded CA issues (files, a later run) are accepted by peers holding
/// certificates from the same CA issued earlier.
#[tokio::test]
async fn a_reloaded_ca_issues_certificates_its_cluster_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::generate("reload").expect("ca");
    ca.write(dir.path()).expect("write");
    ca.write_node(dir.path(), "first").expect("first");
    CertificateAuthority::load(dir.path()).expect("load").write_node(dir.path(), "later").expect("later");
    let (first, _first_peers) = listening(&NodeIdentity::load(dir.path(), "first").expect("first"));
    let (later, mut later_peers) = listening(&NodeIdentity::load(dir.path(), "later").expect("later"));
    let to_later = tokio::time::timeout(LIMIT, first.connect(later.local_addr().expect("addr")))
        .await
        .expect("in time")
        .expect("connect");
    to_later.send(b"ok".to_vec()).await.expect("send");
    let peer = tokio::time::timeout(LIMIT, later_peers.recv()).await.expect("in time").expect("peer");
    assert_eq!(peer.receive().await.expect("message"), b"ok");
}
