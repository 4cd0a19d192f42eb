#!/usr/bin/env bash
# bench/run.sh — Portico vs bare Pingora vs nginx vs HAProxy, on loopback.
#
# One fast backend (nginx, core 1) and, one at a time, each proxy in front of
# it (core 0); the load generators run on core 1. For each proxy it measures
#   (a) requests/s at saturation (wrk, closed loop),
#   (b) CPU µs per request and p50/p99 latency at fixed open-loop rates
#       (bench/loadgen, coordinated-omission corrected),
#   (c) memory per idle keep-alive client connection (VmRSS delta / N).
# and prints one markdown table (medians, ratios vs nginx); raw results go to
# bench/out/ (gitignored). See bench/README.md.
#
# Usage: bench/run.sh [--quick] [--repeat N] [--only LIST] [--no-install]
#                     [--no-build] [--quiet-wait SECS]
#   --quick         smoke run, a few seconds per test (CI)
#   --repeat N      run every proxy N times (order rotated each time); report
#                   medians and min–max
#   --only LIST     comma-separated subset of: nginx,haproxy,bare-pingora,portico
#   --no-install    never call apt-get (fail if a tool is missing)
#   --no-build      use the binaries already built
#   --quiet-wait S  before each proxy, wait up to S seconds until no build
#                   (cargo, rustc, …) runs and the box is < 15 % busy; tests
#                   disturbed by other load are flagged "contended" and run
#                   again (default 900, 0 with --quick)
# Environment overrides: BENCH_SAT_SECS, BENCH_RATE_SECS, BENCH_WARMUP_SECS,
#   BENCH_RATES ("5000 15000"), BENCH_CONNS (50), BENCH_IDLE_CONNS (5000),
#   BENCH_WORK (work dir, default /tmp/portico-bench), BENCH_KEEP_WORK=1,
#   BENCH_NGINX_ACCESS_LOG=off, BENCH_PORTICO_BIN (default target/release/portico),
#   BENCH_RETRIES (1), BENCH_FOREIGN_MAX (0.05).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=$BENCH/out

QUICK=0
REPEAT=1
ONLY="nginx,haproxy,bare-pingora,portico"
DO_INSTALL=1
DO_BUILD=1
QUIET_WAIT=""

die() { echo "run.sh: $*" >&2; exit 1; }
log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
HZ=$(getconf CLK_TCK)

while (($#)); do
    case "$1" in
        --quick) QUICK=1 ;;
        --repeat) REPEAT=${2:?--repeat needs N}; shift ;;
        --only) ONLY=${2:?--only needs a list}; shift ;;
        --no-install) DO_INSTALL=0 ;;
        --no-build) DO_BUILD=0 ;;
        --quiet-wait) QUIET_WAIT=${2:?--quiet-wait needs seconds}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "--repeat needs a positive integer"

if ((QUICK)); then
    SAT_SECS=${BENCH_SAT_SECS:-3}
    RATE_SECS=${BENCH_RATE_SECS:-3}
    WARMUP_SECS=${BENCH_WARMUP_SECS:-1}
    IDLE_CONNS=${BENCH_IDLE_CONNS:-1000}
    QUIET_WAIT=${QUIET_WAIT:-0}
else
    SAT_SECS=${BENCH_SAT_SECS:-10}
    RATE_SECS=${BENCH_RATE_SECS:-10}
    WARMUP_SECS=${BENCH_WARMUP_SECS:-2}
    IDLE_CONNS=${BENCH_IDLE_CONNS:-5000}
    QUIET_WAIT=${QUIET_WAIT:-900}
fi
RATES=${BENCH_RATES:-"5000 15000"}
read -r -a RATES_ARR <<<"$RATES"
CONNS=${BENCH_CONNS:-50}
WORK=${BENCH_WORK:-/tmp/portico-bench}

# Cores: proxies on 0; backend and load generators on 1.
PROXY_CORE=0
LOAD_CORE=1

