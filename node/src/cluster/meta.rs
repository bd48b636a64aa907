//! The cluster's metadata, fixed when its data directory is created (`cluster.json`): the
//! partition count every job id is hashed over. Changing it would move jobs between
//! partitions, so a start with a different count is refused rather than obeyed.

use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Partitions of a new cluster unless configured: enough to spread over 16 cores.
pub const PARTITIONS_DEFAULT: u32 = 16;
/// Partitions a cluster may have at most (each has its own log and timers).
pub const PARTITIONS_MAX: u32 = 1_024;
const META_FILE: &str = "cluster.json";
const META_FORMAT: u64 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterMeta {
    pub cluster_id: String,
    pub partitions: u32,
    pub created_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid cluster metadata ({rule})")]
    Invalid { path: PathBuf, rule: String },
    #[error("partitions: this cluster was created with {existing} partitions and the count is fixed at creation; {requested} was asked for (omit the setting or use {existing})")]
    PartitionsChanged { existing: u32, requested: u32 },
    #[error("partitions: must be within 1..={PARTITIONS_MAX}, not {0}")]
    PartitionsOutOfRange(u32),
}

impl ClusterMeta {
    /// Reads the metadata of `data`, or creates it with `requested` partitions (default
    /// `PARTITIONS_DEFAULT`). A directory from before metadata existed (one `partition-0`)
    /// is adopted as a one-partition cluster.
    pub fn open_or_create(data: &Path, requested: Option<u32>, now_ms: u64) -> Result<ClusterMeta, MetaError> {
        if let Some(count) = requested {
            if !(1..=PARTITIONS_MAX).contains(&count) {
                return Err(MetaError::PartitionsOutOfRange(count));
            }
        }
        let path = data.join(META_FILE);
        let io = |source| MetaError::Io { path: path.clone(), source };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let meta =
                    ClusterMeta::decode(&bytes).map_err(|rule| MetaError::Invalid { path: path.clone(), rule })?;
                match requested {
                    Some(requested) if requested != meta.partitions => {
                        Err(MetaError::PartitionsChanged { existing: meta.partitions, requested })
                    }
                    _ => Ok(meta),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let legacy = data.join("partition-0").exists() && !data.join("partition-1").exists();
                let partitions = match (requested, legacy) {
                    (Some(count), _) => count,
                    (None, true) => 1,
                    (None, false) => PARTITIONS_DEFAULT,
                };
                let meta = ClusterMeta {
                    cluster_id: format!(
                        "{:016x}",
                        now_ms.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id())
                    ),
                    partitions,
                    created_ms: now_ms,
                };
                std::fs::create_dir_all(data).map_err(io)?;
                meta.write(&path).map_err(io)?;
                Ok(meta)
            }
            Err(e) => Err(io(e)),
        }
    }

    fn decode(bytes: &[u8]) -> Result<ClusterMeta, String> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let field = |name: &str| value.get(name).ok_or_else(|| format!("{name}: missing"));
        let format = field("format")?;
        if format.as_u64() != Some(META_FORMAT) {
            return Err(format!(
                "format: this data directory is format {format}, this build reads format {META_FORMAT}: run the Sundial version that wrote it"
            ));
        }
        let partitions = field("partitions")?.as_u64().ok_or("partitions: must be a whole number")?;
        let partitions = u32::try_from(partitions).map_err(|_| "partitions: too large".to_string())?;
        if !(1..=PARTITIONS_MAX).contains(&partitions) {
            return Err(format!("partitions: must be within 1..={PARTITIONS_MAX}"));
        }
        Ok(ClusterMeta {
            cluster_id: field("cluster_id")?.as_str().ok_or("cluster_id: must be a string")?.to_string(),
            partitions,
            created_ms: field("created_ms")?.as_u64().ok_or("created_ms: must be a whole number")?,
        })
    }

    /// Written whole to a temporary file, synced, then renamed: a crash leaves the old file
    /// or the new one, never a torn one.
    fn write(&self, path: &Path) -> std::io::Result<()> {
        let document = json!({
            "format": META_FORMAT,
            "cluster_id": self.cluster_id,
            "partitions": self.partitions,
            "created_ms": self.created_ms,
        });
        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(format!("{document:#}\n").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    }
}

