#!/usr/bin/env bash
# The whole test suite: unit tests of every crate, then the end-to-end suite, which
# runs the real `portico` binary against real backends with real clients.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins
cargo test --workspace
python3 -m pytest tests/e2e -q -p no:cacheprovider "$@"