# Ports (the Portico ones are also written in bench/portico-bench.yaml).
BACKEND_PORT=27000
PORTICO_PORT=27080
PORTICO_ADMIN_PORT=27901
BARE_PORT=27081
NGINX_PORT=27082
HAPROXY_PORT=27083

BODY='portico bench backend: a fixed 100-byte body so every proxy moves the same bytes xxxxxxxxxxxxxxxxxx'

LOADGEN=$BENCH/loadgen/target/release/loadgen
BARE_BIN=$ROOT/target/release/bare-pingora
PORTICO_BIN=${BENCH_PORTICO_BIN:-$ROOT/target/release/portico}
PY=python3

# ------------------------------------------------------------------ install

install_deps() {
    local missing=()
    command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
    command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v ss >/dev/null 2>&1 || missing+=(iproute2)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    ((${#missing[@]})) || return 0
    ((DO_INSTALL)) || die "missing tools (packages ${missing[*]}) and --no-install given"
    [[ $(id -u) == 0 ]] || die "missing packages ${missing[*]}; run as root or install them"
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# ------------------------------------------------------------------ build

build() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found"
    log "building portico and bare-pingora (release; the first build takes a while)"
    if ! (cd "$ROOT" && cargo build --release --keep-going -p portico -p bare-pingora); then
        log "warning: the release build failed for at least one package; whatever was built is used"
    fi
    log "building the load generator"
    cargo build --release --quiet --manifest-path "$BENCH/loadgen/Cargo.toml"
}

# ------------------------------------------------------------------ process helpers

STARTED=()          # every PID this script started (killed on exit)

cleanup() {
    local p
    for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${STARTED[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    if [[ -z ${BENCH_KEEP_WORK:-} && -d $WORK && $WORK == /tmp/* ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_bg CORE LOGFILE CMD... — start pinned in the background; sets BG_PID.
start_bg() {
    local core=$1 logf=$2
    shift 2
    taskset -c "$core" "$@" >"$logf" 2>&1 &
    BG_PID=$!
    STARTED+=("$BG_PID")
}

# stop PID SIGNAL — signal, wait up to 10 s, then SIGKILL.
stop() {
    local pid=$1 sig=${2:-TERM} i
    kill -"$sig" "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local keep=() q
    for q in "${STARTED[@]}"; do [[ $q == "$pid" ]] || keep+=("$q"); done
    STARTED=("${keep[@]}")
}

# The PID and its children (nginx: master + worker).
pid_tree() {
    local pid=$1
    echo "$pid"
    pgrep -P "$pid" || true
}

port_free() { ! ss -Hltn "sport = :$1" | grep -q .; }

# wait_serving PORT PID — up to 20 s for the proxy to answer with the backend's body.
wait_serving() {
    local port=$1 pid=$2 i body
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        body=$(curl -s --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null || true)
        [[ $body == "$BODY" ]] && return 0
        sleep 0.1
    done
    return 1
}

# utime+stime ticks summed over PIDs (all threads).
proc_ticks() {
    local total=0 p s f
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        read -r -a f <<<"$s"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# "IDLE WALL" of one CPU: its idle+iowait time from /proc/stat in clock ticks
# (exact with NO_HZ; the busy fields are only sampled at timer ticks, which a
# load paced by 1 ms timers skews) and the wall clock in seconds.
core_snap() {
    local idle
    idle=$(awk -v c="cpu$1" '$1 == c { print $5 + $6 }' /proc/stat)
    echo "$idle $(date +%s.%N)"
}

# core_busy "SNAP_BEFORE" "SNAP_AFTER" — busy fraction of that CPU in between.
core_busy() {
    awk -v a="$1" -v b="$2" -v hz="$HZ" 'BEGIN {
        split(a, x, " "); split(b, y, " "); w = y[2] - x[2]; f = 0
        if (w > 0) f = 1 - (y[1] - x[1]) / hz / w
        if (f < 0) f = 0
        printf "%.3f\n", f }'
}

# A build or test run on the shared box: cargo and the compilers it drives.
BUILD_PROCS='cargo|rustc|clippy-driver|rustdoc|cc1|cc1plus|collect2|ld|ld.lld|ld.gold'
rustc_running() { grep -qsxE "$BUILD_PROCS" /proc/[0-9]*/comm; }

# Busy share of both cores over one second, in percent (nothing of ours runs
# when this is called, apart from the idle backend).
machine_busy_pct() {
    local a b
    a=$(awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
    sleep 1
    b=$(awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); d = y[2] - x[2]; p = 0; if (d > 0) p = 100 * (y[1] - x[1]) / d; printf "%d\n", p }'
}

# Before each proxy: wait (up to QUIET_WAIT s) until no build runs and the
# machine is nearly idle (< 15 % busy over a second).
wait_quiet() {
    local waited=0 busy=0 said=0
    while ((waited < QUIET_WAIT)); do
        if rustc_running; then
            ((said)) || log "a build is running on this box ($(grep -hsxE "$BUILD_PROCS" /proc/[0-9]*/comm | sort -u | tr '\n' ' ')); waiting up to ${QUIET_WAIT}s"
            said=1
            sleep 4
            waited=$((waited + 5))
            continue
        fi
        busy=$(machine_busy_pct)
        ((busy < 15)) && return 0
        ((said)) || log "the machine is ${busy}% busy with something else; waiting up to ${QUIET_WAIT}s"
        said=1
        sleep 4
        waited=$((waited + 5))
    done
    if rustc_running; then log "warning: measuring while a build runs; results flagged contended"; fi
}

# ------------------------------------------------------------------ proxies

# start_proxy NAME — start it pinned to the proxy core; sets PROXY_PID, PROXY_PORT, STOP_SIG.
start_proxy() {
    local name=$1
    case "$name" in
        nginx)
            PROXY_PORT=$NGINX_PORT
            STOP_SIG=TERM
            start_bg "$PROXY_CORE" "$WORK/proxy-nginx.out" nginx -c "$WORK/proxy-nginx.conf" -p "$WORK"
            ;;
        haproxy)
            PROXY_PORT=$HAPROXY_PORT
            STOP_SIG=TERM
            start_bg "$PROXY_CORE" "$WORK/proxy-haproxy.out" haproxy -db -f "$WORK/proxy-haproxy.cfg"
            ;;
        bare-pingora)
            PROXY_PORT=$BARE_PORT
            STOP_SIG=INT
            start_bg "$PROXY_CORE" "$WORK/proxy-bare-pingora.out" "$BARE_BIN" \
                --listen "127.0.0.1:$BARE_PORT" --upstream "127.0.0.1:$BACKEND_PORT"
            ;;
        portico)
            PROXY_PORT=$PORTICO_PORT
            STOP_SIG=INT
            start_bg "$PROXY_CORE" "$WORK/proxy-portico.out" "$PORTICO_BIN" run -c "$WORK/portico-bench.yaml"
            ;;
    esac
    PROXY_PID=$BG_PID
}

proxy_available() {
    case "$1" in
        bare-pingora) [[ -x $BARE_BIN ]] ;;
        portico) [[ -x $PORTICO_BIN ]] ;;
        *) true ;;
    esac
}

