#!/usr/bin/env bash
# Runs Portico on its demo config (config/demo.yaml) with working backends: it builds
# the release binary, starts `portico demo-backend` services on loopback, then the
# gateway in the foreground. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin portico
bin=target/release/portico
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
start() { "$bin" demo-backend --name "$1" --port "$2" >/dev/null 2>&1 & pids+=($!); }
start users 9001
start users 9002
start orders 9011
start orders 9012
start catalog-v1 9021
start catalog-v2 9022
sleep 0.5
cat <<'MSG'
Portico demo: gateway on http://127.0.0.1:8080, admin on http://127.0.0.1:9901
  curl -s localhost:8080/users/7
  curl -s localhost:8080/catalog/items                      # 90% v1, 10% v2
  curl -s -H 'x-version: v2' localhost:8080/catalog/items   # always v2
  curl -s localhost:8080/ping
  curl -s localhost:9901/upstreams
  ./target/release/portico routes -c config/demo.yaml GET http://localhost/users/7
MSG
"$bin" run -c config/demo.yaml
