//! The nemesis plan: which faults happen when. Pure — the seed, the chosen kinds and the
//! run's length give the same timeline every time; `faults` carries it out on a cluster.
//!
//! Faults come one window at a time (fault, heal, a quiet gap), drawn from the kinds asked
//! for, so a run mixes them. Clock faults, mixed with other kinds, run on a timeline of their
//! own and overlap the others (a skewed node may also be killed, paused or cut off), as
//! Jepsen composes nemeses. The last window heals well before the workload ends, leaving a
//! quiet stretch in which progress must resume.

use crate::rng::Rng;
use serde::Serialize;

/// The kinds `--nemesis` accepts.
pub const KINDS: [&str; 5] = ["kill", "pause", "partition", "clock", "torn"];

/// One fault, with its targets resolved where the plan can resolve them (node ids from 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL, restarted at the heal.
    Kill {
        nodes: Vec<u8>,
    },
    /// SIGKILL of the node leading the most partitions (chosen when the window opens).
    KillBusiestLeader,
    /// SIGSTOP, SIGCONT at the heal.
    Pause {
        nodes: Vec<u8>,
    },
    PauseBusiestLeader,
    /// Packets from `from` to `to` dropped, for every listed pair; `shape` names the grudge.
    Partition {
        shape: String,
        blocked: Vec<(u8, u8)>,
    },
    /// A node's wall clock set `offset_ms` away from true time (libfaketime), reset at the heal.
    Clock {
        node: u8,
        offset_ms: i64,
    },
    /// SIGKILL, then the tail of the node's newest log segment torn, restarted at the heal.
    Torn {
        node: u8,
        mode: TornMode,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TornMode {
    /// Garbage after the last record: a write that was cut short before it was acknowledged.
    Garbage,
    /// The last record's final bytes overwritten: a torn write of the newest batch.
    LastRecord,
    /// The last record's final bytes zeroed: the end of the newest write never landed.
    Cut,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Offsets from the workload's start.
    pub start_ms: u64,
    pub end_ms: u64,
    #[serde(flatten)]
    pub fault: Fault,
}

/// What the plan is made from.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub seed: u64,
    pub kinds: Vec<String>,
    pub nodes: u8,
    /// The workload's length.
    pub run_ms: u64,
    /// Longest clock offset the clock nemesis may set, ms.
    pub clock_offset_max_ms: u64,
    pub recovery_bound_ms: u64,
}

/// How long faults last and the gaps between them, scaled to the run (a 40 s smoke gets
/// shorter windows than a 10-minute run).
fn durations(run_ms: u64) -> ((u64, u64), (u64, u64)) {
    if run_ms < 90_000 {
        ((3_000, 6_000), (2_000, 3_000))
    } else {
        ((5_000, 12_000), (3_000, 6_000))
    }
}

/// The first fault waits this long for the cluster to settle under load.
pub const WARMUP_MS: u64 = 5_000;

/// The quiet stretch at the end of the workload, in which no fault runs: long enough for
/// progress to be judged against the recovery bound.
pub fn quiet_ms(run_ms: u64, recovery_bound_ms: u64) -> u64 {
    (run_ms / 4).clamp(10_000, 30_000).max(recovery_bound_ms + 2_000)
}

/// Offset of the clock timeline's first window from the other timeline's, so their windows
/// start apart and overlap partly.
const CLOCK_TIMELINE_DELAY_MS: u64 = 2_000;

pub fn plan(options: &PlanOptions) -> Vec<Window> {
    if options.kinds.is_empty() || options.nodes == 0 {
        return Vec::new();
    }
    let clock_apart = options.kinds.len() > 1 && options.kinds.iter().any(|k| k == "clock");
    if !clock_apart {
        return timeline(options, &options.kinds, Rng::new(options.seed).fork(0x4e454d), WARMUP_MS);
    }
    let others: Vec<String> = options.kinds.iter().filter(|k| *k != "clock").cloned().collect();
    let mut windows = timeline(options, &others, Rng::new(options.seed).fork(0x4e454d), WARMUP_MS);
    let clock_rng = Rng::new(options.seed).fork(0x434c4f);
    windows.extend(timeline(options, &["clock".to_string()], clock_rng, WARMUP_MS + CLOCK_TIMELINE_DELAY_MS));
    windows.sort_by_key(|w| w.start_ms);
    windows
}

/// Whether a window belongs to the clock timeline (which may overlap the other one).
pub fn on_clock_timeline(window: &Window) -> bool {
    matches!(window.fault, Fault::Clock { .. })
}

