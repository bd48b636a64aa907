//! The timing wheel against a BTreeMap model: random inserts (from 0 ms to past the horizon),
//! cancels and advances (from 1 ms to years) must fire exactly the timers the model says, in
//! deadline order, and `next_wakeup_ms` must never be later than the model's next deadline.

use proptest::prelude::*;
use std::collections::BTreeMap;
use sundial_engine::wheel::{Expired, TimerHandle, TimingWheel};

#[derive(Clone, Debug)]
enum Op {
    Insert { ahead_ms: u64 },
    Cancel { pick: usize },
    Advance { by_ms: u64 },
    AdvanceToWakeup,
}

/// Distances at every scale: same millisecond, one slot, across levels, past the 2^36 horizon.
fn distance() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..4, 0u64..64, 0u64..5_000, 0u64..300_000, 0u64..(1 << 30), (1u64 << 35)..(1u64 << 38),]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => distance().prop_map(|ahead_ms| Op::Insert { ahead_ms }),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        2 => distance().prop_map(|by_ms| Op::Advance { by_ms }),
        1 => Just(Op::AdvanceToWakeup),
    ]
}

struct Model {
    /// (deadline, id) of pending timers.
    pending: BTreeMap<(u64, u64), TimerHandle>,
    now_ms: u64,
}

fn check_advance(wheel: &mut TimingWheel<u64>, model: &mut Model, to_ms: u64) -> Result<(), TestCaseError> {
    let mut expired: Vec<Expired<u64>> = Vec::new();
    wheel.advance_to(to_ms, &mut expired);
    // Progress: once advanced, the next wake-up is strictly later (no busy loop).
    if let Some(wakeup_ms) = wheel.next_wakeup_ms() {
        prop_assert!(
            wakeup_ms > to_ms || to_ms == u64::MAX,
            "woke at {} right after advancing to {}",
            wakeup_ms,
            to_ms
        );
    }
    model.now_ms = model.now_ms.max(to_ms);
    let due: Vec<(u64, u64)> = model.pending.range(..=(model.now_ms, u64::MAX)).map(|(&key, _)| key).collect();
    for key in &due {
        model.pending.remove(key);
    }
    let fired: Vec<(u64, u64)> = expired.iter().map(|e| (e.deadline_ms, e.value)).collect();
    prop_assert!(fired.windows(2).all(|w| w[0].0 <= w[1].0), "fired out of deadline order: {:?}", fired);
    let mut fired_sorted = fired.clone();
    fired_sorted.sort_unstable();
    prop_assert_eq!(fired_sorted, due, "at {} ms", model.now_ms);
    prop_assert_eq!(wheel.len(), model.pending.len());
    prop_assert_eq!(wheel.now_ms(), model.now_ms);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_wheel_fires_exactly_what_the_model_says(
        start_ms in prop_oneof![Just(0u64), 0u64..(1 << 40)],
        sweep_after in 0usize..8,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let mut wheel = TimingWheel::new(start_ms, 10_000);
        wheel.set_tombstones_before_sweep_min(sweep_after);
        let mut model = Model { pending: BTreeMap::new(), now_ms: start_ms };
        let mut next_id = 0u64;
        for op in ops {
            match op {
                Op::Insert { ahead_ms } => {
                    let deadline_ms = model.now_ms.saturating_add(ahead_ms);
                    let handle = wheel.insert(deadline_ms, next_id).expect("room");
                    model.pending.insert((deadline_ms, next_id), handle);
                    next_id += 1;
                }
                Op::Cancel { pick } => {
                    if model.pending.is_empty() {
                        continue;
                    }
                    let key = *model.pending.keys().nth(pick % model.pending.len()).expect("in range");
                    let handle = model.pending.remove(&key).expect("present");
                    prop_assert!(wheel.cancel(handle));
                    prop_assert!(!wheel.cancel(handle));
                }
                Op::Advance { by_ms } => {
                    let to_ms = model.now_ms.saturating_add(by_ms);
                    check_advance(&mut wheel, &mut model, to_ms)?;
                }
                Op::AdvanceToWakeup => {
                    match wheel.next_wakeup_ms() {
                        None => prop_assert!(model.pending.is_empty()),
                        Some(wakeup_ms) => {
                            let (&(next_deadline, _), _) = model.pending.first_key_value().expect("not empty");
                            prop_assert!(wakeup_ms <= next_deadline.max(model.now_ms), "woke at {} after the deadline {}", wakeup_ms, next_deadline);
                            // Just before the wake-up nothing is due.
                            if wakeup_ms > model.now_ms {
                                check_advance(&mut wheel, &mut model, wakeup_ms - 1)?;
                            }
                            check_advance(&mut wheel, &mut model, wakeup_ms)?;
                        }
                    }
                }
            }
        }
        check_advance(&mut wheel, &mut model, u64::MAX)?;
        prop_assert!(wheel.is_empty());
    }
}

