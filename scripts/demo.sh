#!/usr/bin/env bash
# Runs Portico on its demo config (config/demo.yaml): builds the release binary and
# runs the gateway in the foreground. The gateway's embedded orchestrator starts the
# demo backends itself; Ctrl-C stops the gateway and its replicas.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin portico
cat <<'MSG'
Portico demo: gateway on http://127.0.0.1:8080, admin API on http://127.0.0.1:9901
Try (see README.md for the walk-through):
  curl -s localhost:8080/users/7
  curl -s localhost:8080/catalog/items                      # 90% v1, 10% v2
  curl -s -H 'x-version: v2' localhost:8080/catalog/items   # always v2
  curl -s localhost:9901/orchestrator/deployments
MSG
exec ./target/release/portico run -c config/demo.yaml