# ------------------------------------------------------------------ tests

RESULTS=""        # the JSONL file
LAST_CONTENDED=0  # set by each test
RETRIES=${BENCH_RETRIES:-1}
# Other processes' share of a core above which a test counts as contended.
FOREIGN_MAX=${BENCH_FOREIGN_MAX:-0.05}

# record JSON — append one measurement; sets LAST_CONTENDED from it.
record() {
    echo "$1" >>"$RESULTS"
    if [[ $1 == *'"contended": true'* || $1 == *'"contended":true'* ]]; then LAST_CONTENDED=1; else LAST_CONTENDED=0; fi
}

# A sampler (on the load core, twice a second) that notes whether a build ran
# at any moment of a test.
monitor_start() {
    rm -f "$WORK/contended"
    taskset -c "$LOAD_CORE" bash -c "while :; do grep -qsxE '$BUILD_PROCS' /proc/[0-9]*/comm && touch '$WORK/contended'; sleep 0.5; done" &
    MONITOR_PID=$!
    STARTED+=("$MONITOR_PID")
}

monitor_stop() { stop "$MONITOR_PID" TERM; }

# context NAME REP TEST FOREIGN0 FOREIGN1 — JSON fragment common to every
# record (runs in a subshell). FOREIGNn: share of core n used by processes
# other than ours during the test ("null" when not measured).
context() {
    local build=false contended=false
    if [[ -e $WORK/contended ]] || rustc_running; then build=true; fi
    contended=$(awk -v b="$build" -v f0="$4" -v f1="$5" -v m="$FOREIGN_MAX" 'BEGIN {
        c = (b == "true") || (f0 != "null" && f0 > m) || (f1 != "null" && f1 > 2 * m)
        print c ? "true" : "false" }')
    printf '{"proxy":"%s","repeat":%d,"test":"%s","contended":%s,"build_running":%s,"foreign_core0":%s,"foreign_core1":%s,"loadavg":"%s"}' \
        "$1" "$2" "$3" "$contended" "$build" "$4" "$5" "$(cut -d' ' -f1-3 /proc/loadavg)"
}