/// The partition a job id belongs to (FNV-1a of its bytes, modulo the count; stable across
/// versions and machines): one definition for nodes and clients, which route by it.
pub use sundial_net::partition_of;

/// Replicas per partition unless configured (tolerates one failed node).
pub const REPLICATION_DEFAULT: usize = 3;

/// The members holding a replica of `partition`: `factor` of them (all, when fewer),
/// consecutive in id order from position `partition mod members`. The first is the
/// partition's preferred leader, so leadership spreads evenly over the members.
pub fn replicas_of(partition: u32, members: &[u64], factor: usize) -> Vec<u64> {
    let mut sorted = members.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let count = sorted.len();
    if count == 0 {
        return Vec::new();
    }
    let start = partition as usize % count;
    (0..factor.clamp(1, count)).map(|k| sorted[(start + k) % count]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_spread_preferred_leaders_evenly_and_never_repeat_a_member() {
        let members = [3, 1, 2];
        let mut preferred = [0usize; 4];
        for partition in 0..16 {
            let replicas = replicas_of(partition, &members, 3);
            assert_eq!(replicas.len(), 3);
            let mut unique = replicas.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique, [1, 2, 3], "partition {partition}: {replicas:?}");
            preferred[replicas[0] as usize] += 1;
        }
        assert_eq!(&preferred[1..], [6, 5, 5], "16 partitions over 3 members");
        assert_eq!(replicas_of(4, &[1, 2, 3, 4, 5], 3), [5, 1, 2]);
        assert_eq!(replicas_of(0, &[7], 3), [7], "a single node holds every partition");
    }

    #[test]
    fn the_partition_count_is_kept_and_a_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let created = ClusterMeta::open_or_create(dir.path(), Some(8), 1).unwrap();
        assert_eq!(created.partitions, 8);
        assert_eq!(ClusterMeta::open_or_create(dir.path(), None, 2).unwrap(), created);
        assert_eq!(ClusterMeta::open_or_create(dir.path(), Some(8), 3).unwrap(), created);
        let refused = ClusterMeta::open_or_create(dir.path(), Some(4), 4).unwrap_err();
        assert!(refused.to_string().contains("created with 8 partitions"), "{refused}");
        assert!(ClusterMeta::open_or_create(dir.path(), Some(0), 5).is_err());
    }

    #[test]
    fn a_new_directory_gets_the_default_and_a_corrupt_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ClusterMeta::open_or_create(dir.path(), None, 1).unwrap().partitions, PARTITIONS_DEFAULT);
        std::fs::write(dir.path().join(META_FILE), b"{\"format\": 1}").unwrap();
        let refused = ClusterMeta::open_or_create(dir.path(), None, 1).unwrap_err().to_string();
        assert!(refused.contains("partitions: missing"), "{refused}");
        std::fs::write(dir.path().join(META_FILE), b"{\"format\": 2, \"partitions\": 16}").unwrap();
        let refused = ClusterMeta::open_or_create(dir.path(), None, 1).unwrap_err().to_string();
        assert!(
            refused.contains("this data directory is format 2, this build reads format 1: run the Sundial version"),
            "{refused}"
        );
    }

    #[test]
    fn ids_spread_over_every_partition_and_always_land_in_the_same_one() {
        let mut seen = [0u32; 16];
        for n in 0..1_600 {
            let id = format!("job-{n}");
            let partition = partition_of(&id, 16);
            assert_eq!(partition, partition_of(&id, 16));
            seen[partition as usize] += 1;
        }
        // Roughly even: no partition gets less than half or more than twice its share.
        assert!(seen.iter().all(|&n| (50..=200).contains(&n)), "{seen:?}");
        assert_eq!(partition_of("anything", 1), 0);
    }
}