#[derive(Clone, Debug)]
enum KeyedOp {
    Set { key: u32, ahead_ms: u64 },
    Unset { key: u32 },
    Advance { by_ms: u64 },
}

fn keyed_op() -> impl Strategy<Value = KeyedOp> {
    prop_oneof![
        4 => (0u32..40, distance()).prop_map(|(key, ahead_ms)| KeyedOp::Set { key, ahead_ms }),
        1 => (0u32..40).prop_map(|key| KeyedOp::Unset { key }),
        2 => distance().prop_map(|by_ms| KeyedOp::Advance { by_ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A keyed wheel holds one timer per key: setting a key again moves its timer, and every
    /// key fires once, at its last deadline set, never before.
    #[test]
    fn a_keyed_wheel_fires_each_key_once_at_its_last_deadline(
        start_ms in prop_oneof![Just(0u64), 0u64..(1 << 40)],
        sweep_after in 0usize..8,
        ops in prop::collection::vec(keyed_op(), 1..300),
    ) {
        let mut wheel: TimingWheel<u32> = TimingWheel::keyed(start_ms, 10_000);
        wheel.set_tombstones_before_sweep_min(sweep_after);
        let mut model: BTreeMap<u32, u64> = BTreeMap::new();
        let mut now_ms = start_ms;
        let advance = |wheel: &mut TimingWheel<u32>, model: &mut BTreeMap<u32, u64>, to_ms: u64| {
            let mut expired = Vec::new();
            wheel.advance_to(to_ms, &mut expired);
            let mut fired: Vec<(u32, u64)> = expired.iter().map(|e| (e.value, e.deadline_ms)).collect();
            let due: Vec<(u32, u64)> = model.iter().filter(|(_, &at)| at <= to_ms).map(|(&k, &at)| (k, at)).collect();
            model.retain(|_, at| *at > to_ms);
            fired.sort_unstable();
            (fired, due)
        };
        for op in ops {
            match op {
                KeyedOp::Set { key, ahead_ms } => {
                    let at_ms = now_ms.saturating_add(ahead_ms);
                    wheel.set(key, at_ms, key).expect("room");
                    model.insert(key, at_ms);
                }
                KeyedOp::Unset { key } => {
                    prop_assert_eq!(wheel.unset(key), model.remove(&key).is_some());
                }
                KeyedOp::Advance { by_ms } => {
                    now_ms = now_ms.saturating_add(by_ms);
                    let (fired, due) = advance(&mut wheel, &mut model, now_ms);
                    prop_assert_eq!(fired, due, "at {} ms", now_ms);
                }
            }
            prop_assert_eq!(wheel.len(), model.len());
            for (&key, &at_ms) in &model {
                prop_assert_eq!(wheel.deadline_of(key), Some(at_ms));
            }
        }
        let (fired, due) = advance(&mut wheel, &mut model, u64::MAX);
        prop_assert_eq!(fired, due);
        prop_assert!(wheel.is_empty());
    }
}

/// The checker itself catches a wrong wheel: a timer fired early is reported.
#[test]
fn the_model_check_catches_an_early_fire() {
    let mut wheel = TimingWheel::new(0, 10);
    let handle = wheel.insert(100, 7).expect("room");
    // The model believes the deadline is 101: the wheel firing at 100 is a mismatch.
    let mut model = Model { pending: BTreeMap::from([((101, 7), handle)]), now_ms: 0 };
    assert!(check_advance(&mut wheel, &mut model, 100).is_err());
}