# ticks_to_util TICKS SECONDS
ticks_util() { awk -v t="$1" -v s="$2" -v hz="$HZ" 'BEGIN { printf "%.3f\n", (s > 0) ? t / hz / s : 0 }'; }
# foreign BUSY USED... — busy minus our processes' use, floored at 0.
foreign() { awk -v b="$1" -v u="${*:2}" 'BEGIN { n = split(u, x, " "); for (i = 1; i <= n; i++) b -= x[i]; printf "%.3f\n", (b > 0) ? b : 0 }'; }
secs_between() { awk -v a="$1" -v b="$2" 'BEGIN { print b - a }'; }

test_idle() {
    local name=$1 rep=$2 pids out p
    mapfile -t pids < <(pid_tree "$PROXY_PID")
    monitor_start
    local args=()
    for p in "${pids[@]}"; do args+=(--pid "$p"); done
    log "$name: memory with $IDLE_CONNS idle keep-alive connections"
    out=$(taskset -c "$LOAD_CORE" timeout -k 5 180 "$LOADGEN" idle --url "http://127.0.0.1:$PROXY_PORT/" \
        -n "$IDLE_CONNS" --parallel 100 --settle 1 --timeout 5 "${args[@]}") || {
        monitor_stop
        log "$name: idle test failed"
        return 0
    }
    monitor_stop
    record "$(echo "$out" | $PY "$BENCH/summarize.py" merge "$(context "$name" "$rep" idle null null)")"
    log "$name: $(echo "$out" | grep -o '"established":[0-9]*,\|"closed_by_server":[0-9]*,\|"bytes_per_conn":[^}]*' | tr -d '\n')"
}

