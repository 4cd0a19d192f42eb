#!/usr/bin/env bash
# Installs what building and testing Portico needs on a fresh Debian machine that has
# only the Rust toolchain, gcc, python3 and git: cmake (Pingora's zlib-ng), pkg-config
# and the OpenSSL headers (Pingora's TLS), curl, protoc, the test peers (h2load, dnsmasq,
# redis-server, etcd) and pytest for the end-to-end suite.
# Safe to run again: it installs only what is missing.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# end-to-end test peers: h2load (HTTP/2 load), dnsmasq (DNS/SRV discovery)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v dnsmasq >/dev/null 2>&1 || need+=(dnsmasq-base)
# shared state for replicated gateways: real Redis and etcd servers; protoc builds the
# etcd client's gRPC stubs
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
for extra in "$@"; do
  case "$extra" in
    bench) for p in nginx-light:nginx haproxy:haproxy wrk:wrk nghttp2-client:h2load; do
             command -v "${p#*:}" >/dev/null 2>&1 || need+=("${p%%:*}"); done ;;
  esac
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! python3 -c 'import pytest, brotli, zstandard, grpc, websockets' >/dev/null 2>&1; then
  echo "setup: installing pytest, brotli, zstandard, grpcio, websockets (for the end-to-end tests)" >&2
  python3 -m pip install -q pytest brotli zstandard grpcio websockets >/dev/null
fi
