//! Being one member of several: the cluster's fixed metadata (`meta`, partition placement),
//! its replicated membership (`members`) and the QUIC mesh that carries Raft messages and
//! forwarded requests between members (`mesh`).

pub mod members;
pub mod mesh;
pub mod meta;