test_saturation() {
    local name=$1 rep=$2 pids
    local url="http://127.0.0.1:$PROXY_PORT/" wrkout="$WORK/wrk-$1-$2.txt"
    mapfile -t pids < <(pid_tree "$PROXY_PID")
    monitor_start
    log "$name: saturation, wrk -t1 -c$CONNS -d${SAT_SECS}s"
    taskset -c "$LOAD_CORE" timeout -k 5 30 wrk -t1 -c"$CONNS" -d1s "$url" >/dev/null 2>&1 || true
    local ticks0 ticks1 bticks0 bticks1 c0a c0b c1a c1b
    ticks0=$(proc_ticks "${pids[@]}")
    bticks0=$(proc_ticks "${BACKEND_PIDS[@]}")
    c0a=$(core_snap "$PROXY_CORE")
    c1a=$(core_snap "$LOAD_CORE")
    taskset -c "$LOAD_CORE" timeout -k 5 $((SAT_SECS + 30)) wrk -t1 -c"$CONNS" -d"${SAT_SECS}s" --latency "$url" >"$wrkout" 2>&1 || true
    ticks1=$(proc_ticks "${pids[@]}")
    bticks1=$(proc_ticks "${BACKEND_PIDS[@]}")
    c0b=$(core_snap "$PROXY_CORE")
    c1b=$(core_snap "$LOAD_CORE")
    monitor_stop
    local secs core0 core1 putil f0 extra parsed
    secs=$(secs_between "${c0a#* }" "${c0b#* }")
    core0=$(core_busy "$c0a" "$c0b")
    core1=$(core_busy "$c1a" "$c1b")
    putil=$(ticks_util "$((ticks1 - ticks0))" "$secs")
    f0=$(foreign "$core0" "$putil")
    parsed=$($PY "$BENCH/summarize.py" parse-wrk "$wrkout")
    extra=$(echo "$parsed" | $PY -c '
import json, sys
w = json.load(sys.stdin)
ticks, hz = int(sys.argv[1]), int(sys.argv[2])
cpu_us = ticks * 1e6 / hz
print(json.dumps({"proxy_cpu_us": cpu_us, "proxy_cpu_util": float(sys.argv[3]),
    "proxy_cpu_us_per_req": round(cpu_us / w["requests"], 2) if w.get("requests") else None,
    "backend_cpu_util": float(sys.argv[4]), "core0_busy": float(sys.argv[5]),
    "core1_busy": float(sys.argv[6]), "connections": int(sys.argv[7])}))' \
        "$((ticks1 - ticks0))" "$HZ" "$putil" "$(ticks_util "$((bticks1 - bticks0))" "$secs")" "$core0" "$core1" "$CONNS")
    # Core 1 is saturated by design here (wrk + backend): only core 0 is judged.
    record "$(echo "$parsed" | $PY "$BENCH/summarize.py" merge "$extra" | $PY "$BENCH/summarize.py" merge "$(context "$name" "$rep" saturation "$f0" null)")"
    log "$name: $(grep 'Requests/sec' "$wrkout" || echo 'no Requests/sec in wrk output') (proxy $putil of core 0, core 0 busy $core0, core 1 busy $core1)"
}

test_rate() {
    local name=$1 rep=$2 rate=$3 pids out p
    mapfile -t pids < <(pid_tree "$PROXY_PID")
    monitor_start
    local args=()
    for p in "${pids[@]}"; do args+=(--pid "$p"); done
    log "$name: open loop at $rate req/s for ${RATE_SECS}s (+${WARMUP_SECS}s warm-up)"
    local ticks0 ticks1 bticks0 bticks1 c0a c0b c1a c1b
    ticks0=$(proc_ticks "${pids[@]}")
    bticks0=$(proc_ticks "${BACKEND_PIDS[@]}")
    c0a=$(core_snap "$PROXY_CORE")
    c1a=$(core_snap "$LOAD_CORE")
    out=$(taskset -c "$LOAD_CORE" timeout -k 5 $((RATE_SECS + WARMUP_SECS + 60)) "$LOADGEN" rate \
        --url "http://127.0.0.1:$PROXY_PORT/" -c "$CONNS" -R "$rate" -d "$RATE_SECS" \
        --warmup "$WARMUP_SECS" --timeout 5 "${args[@]}") || {
        monitor_stop
        log "$name: rate test at $rate failed"
        return 0
    }
    ticks1=$(proc_ticks "${pids[@]}")
    bticks1=$(proc_ticks "${BACKEND_PIDS[@]}")
    c0b=$(core_snap "$PROXY_CORE")
    c1b=$(core_snap "$LOAD_CORE")
    monitor_stop
    local secs core0 core1 putil butil lutil f0 f1
    secs=$(secs_between "${c0a#* }" "${c0b#* }")
    core0=$(core_busy "$c0a" "$c0b")
    core1=$(core_busy "$c1a" "$c1b")
    putil=$(ticks_util "$((ticks1 - ticks0))" "$secs")
    butil=$(ticks_util "$((bticks1 - bticks0))" "$secs")
    lutil=$(echo "$out" | $PY -c 'import json, sys; print("%.3f" % (json.load(sys.stdin)["self_cpu_us"] / 1e6 / float(sys.argv[1])))' "$secs")
    f0=$(foreign "$core0" "$putil")
    f1=$(foreign "$core1" "$butil" "$lutil")
    record "$(echo "$out" | $PY "$BENCH/summarize.py" merge "{\"core0_busy\": $core0, \"core1_busy\": $core1, \"proxy_util_whole_run\": $putil, \"backend_util\": $butil, \"loadgen_util\": $lutil}" | $PY "$BENCH/summarize.py" merge "$(context "$name" "$rep" rate "$f0" "$f1")")"
    log "$name: $(echo "$out" | grep -o '"achieved_rate":[^,]*\|"latency_us":{[^}]*}\|"cpu_us_per_req":[^,]*' | tr '\n' ' ')(foreign load: core 0 $f0, core 1 $f1)"
}

# retry TEST ARGS... — run a test again (after waiting for quiet) while it was
# contended, at most RETRIES more times. Every attempt is recorded; the report
# prefers uncontended ones.
retry() {
    local tries=0
    while :; do
        "$@"
        ((LAST_CONTENDED)) || return 0
        ((tries < RETRIES)) || return 0
        tries=$((tries + 1))
        log "$2: $1 was contended by other load; again (retry $tries/$RETRIES)"
        wait_quiet
    done
}

# ------------------------------------------------------------------ main

install_deps
((DO_BUILD)) && build
[[ -x $LOADGEN ]] || die "load generator not built: $LOADGEN (run without --no-build)"

# File descriptors: 2 per idle connection through the proxy, and the load generator's.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [[ $NOFILE != unlimited ]] && ((NOFILE < IDLE_CONNS * 2 + 500)); then
    IDLE_CONNS=$(((NOFILE - 500) / 2))
    log "warning: open-file limit $NOFILE; idle connections reduced to $IDLE_CONNS"
fi
[[ $NOFILE == unlimited ]] && NOFILE=65536
HAPROXY_MAXCONN=$(((NOFILE - 200) / 2))
((HAPROXY_MAXCONN > 20000)) && HAPROXY_MAXCONN=20000

IFS=, read -r -a PROXIES <<<"$ONLY"
for p in "${PROXIES[@]}"; do
    case "$p" in nginx|haproxy|bare-pingora|portico) ;; *) die "unknown proxy $p" ;; esac