/// One timeline: windows of the given kinds, one after another from `first_ms`.
fn timeline(options: &PlanOptions, kinds: &[String], mut rng: Rng, first_ms: u64) -> Vec<Window> {
    let ((fault_min, fault_max), (gap_min, gap_max)) = durations(options.run_ms);
    let last_end = options.run_ms.saturating_sub(quiet_ms(options.run_ms, options.recovery_bound_ms));
    let mut windows = Vec::new();
    let mut at = first_ms;
    loop {
        let length = rng.between(fault_min, fault_max);
        if at + length > last_end {
            break;
        }
        let kind = rng.pick(kinds).cloned().unwrap_or_default();
        let fault = fault_of(&kind, options, &mut rng);
        windows.push(Window { start_ms: at, end_ms: at + length, fault });
        at += length + rng.between(gap_min, gap_max);
    }
    windows
}

fn fault_of(kind: &str, options: &PlanOptions, rng: &mut Rng) -> Fault {
    let n = options.nodes;
    let one = |rng: &mut Rng| rng.between(1, u64::from(n)) as u8;
    match kind {
        "kill" => match rng.between(0, 2) {
            0 => Fault::Kill { nodes: vec![one(rng)] },
            1 => Fault::KillBusiestLeader,
            _ => {
                let mut all: Vec<u8> = (1..=n).collect();
                rng.shuffle(&mut all);
                all.truncate(usize::from(n / 2 + 1));
                all.sort();
                Fault::Kill { nodes: all }
            }
        },
        "pause" => {
            if rng.chance(50) {
                Fault::Pause { nodes: vec![one(rng)] }
            } else {
                Fault::PauseBusiestLeader
            }
        }
        "partition" => {
            let shape = *rng.pick(&["halves", "isolate", "bridge", "one-way"]).unwrap_or(&"halves");
            Fault::Partition { shape: shape.into(), blocked: grudge(shape, n, rng) }
        }
        "clock" => {
            let max = options.clock_offset_max_ms.max(1) as i64;
            let magnitude = rng.between(max as u64 / 4, max as u64) as i64;
            let offset_ms = if rng.chance(50) { magnitude } else { -magnitude };
            Fault::Clock { node: one(rng), offset_ms }
        }
        _ => {
            let mode =
                *rng.pick(&[TornMode::Garbage, TornMode::LastRecord, TornMode::Cut]).unwrap_or(&TornMode::Garbage);
            Fault::Torn { node: one(rng), mode }
        }
    }
}

/// The directed pairs (from, to) whose packets a partition shape drops.
pub fn grudge(shape: &str, n: u8, rng: &mut Rng) -> Vec<(u8, u8)> {
    let mut nodes: Vec<u8> = (1..=n).collect();
    rng.shuffle(&mut nodes);
    let both_ways = |a: &[u8], b: &[u8]| {
        let mut pairs = Vec::new();
        for &x in a {
            for &y in b {
                pairs.push((x, y));
                pairs.push((y, x));
            }
        }
        pairs
    };
    let mut pairs = match shape {
        // A minority and a majority (for 3 or 5 nodes the halves are unequal).
        "halves" => {
            let (minority, majority) = nodes.split_at(usize::from(n / 2));
            both_ways(minority, majority)
        }
        "isolate" => both_ways(&nodes[..1], &nodes[1..]),
        // Two sides that cannot talk, and one node that talks to both (Jepsen's bridge).
        "bridge" => {
            let rest = &nodes[1..];
            let (left, right) = rest.split_at(rest.len() / 2);
            both_ways(left, right)
        }
        // One node hears nobody, but everybody hears it.
        _ => nodes[1..].iter().map(|&other| (other, nodes[0])).collect(),
    };
    pairs.sort();
    pairs.dedup();
    pairs
}

