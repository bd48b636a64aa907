#!/usr/bin/env bash
# Sundial's criterion micro-benchmarks, all four in one go: the log (sundial-wal), the timing
# wheel against BinaryHeap and BTreeMap, a create through the state machine (sundial-engine)
# and the binary protocol's codec (sundial-net). Criterion keeps its reports in
# target/criterion/. Arguments go to criterion (e.g. --warm-up-time 1 --measurement-time 3).
# Takes about 10 minutes with criterion's defaults on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --locked -p sundial-wal -- "$@"
SUNDIAL_WHEEL_SIZES="${SUNDIAL_WHEEL_SIZES:-1000,100000,1000000}" cargo bench --locked -p sundial-engine --bench wheel -- "$@"
cargo bench --locked -p sundial-engine --bench apply -- "$@"
cargo bench --locked -p sundial-net --bench codec -- "$@"