done

for port in $BACKEND_PORT $PORTICO_PORT $PORTICO_ADMIN_PORT $BARE_PORT $NGINX_PORT $HAPROXY_PORT; do
    port_free "$port" || die "port $port is already in use (a previous run still going?)"
done

rm -rf "$WORK"
mkdir -p "$WORK/nginx-tmp" "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

if [[ ${BENCH_NGINX_ACCESS_LOG:-on} == off ]]; then
    NGINX_LOG_DIRECTIVE='access_log off;'
else
    NGINX_LOG_DIRECTIVE="access_log $WORK/proxy-nginx.access.log combined buffer=64k flush=1s;"
fi
render() {
    sed -e "s#@WORK@#$WORK#g" -e "s#@BACKEND_PORT@#$BACKEND_PORT#g" -e "s#@NGINX_PORT@#$NGINX_PORT#g" \
        -e "s#@HAPROXY_PORT@#$HAPROXY_PORT#g" -e "s#@NGINX_ACCESS_LOG@#$NGINX_LOG_DIRECTIVE#g" \
        -e "s#@MAXCONN@#$HAPROXY_MAXCONN#g" -e "s#@NOFILE@#$NOFILE#g" "$1" >"$2"
}
render "$BENCH/conf/backend-nginx.conf" "$WORK/backend-nginx.conf"
render "$BENCH/conf/proxy-nginx.conf" "$WORK/proxy-nginx.conf"
render "$BENCH/conf/proxy-haproxy.cfg" "$WORK/proxy-haproxy.cfg"
sed -e "s#/tmp/portico-bench#$WORK#g" "$BENCH/portico-bench.yaml" >"$WORK/portico-bench.yaml"