/// The largest forward clock offset of a plan (the early margin it needs).
pub fn forward_offset_max_ms(windows: &[Window]) -> u64 {
    windows
        .iter()
        .filter_map(|w| match w.fault {
            Fault::Clock { offset_ms, .. } if offset_ms > 0 => Some(offset_ms as u64),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// The largest clock offset of a plan either way.
pub fn offset_abs_max_ms(windows: &[Window]) -> u64 {
    windows
        .iter()
        .filter_map(|w| match w.fault {
            Fault::Clock { offset_ms, .. } => Some(offset_ms.unsigned_abs()),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Parses `--nemesis` (a comma-separated list; `none` or empty for no faults).
pub fn parse_kinds(list: &str) -> Result<Vec<String>, String> {
    let mut kinds = Vec::new();
    for kind in list.split(',').map(str::trim).filter(|k| !k.is_empty() && *k != "none") {
        if !KINDS.contains(&kind) {
            return Err(format!("--nemesis: {kind:?} is not one of {}", KINDS.join(", ")));
        }
        if !kinds.iter().any(|k| k == kind) {
            kinds.push(kind.to_string());
        }
    }
    Ok(kinds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(kinds: &[&str], run_ms: u64) -> PlanOptions {
        PlanOptions {
            seed: 9,
            kinds: kinds.iter().map(|k| k.to_string()).collect(),
            nodes: 5,
            run_ms,
            clock_offset_max_ms: 2_000,
            recovery_bound_ms: 10_000,
        }
    }

    #[test]
    fn a_plan_replays_from_its_seed_and_leaves_a_quiet_end() {
        let run = options(&["kill", "partition", "pause", "clock", "torn"], 600_000);
        let windows = plan(&run);
        assert_eq!(windows, plan(&run));
        assert_ne!(windows, plan(&PlanOptions { seed: 10, ..run.clone() }));
        assert!(windows.len() >= 20, "{}", windows.len());
        assert!(windows[0].start_ms >= WARMUP_MS);
        // Each timeline's windows follow one another; clock windows overlap the others.
        let (clock, others): (Vec<&Window>, Vec<&Window>) = windows.iter().partition(|w| on_clock_timeline(w));
        for timeline in [&clock, &others] {
            for pair in timeline.windows(2) {
                assert!(pair[0].end_ms < pair[1].start_ms, "a timeline's windows never overlap");
            }
        }
        let overlapping =
            clock.iter().filter(|c| others.iter().any(|o| o.start_ms < c.end_ms && c.start_ms < o.end_ms)).count();
        assert!(overlapping > 0, "some clock faults coincide with other faults");
        // Clock alone stays one timeline.
        let alone = plan(&options(&["clock"], 600_000));
        assert!(alone.windows(2).all(|pair| pair[0].end_ms < pair[1].start_ms));
        assert!(windows.last().unwrap().end_ms <= 600_000 - quiet_ms(600_000, 10_000));
        assert_eq!(quiet_ms(40_000, 20_000), 22_000, "the quiet end outlasts the recovery bound");
        let drawn: std::collections::BTreeSet<&str> = windows
            .iter()
            .map(|w| match w.fault {
                Fault::Kill { .. } | Fault::KillBusiestLeader => "kill",
                Fault::Pause { .. } | Fault::PauseBusiestLeader => "pause",
                Fault::Partition { .. } => "partition",
                Fault::Clock { .. } => "clock",
                Fault::Torn { .. } => "torn",
            })
            .collect();
        assert_eq!(drawn.len(), 5, "every kind asked for is drawn: {drawn:?}");
        // A 40 s smoke still gets faults; a plan without kinds has none.
        assert!(plan(&options(&["kill", "partition"], 40_000)).len() >= 2);
        assert!(plan(&options(&[], 40_000)).is_empty());
    }

    #[test]
    fn grudges_cut_what_their_shape_says() {
        let mut rng = Rng::new(1);
        let halves = grudge("halves", 5, &mut rng);
        // 2 × 3 nodes, both ways.
        assert_eq!(halves.len(), 12);
        let isolate = grudge("isolate", 5, &mut rng);
        assert_eq!(isolate.len(), 8);
        let mut per_node = [0; 6];
        for &(a, b) in &isolate {
            per_node[usize::from(a)] += 1;
            per_node[usize::from(b)] += 1;
        }
        assert_eq!(per_node.iter().filter(|&&count| count == 8).count(), 1, "one node cut from all four others");
        let bridge = grudge("bridge", 5, &mut rng);
        let touched: std::collections::BTreeSet<u8> = bridge.iter().flat_map(|&(a, b)| [a, b]).collect();
        assert_eq!((bridge.len(), touched.len()), (8, 4), "the bridge node is in no pair");
        let one_way = grudge("one-way", 3, &mut rng);
        assert_eq!(one_way.len(), 2);
        assert_eq!(one_way[0].1, one_way[1].1, "one node stops hearing the others");
        assert!(!one_way.iter().any(|&(from, to)| one_way.contains(&(to, from))), "only one direction");
    }

    #[test]
    fn nemesis_lists_name_the_bad_kind() {
        assert_eq!(parse_kinds("kill, partition,kill").unwrap(), ["kill", "partition"]);
        assert!(parse_kinds("none").unwrap().is_empty());
        let error = parse_kinds("kill,flood").unwrap_err();
        assert!(error.contains("\"flood\"") && error.contains("--nemesis"), "{error}");
    }

    #[test]
    fn the_early_margin_is_the_largest_forward_offset() {
        let window = |offset_ms| Window { start_ms: 0, end_ms: 1, fault: Fault::Clock { node: 1, offset_ms } };
        assert_eq!(forward_offset_max_ms(&[window(-5_000), window(1_500), window(800)]), 1_500);
        assert_eq!(forward_offset_max_ms(&[window(-5_000)]), 0);
        assert_eq!(offset_abs_max_ms(&[window(-5_000), window(1_500)]), 5_000);
    }
}
