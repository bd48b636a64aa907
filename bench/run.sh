#!/usr/bin/env bash
# Sundial's macro benchmark: builds release binaries, then bench/macro.py measures the
# references and runs every sundial-loadgen scenario on a 1-node cluster and the ingest,
# fire and overload scenarios on a 3-node cluster (counting its elections),
# writing bench/results/<date>/RESULTS.md. Arguments go to bench/macro.py (--seconds, --out,
# --skip-cluster). Takes about 12 minutes with the defaults on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p sundial-node -p sundial-loadgen
exec python3 bench/macro.py "$@"