log "backend: nginx on core $LOAD_CORE, 127.0.0.1:$BACKEND_PORT"
start_bg "$LOAD_CORE" "$WORK/backend-nginx.out" nginx -c "$WORK/backend-nginx.conf" -p "$WORK"
BACKEND_PID=$BG_PID
wait_serving "$BACKEND_PORT" "$BACKEND_PID" || die "the backend did not start: $(tail -5 "$WORK/backend-nginx.error.log" "$WORK/backend-nginx.out" 2>/dev/null)"
mapfile -t BACKEND_PIDS < <(pid_tree "$BACKEND_PID")

declare -A STATUS
for p in "${PROXIES[@]}"; do
    if proxy_available "$p"; then STATUS[$p]=ok; else STATUS[$p]=missing; fi
done

for ((rep = 1; rep <= REPEAT; rep++)); do
    # Rotate the order each repeat so slow drifts of the shared box spread evenly.
    n=${#PROXIES[@]}
    for ((k = 0; k < n; k++)); do
        name=${PROXIES[$(((k + rep - 1) % n))]}
        [[ ${STATUS[$name]} == ok ]] || { log "$name: ${STATUS[$name]}, skipped"; continue; }
        wait_quiet
        log "== $name (repeat $rep/$REPEAT) =="
        start_proxy "$name"
        if ! wait_serving "$PROXY_PORT" "$PROXY_PID"; then
            log "$name: did not serve the backend's body within 20 s; log tail:"
            tail -n 15 "$WORK/proxy-$name.out" >&2 || true
            STATUS[$name]="failed to start"
            stop "$PROXY_PID" "$STOP_SIG"
            continue
        fi
        test_idle "$name" "$rep"
        retry test_saturation "$name" "$rep"
        for rate in "${RATES_ARR[@]}"; do
            retry test_rate "$name" "$rep" "$rate"
        done
        stop "$PROXY_PID" "$STOP_SIG"
    done
done

stop "$BACKEND_PID" TERM

proxies_json=$(printf '"%s",' "${PROXIES[@]}")
read -r -a rates_arr <<<"$RATES"
rates_json=$(printf '%s,' "${rates_arr[@]}")
status_args=()
for p in "${PROXIES[@]}"; do status_args+=("status.$p=${STATUS[$p]}"); done
git_head=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
$PY "$BENCH/summarize.py" meta "$WORK/meta.json" \
    "stamp=$STAMP" "proxies=[${proxies_json%,}]" "git_head=$git_head" \
    "params.quick=$QUICK" "params.repeat=$REPEAT" "params.rates=[${rates_json%,}]" \
    "params.connections=$CONNS" "params.saturation_secs=$SAT_SECS" "params.rate_secs=$RATE_SECS" \
    "params.warmup_secs=$WARMUP_SECS" "params.idle_connections=$IDLE_CONNS" \
    "params.proxy_core=$PROXY_CORE" "params.load_core=$LOAD_CORE" \
    "params.nginx_access_log=${BENCH_NGINX_ACCESS_LOG:-on}" \
    "binaries.portico_path=$PORTICO_BIN" \
    "binaries.portico_mtime=$(stat -c %y "$PORTICO_BIN" 2>/dev/null || echo missing)" \
    "binaries.bare_pingora_mtime=$(stat -c %y "$BARE_BIN" 2>/dev/null || echo missing)" \
    "${status_args[@]}"

mkdir -p "$OUT/raw-$STAMP"
cp "$WORK"/results.jsonl "$WORK"/meta.json "$WORK"/wrk-*.txt "$OUT/raw-$STAMP/" 2>/dev/null || true
for f in "$WORK"/*.out "$WORK"/*error.log; do
    [[ -s $f ]] && tail -n 50 "$f" >"$OUT/raw-$STAMP/$(basename "$f").tail"
done
echo
$PY "$BENCH/summarize.py" report "$RESULTS" "$WORK/meta.json" "$OUT"
