#!/usr/bin/env bash
# bench/scenarios.sh — feature scenarios for Portico on loopback (issues 3, 4, 5, 7).
#
# Same approach as bench/run.sh: one fast nginx backend and the load generators
# on core 1, the proxy under test on core 0, every process pinned with taskset,
# CPU per request from /proc/PID/stat utime+stime deltas, wrk for saturation,
# fixed-rate runs for CPU and latency. Each scenario reports ratios against its
# target:
#   tls        (issue 3) full TLS handshakes/s (openssl s_time -new) and HTTP/2
#              req/s over TLS (h2load), Portico vs nginx vs HAProxy; for HTTP/2
#              also bare Pingora (bench/bare-pingora --tls) and nginx with
#              Pingora's default upstream keep-alive pool (128)
#   plugins    (issue 4) jwt (HS256) + rate_limit + compression on a 2 KiB JSON
#              answer vs the plain proxy; optional JWT micro-benchmark (--jwt-bench)
#   cache      (issue 5) cache hits vs proxied; retries + circuit breaker +
#              outlier detection vs the plain route, nothing failing
#   aggregate  (issue 7) an aggregation of three fast calls vs one proxied call
# Prints one markdown table per scenario; writes bench/out/scenarios-STAMP.json,
# bench/out/scenarios-table-STAMP.md and bench/out/scenarios-raw-STAMP/.
# See the "Scenarios" section of bench/README.md.
#
# Usage: bench/scenarios.sh [--repeat N] [--only LIST] [--quick] [--jwt-bench]
#                           [--theirs-wait SECS] [--no-wait]
#   --repeat N         rounds (default 2); variants alternate their order each round
#   --only LIST        comma-separated subset of: tls,plugins,cache,aggregate
#   --quick            smoke run: 3 s tests, 20,000 h2 requests, 1 round
#   --jwt-bench        also run (and compile, if needed) the JWT micro-benchmark
#                      (cargo test --release -p portico-plugins -- --ignored jwt_bench)
#   --theirs-wait S    before each measurement, wait up to S seconds (default 1200)
#                      for other load runs (bench/run.sh, loadgen, wrk, h2load not
#                      started by this script) and builds to finish; after that,
#                      measure anyway and flag the results contended (later waits
#                      are then limited to 60 s)
#   --no-wait          do not wait (results taken during other load are still flagged)
# Environment: BENCH_SAT_SECS (10), BENCH_RATE_SECS (10), BENCH_WARMUP_SECS (2),
#   BENCH_CONNS (50), BENCH_RATE (5000, the fixed rate for CPU µs/req),
#   BENCH_LAT_RATE (1000, the latency rate of the aggregation scenario),
#   BENCH_STIME_SECS (10), BENCH_STIME_CLIENTS (4), BENCH_H2_REQUESTS (200000),
#   BENCH_WORK (default /tmp/portico-scenarios, deleted unless BENCH_KEEP_WORK=1),
#   BENCH_PORTICO_BIN (default target/release/portico; never built by this script).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
SCN=$BENCH/scenarios
OUT=$BENCH/out
PY=python3

REPEAT=2
ONLY="tls,plugins,cache,aggregate"
QUICK=0
JWT_BENCH=0
THEIRS_WAIT=1200
HZ=$(getconf CLK_TCK)

die() { echo "scenarios.sh: $*" >&2; exit 1; }
log() { echo "[scenarios $(date +%H:%M:%S)] $*" >&2; }

while (($#)); do
    case "$1" in
        --repeat) REPEAT=${2:?--repeat needs N}; shift ;;
        --only) ONLY=${2:?--only needs a list}; shift ;;
        --quick) QUICK=1 ;;
        --jwt-bench) JWT_BENCH=1 ;;
        --theirs-wait) THEIRS_WAIT=${2:?--theirs-wait needs seconds}; shift ;;
        --no-wait) THEIRS_WAIT=0 ;;
        -h|--help) sed -n '2,41p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "--repeat needs a positive integer"

if ((QUICK)); then
    SAT_SECS=${BENCH_SAT_SECS:-3}; RATE_SECS=${BENCH_RATE_SECS:-3}; WARMUP_SECS=${BENCH_WARMUP_SECS:-1}
    STIME_SECS=${BENCH_STIME_SECS:-3}; H2_REQUESTS=${BENCH_H2_REQUESTS:-20000}
else
    SAT_SECS=${BENCH_SAT_SECS:-10}; RATE_SECS=${BENCH_RATE_SECS:-10}; WARMUP_SECS=${BENCH_WARMUP_SECS:-2}
    STIME_SECS=${BENCH_STIME_SECS:-10}; H2_REQUESTS=${BENCH_H2_REQUESTS:-200000}
fi
CONNS=${BENCH_CONNS:-50}
RATE=${BENCH_RATE:-5000}
LAT_RATE=${BENCH_LAT_RATE:-1000}
STIME_CLIENTS=${BENCH_STIME_CLIENTS:-4}
WORK=${BENCH_WORK:-/tmp/portico-scenarios}

PROXY_CORE=0
LOAD_CORE=1

# Ports: all different from bench/run.sh's (270xx), so both can coexist.
BACKEND_PORT=28000
PORTICO_PORT=28080
PORTICO_ADMIN_PORT=28901
PORTICO_TLS_PORT=28443
PORTICO_TLS_ADMIN_PORT=28902
NGINX_TLS_PORT=28444
HAPROXY_TLS_PORT=28445
BARE_TLS_PORT=28446
NGINX128_TLS_PORT=28447
# Idle upstream keep-alive connections: Portico keeps 1,024 per worker thread, and
# the HTTP/2 comparison gives nginx and bare Pingora the same (nginx-ka128: 128).
UPSTREAM_POOL=1024

BODY='portico bench backend: a fixed 100-byte body so every proxy moves the same bytes xxxxxxxxxxxxxxxxxx'

LOADGEN=$BENCH/loadgen/target/release/loadgen
PORTICO_BIN=${BENCH_PORTICO_BIN:-$ROOT/target/release/portico}
BARE_BIN=${BENCH_BARE_BIN:-$ROOT/target/release/bare-pingora}

for tool in nginx haproxy wrk h2load openssl taskset curl ss python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install nginx-light haproxy wrk nghttp2-client openssl util-linux curl iproute2 python3)"
done
[[ -x $LOADGEN ]] || die "the load generator is not built: $LOADGEN (cargo build --release --manifest-path bench/loadgen/Cargo.toml)"
[[ -x $PORTICO_BIN ]] || die "no Portico binary at $PORTICO_BIN (CARGO_TARGET_DIR=/work/rel-target cargo build --release --bin portico, then copy it there)"

IFS=, read -r -a SCENARIOS <<<"$ONLY"
for s in "${SCENARIOS[@]}"; do
    case "$s" in tls|plugins|cache|aggregate) ;; *) die "unknown scenario $s" ;; esac
done
want() { [[ ,$ONLY, == *",$1,"* ]]; }

# ------------------------------------------------------------------ processes

STARTED=()

cleanup() {
    local p
    for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${STARTED[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    if [[ -z ${BENCH_KEEP_WORK:-} && -d $WORK && $WORK == /tmp/* ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_bg CORE LOGFILE CMD... — pinned, in the background; sets BG_PID.
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

# forget PID — drop a PID that has exited from the cleanup list.
forget() {
    local keep=() q
    for q in "${STARTED[@]}"; do [[ $q == "$1" ]] || keep+=("$q"); done
    STARTED=("${keep[@]}")
}

pid_tree() { echo "$1"; pgrep -P "$1" || true; }
port_free() { ! ss -Hltn "sport = :$1" | grep -q .; }

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

# "IDLE WALL" of one CPU (idle+iowait ticks from /proc/stat, wall seconds).
core_snap() { echo "$(awk -v c="cpu$1" '$1 == c { print $5 + $6 }' /proc/stat) $(date +%s.%N)"; }
core_busy() {
    awk -v a="$1" -v b="$2" -v hz="$HZ" 'BEGIN {
        split(a, x, " "); split(b, y, " "); w = y[2] - x[2]; f = 0
        if (w > 0) f = 1 - (y[1] - x[1]) / hz / w
        if (f < 0) f = 0
        printf "%.3f\n", f }'
}

# ------------------------------------------------------------------ other people's load

THEIR_PAT='bench/run.sh|loadgen|wrk |h2load'
BUILD_PROCS='cargo|rustc|clippy-driver|rustdoc|cc1|cc1plus|collect2|ld|ld.lld|ld.gold'
build_running() { grep -qsxE "$BUILD_PROCS" /proc/[0-9]*/comm; }

# ours PID — true when PID is this script or one of its descendants.
ours() {
    local p=$1 s n=0
    while [[ -n $p ]] && ((p > 1 && n < 64)); do
        [[ $p == "$$" ]] && return 0
        s=$(cat "/proc/$p/stat" 2>/dev/null) || return 1
        s=${s##*) }
        p=${s#* }
        p=${p%% *}
        n=$((n + 1))
    done
    return 1
}

# The PIDs of load processes that this script did not start.
their_load() {
    local p
    for p in $(pgrep -f "$THEIR_PAT" 2>/dev/null || true); do
        ours "$p" || echo "$p"
    done
}

# Busy share of both cores over one second, in percent (between tests nothing
# of ours runs but the idle backend and proxy).
machine_busy_pct() {
    local a b
    a=$(awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
    sleep 1
    b=$(awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); d = y[2] - x[2]; p = 0; if (d > 0) p = 100 * (y[1] - x[1]) / d; printf "%d\n", p }'
}

FORCED=0
# wait_turn — before each measurement: until nobody else's load runs, no build
# runs and both cores are less than 15 % busy over a second (polls every 10 s,
# up to THEIRS_WAIT s; 60 s once a wait has timed out).
wait_turn() {
    local waited=0 said=0 limit=$THEIRS_WAIT theirs busy
    ((FORCED && limit > 60)) && limit=60
    while :; do
        theirs=$(their_load | tr '\n' ' ')
        if [[ -z $theirs ]] && ! build_running; then
            # Also wait for anything else that keeps the cores busy (tests, ...).
            busy=$(machine_busy_pct)
            ((busy < 15)) && return 0
            theirs="(the machine is ${busy}% busy) "
        fi
        if ((waited >= limit)); then
            ((limit > 0)) && log "still busy after ${waited}s (${theirs:+load: $theirs}$(build_running && echo ' a build')); measuring anyway, flagged contended"
            FORCED=1
            return 0
        fi
        ((said)) || log "waiting for other load to finish (${theirs:+load: $theirs}$(build_running && echo ' a build is running')); up to ${limit}s"
        said=1
        sleep 10
        waited=$((waited + 10))
    done
}

# A sampler on the load core: notes whether somebody else's load or a build ran
# at any moment of a measurement.
monitor_start() {
    rm -f "$WORK/contended"
    (
        while :; do
            if build_running || [[ -n $(their_load) ]]; then touch "$WORK/contended"; fi
            sleep 1
        done
    ) &
    MONITOR_PID=$!
    taskset -p -c "$LOAD_CORE" "$MONITOR_PID" >/dev/null 2>&1 || true
    STARTED+=("$MONITOR_PID")
}
monitor_stop() { stop "$MONITOR_PID" TERM; }

# ------------------------------------------------------------------ measurement windows

# window_begin / window_end — proxy CPU ticks and core busy shares around a test;
# window_end sets WINDOW (a JSON fragment).
window_begin() {
    W_T0=$(proc_ticks "${PROXY_PIDS[@]}")
    W_B0=$(proc_ticks "${BACKEND_PIDS[@]}")
    W_C0=$(core_snap "$PROXY_CORE")
    W_C1=$(core_snap "$LOAD_CORE")
}
window_end() {
    local t1 b1 c0 c1 secs core0 core1
    t1=$(proc_ticks "${PROXY_PIDS[@]}")
    b1=$(proc_ticks "${BACKEND_PIDS[@]}")
    c0=$(core_snap "$PROXY_CORE")
    c1=$(core_snap "$LOAD_CORE")
    secs=$(awk -v a="${W_C0#* }" -v b="${c0#* }" 'BEGIN { print b - a }')
    core0=$(core_busy "$W_C0" "$c0")
    core1=$(core_busy "$W_C1" "$c1")
    WINDOW=$(awk -v t="$((t1 - W_T0))" -v b="$((b1 - W_B0))" -v s="$secs" -v hz="$HZ" -v c0="$core0" -v c1="$core1" 'BEGIN {
        pu = (s > 0) ? t / hz / s : 0; bu = (s > 0) ? b / hz / s : 0; f0 = c0 - pu; if (f0 < 0) f0 = 0
        printf "{\"window_s\": %.3f, \"proxy_cpu_us\": %d, \"proxy_util\": %.3f, \"backend_util\": %.3f, \"core0_busy\": %.3f, \"core1_busy\": %.3f, \"foreign_core0\": %.3f}",
            s, t * 1000000 / hz, pu, bu, c0, c1, f0 }')
}

RESULTS=""
# record SCENARIO VARIANT TEST JSON... — merge the fragments with the context
# and append one line to RESULTS. cpu_us_per_req is derived from the window
# when the measurement did not compute it itself.
record() {
    local scen=$1 var=$2 test=$3
    shift 3
    local contended=false
    [[ -e $WORK/contended ]] && contended=true
    local ctx
    ctx=$(printf '{"scenario":"%s","variant":"%s","test":"%s","round":%d,"proxy":"%s","build_or_other_load":%s,"loadavg":"%s"}' \
        "$scen" "$var" "$test" "$ROUND" "$PROXY_NAME" "$contended" "$(cut -d' ' -f1-3 /proc/loadavg)")
    $PY - "$@" "$ctx" >>"$RESULTS" <<'EOF'
import json, sys
r = {}
for a in sys.argv[1:]:
    r.update(json.loads(a))
n = r.get("requests") if r.get("requests") is not None else r.get("handshakes")
# s_time prints whole seconds only: handshakes/s over the measured window instead.
if r.get("handshakes") is not None and r.get("window_s"):
    r["hs_per_s"] = round(r["handshakes"] / r["window_s"], 1)
if r.get("cpu_us_per_req") is None and r.get("proxy_cpu_us") is not None and n:
    r["cpu_us_per_req"] = round(r["proxy_cpu_us"] / n, 2)
# Contended: another load or a build ran, or other processes took > 5 % of core 0.
r["contended"] = bool(r.get("build_or_other_load")) or (r.get("foreign_core0") or 0) > 0.05
print(json.dumps(r))
EOF
    local last
    last=$(tail -n 1 "$RESULTS")
    if [[ $last == *'"contended": true'* ]]; then LAST_CONTENDED=1; else LAST_CONTENDED=0; fi
    log "  $scen/$var/$test: $(echo "$last" | $PY -c '
import json, sys
r = json.load(sys.stdin)
keys = ["rps", "hs_per_s", "requests", "handshakes", "cpu_us_per_req", "proxy_util", "core1_busy", "foreign_core0", "contended"]
lat = r.get("latency_us") or {}
print(" ".join("%s=%s" % (k, r[k]) for k in keys if r.get(k) is not None), "p50=%s p99=%s" % (lat.get("p50"), lat.get("p99")))')"
}

# ------------------------------------------------------------------ tests

RAW=""   # raw output directory of this run
LAST_CONTENDED=0
RETRIES=${BENCH_RETRIES:-1}

# retry TEST ARGS... — run a test again (after waiting for quiet) while it was
# contended, at most RETRIES more times. Every attempt is recorded; the report
# prefers the uncontended ones.
retry() {
    local tries=0
    while :; do
        "$@"
        ((LAST_CONTENDED)) || return 0
        ((tries < RETRIES)) || return 0
        tries=$((tries + 1))
        log "  ${1#test_} ${*:2:2} was contended; again (retry $tries/$RETRIES)"
    done
}

# test_wrk SCEN VARIANT URL [wrk args, e.g. -H ...] — saturation, closed loop.
test_wrk() {
    local scen=$1 var=$2 url=$3
    shift 3
    local f="$RAW/wrk-$scen-$var-r$ROUND.txt"
    wait_turn
    monitor_start
    taskset -c "$LOAD_CORE" timeout -k 5 30 wrk -t1 -c"$CONNS" -d1s "$@" "$url" >/dev/null 2>&1 || true
    window_begin
    taskset -c "$LOAD_CORE" timeout -k 5 $((SAT_SECS + 30)) wrk -t1 -c"$CONNS" -d"${SAT_SECS}s" --latency "$@" "$url" >"$f" 2>&1 || true
    window_end
    monitor_stop
    record "$scen" "$var" sat "$($PY "$SCN/report.py" wrk "$f")" "$WINDOW" "{\"connections\": $CONNS}"
}

# test_loadgen SCEN VARIANT URL RATE — fixed rate (open loop, CO-corrected), CPU µs/req.
test_loadgen() {
    local scen=$1 var=$2 url=$3 rate=$4 out p args=()
    for p in "${PROXY_PIDS[@]}"; do args+=(--pid "$p"); done
    wait_turn
    monitor_start
    window_begin
    out=$(taskset -c "$LOAD_CORE" timeout -k 5 $((RATE_SECS + WARMUP_SECS + 60)) "$LOADGEN" rate \
        --url "$url" -c "$CONNS" -R "$rate" -d "$RATE_SECS" --warmup "$WARMUP_SECS" --timeout 5 "${args[@]}") || {
        monitor_stop
        log "  $scen/$var: loadgen failed"
        return 0
    }
    window_end
    monitor_stop
    echo "$out" >"$RAW/loadgen-$scen-$var-r$ROUND.json"
    # loadgen's own cpu_us_per_req covers exactly its measured window (after warm-up).
    record "$scen" "$var" rate "$WINDOW" "$out" "{\"tool\": \"loadgen\"}"
}

# test_h2load_rate SCEN VARIANT URL RATE [h2load args, e.g. -H ...] — fixed rate
# with request headers (loadgen sends none): h2load --h1 --rps, CPU counted from
# the end of the warm-up to the end of the run.
test_h2load_rate() {
    local scen=$1 var=$2 url=$3 rate=$4
    shift 4
    local f="$RAW/h2load-$scen-$var-r$ROUND.txt" lf="$RAW/h2load-$scen-$var-r$ROUND.log"
    local per=$(((rate + CONNS - 1) / CONNS)) hp
    wait_turn
    monitor_start
    taskset -c "$LOAD_CORE" timeout -k 5 $((RATE_SECS + WARMUP_SECS + 60)) h2load --h1 -c "$CONNS" --rps "$per" \
        -D "$RATE_SECS" --warm-up-time "${WARMUP_SECS}s" --log-file "$lf" "$@" "$url" >"$f" 2>&1 &
    hp=$!
    STARTED+=("$hp")
    sleep "$WARMUP_SECS"
    window_begin
    wait "$hp" || true
    window_end
    forget "$hp"
    monitor_stop
    record "$scen" "$var" rate "$($PY "$SCN/report.py" h2load "$f" "$lf")" "$WINDOW" \
        "{\"tool\": \"h2load --h1 --rps\", \"target_rate\": $((per * CONNS)), \"connections\": $CONNS}"
    rm -f "$lf"
}

# test_stime VARIANT PORT — full TLS handshakes/s: STIME_CLIENTS s_time clients in parallel.
test_stime() {
    local var=$1 port=$2 i pids=() files=()
    wait_turn
    monitor_start
    taskset -c "$LOAD_CORE" timeout -k 5 30 openssl s_time -connect "127.0.0.1:$port" -new -time 1 >/dev/null 2>&1 || true
    window_begin
    for ((i = 1; i <= STIME_CLIENTS; i++)); do
        files+=("$RAW/stime-$var-r$ROUND-$i.txt")
        taskset -c "$LOAD_CORE" timeout -k 5 $((STIME_SECS + 30)) openssl s_time -connect "127.0.0.1:$port" \
            -new -time "$STIME_SECS" >"${files[-1]}" 2>&1 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || true; done
    window_end
    monitor_stop
    record tls "$var" handshake "$($PY "$SCN/report.py" stime "${files[@]}")" "$WINDOW" \
        "{\"clients\": $STIME_CLIENTS, \"tls_version\": \"$(tls_version "$port")\"}"
}

tls_version() {
    # "New, TLSv1.3, Cipher is ..." (the session block is not always printed before EOF).
    echo | timeout 5 openssl s_client -connect "127.0.0.1:$1" 2>/dev/null | awk -F', ' '/^New, / { print $2; exit }' || true
}

# test_h2 VARIANT PORT — HTTP/2 over TLS, h2load -n H2_REQUESTS -c 10 -m 100.
test_h2() {
    local var=$1 port=$2 f="$RAW/h2-$1-r$ROUND.txt"
    wait_turn
    monitor_start
    taskset -c "$LOAD_CORE" timeout -k 5 60 h2load -n $((H2_REQUESTS / 10)) -c 10 -m 100 "https://127.0.0.1:$port/" >/dev/null 2>&1 || true
    window_begin
    taskset -c "$LOAD_CORE" timeout -k 5 180 h2load -n "$H2_REQUESTS" -c 10 -m 100 "https://127.0.0.1:$port/" >"$f" 2>&1 || true
    window_end
    monitor_stop
    record tls "$var" h2 "$($PY "$SCN/report.py" h2load "$f")" "$WINDOW" "{\"clients\": 10, \"streams_per_client\": 100}"
}

# ------------------------------------------------------------------ proxies

# start_proxy NAME — on the proxy core; sets PROXY_PID, PROXY_PIDS, STOP_SIG.
start_proxy() {
    PROXY_NAME=$1
    case "$1" in
        portico-http) STOP_SIG=INT; start_bg "$PROXY_CORE" "$WORK/portico-http.out" env BENCH_JWT_SECRET="$JWT_SECRET" "$PORTICO_BIN" run -c "$WORK/portico-http.yaml" ;;
        portico) STOP_SIG=INT; start_bg "$PROXY_CORE" "$WORK/portico-tls.out" "$PORTICO_BIN" run -c "$WORK/portico-tls.yaml" ;;
        nginx) STOP_SIG=TERM; start_bg "$PROXY_CORE" "$WORK/tls-nginx.out" nginx -c "$WORK/tls-nginx.conf" -p "$WORK" ;;
        nginx-ka128) STOP_SIG=TERM; start_bg "$PROXY_CORE" "$WORK/tls-nginx-ka128.out" nginx -c "$WORK/tls-nginx-ka128.conf" -p "$WORK" ;;
        bare-pingora) STOP_SIG=INT; start_bg "$PROXY_CORE" "$WORK/tls-bare-pingora.out" "$BARE_BIN" \
            --listen "127.0.0.1:$BARE_TLS_PORT" --upstream "127.0.0.1:$BACKEND_PORT" \
            --keepalive-pool "$UPSTREAM_POOL" --tls "$CERT" "$KEY" ;;
        haproxy) STOP_SIG=TERM; start_bg "$PROXY_CORE" "$WORK/tls-haproxy.out" haproxy -db -f "$WORK/tls-haproxy.cfg" ;;
    esac
    PROXY_PID=$BG_PID
}

# wait_body URL EXPECTED [curl args] — up to 20 s for URL to answer EXPECTED.
wait_body() {
    local url=$1 want=$2 i body
    shift 2
    for ((i = 0; i < 200; i++)); do
        kill -0 "$PROXY_PID" 2>/dev/null || return 1
        body=$(curl -s --max-time 1 "$@" "$url" 2>/dev/null || true)
        [[ $body == "$want" ]] && return 0
        sleep 0.1
    done
    return 1
}

proxy_up() {
    # env(1) execs, so the PID is the proxy itself; nginx: master + worker.
    sleep 0.3
    mapfile -t PROXY_PIDS < <(pid_tree "$PROXY_PID")
}

fail_log() {
    log "$1; log tail:"
    tail -n 15 "$2" >&2 2>/dev/null || true
}

# ------------------------------------------------------------------ setup

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[[ $NOFILE == unlimited ]] && NOFILE=65536
MAXCONN=$(((NOFILE - 200) / 2))
((MAXCONN > 20000)) && MAXCONN=20000

for port in $BACKEND_PORT $PORTICO_PORT $PORTICO_ADMIN_PORT $PORTICO_TLS_PORT $PORTICO_TLS_ADMIN_PORT $NGINX_TLS_PORT $HAPROXY_TLS_PORT \
    $BARE_TLS_PORT $NGINX128_TLS_PORT; do
    port_free "$port" || die "port $port is already in use (a previous run still going?)"
done

rm -rf "$WORK"
mkdir -p "$WORK/nginx-tmp" "$WORK/certs" "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW=$OUT/scenarios-raw-$STAMP
mkdir -p "$RAW"
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
ROUND=0
PROXY_NAME=none

# The binary can be rebuilt by someone else during a run: measure a copy.
PORTICO_SRC=$PORTICO_BIN
PORTICO_MTIME=$(stat -c %y "$PORTICO_SRC" | cut -d. -f1)
cp "$PORTICO_SRC" "$WORK/portico"
PORTICO_BIN=$WORK/portico
PORTICO_SHA=$(sha256sum "$PORTICO_BIN" | cut -c1-16)
log "measuring a copy of $PORTICO_SRC (modified $PORTICO_MTIME, sha256 $PORTICO_SHA…)"
if [[ -x $BARE_BIN ]]; then
    cp "$BARE_BIN" "$WORK/bare-pingora"
    BARE_BIN=$WORK/bare-pingora
else
    log "no bare-pingora at $BARE_BIN: the HTTP/2 comparison runs without it"
    BARE_BIN=
fi

bash "$ROOT/certs/gen.sh" "$WORK/certs" >/dev/null
CERT=$WORK/certs/localhost.crt
KEY=$WORK/certs/localhost.key
cat "$CERT" "$KEY" >"$WORK/certs/localhost.pem"
$PY "$SCN/gen.py" json2k >"$WORK/json2k.json"
JWT_SECRET=$(head -c 32 /dev/urandom | base64 | tr -d '/+=' | head -c 40)
TOKEN=$($PY "$SCN/gen.py" token "$JWT_SECRET")
AUTH_H=(-H "Authorization: Bearer $TOKEN" -H "Accept-Encoding: gzip")

render() { $PY "$SCN/gen.py" render "$1" "$2" "${@:3}" || die "cannot render $1"; }
COMMON=(WORK="$WORK" NOFILE="$NOFILE" MAXCONN="$MAXCONN" BACKEND_PORT="$BACKEND_PORT" CERT="$CERT" KEY="$KEY"
    PEM="$WORK/certs/localhost.pem" PORTICO_PORT="$PORTICO_PORT" PORTICO_ADMIN_PORT="$PORTICO_ADMIN_PORT"
    PORTICO_TLS_PORT="$PORTICO_TLS_PORT" PORTICO_TLS_ADMIN_PORT="$PORTICO_TLS_ADMIN_PORT"
    NGINX_TLS_PORT="$NGINX_TLS_PORT" HAPROXY_TLS_PORT="$HAPROXY_TLS_PORT")
render "$SCN/backend-nginx.conf" "$WORK/backend-nginx.conf" "${COMMON[@]}" BODY="$BODY" JSON2K="@file:$WORK/json2k.json"
render "$SCN/portico-http.yaml" "$WORK/portico-http.yaml" "${COMMON[@]}"
render "$SCN/portico-tls.yaml" "$WORK/portico-tls.yaml" "${COMMON[@]}"
render "$SCN/tls-nginx.conf" "$WORK/tls-nginx.conf" "${COMMON[@]}" NGINX_KEEPALIVE="$UPSTREAM_POOL"
render "$SCN/tls-nginx.conf" "$WORK/tls-nginx-ka128.conf" "${COMMON[@]/#NGINX_TLS_PORT=*/NGINX_TLS_PORT=$NGINX128_TLS_PORT}" \
    NGINX_KEEPALIVE=128
render "$SCN/tls-haproxy.cfg" "$WORK/tls-haproxy.cfg" "${COMMON[@]}"
BENCH_JWT_SECRET=$JWT_SECRET "$PORTICO_BIN" check -c "$WORK/portico-http.yaml" >&2 || die "portico-http.yaml does not load"
"$PORTICO_BIN" check -c "$WORK/portico-tls.yaml" >&2 || die "portico-tls.yaml does not load"

# ------------------------------------------------------------------ JWT micro-benchmark

JWT_JSON=null
if ((JWT_BENCH)); then
    THEIRS_WAIT_SAVED=$THEIRS_WAIT
    wait_turn
    log "JWT micro-benchmark: cargo test --release -p portico-plugins -- --ignored jwt_bench --nocapture (compiles first if needed; pinned to core $PROXY_CORE)"
    monitor_start
    (cd "$ROOT" && taskset -c "$PROXY_CORE" timeout -k 10 3600 cargo test --release -p portico-plugins -- --ignored jwt_bench --nocapture) \
        >"$RAW/jwt-bench.txt" 2>&1 || log "the JWT micro-benchmark failed (see $RAW/jwt-bench.txt)"
    monitor_stop
    JWT_JSON=$($PY "$SCN/report.py" jwtbench "$RAW/jwt-bench.txt")
    [[ $JWT_JSON == "{}" ]] && JWT_JSON=null
    grep 'jwt_bench:' "$RAW/jwt-bench.txt" >&2 || true
    THEIRS_WAIT=$THEIRS_WAIT_SAVED
fi

# ------------------------------------------------------------------ backend

log "backend: nginx on core $LOAD_CORE, 127.0.0.1:$BACKEND_PORT"
PROXY_PID=0
start_bg "$LOAD_CORE" "$WORK/backend-nginx.out" nginx -c "$WORK/backend-nginx.conf" -p "$WORK"
BACKEND_PID=$BG_PID
for ((i = 0; i < 100; i++)); do
    [[ $(curl -s --max-time 1 "http://127.0.0.1:$BACKEND_PORT/" 2>/dev/null) == "$BODY" ]] && break
    sleep 0.1
done
[[ $(curl -s --max-time 1 "http://127.0.0.1:$BACKEND_PORT/" 2>/dev/null) == "$BODY" ]] || die "the backend did not start: $(tail -5 "$WORK/backend-nginx.error.log" 2>/dev/null)"
[[ $(curl -s "http://127.0.0.1:$BACKEND_PORT/json/x" | wc -c) == 2048 ]] || die "the backend does not serve the 2 KiB JSON"
mapfile -t BACKEND_PIDS < <(pid_tree "$BACKEND_PID")

# ------------------------------------------------------------------ scenario bodies

# Scenario 1: one proxy after the other (order rotated each round).
scenario_tls() {
    # bare-pingora and nginx-ka128 take part in the HTTP/2 test only.
    local names=(portico nginx haproxy nginx-ka128) n k name port
    [[ -n $BARE_BIN ]] && names+=(bare-pingora)
    n=${#names[@]}
    for ((k = 0; k < n; k++)); do
        name=${names[$(((k + ROUND - 1) % n))]}
        case $name in
            portico) port=$PORTICO_TLS_PORT ;;
            nginx) port=$NGINX_TLS_PORT ;;
            haproxy) port=$HAPROXY_TLS_PORT ;;
            nginx-ka128) port=$NGINX128_TLS_PORT ;;
            bare-pingora) port=$BARE_TLS_PORT ;;
        esac
        wait_turn
        log "== tls: $name (round $ROUND) =="
        start_proxy "$name"
        if ! wait_body "https://127.0.0.1:$port/" "$BODY" -k --http2; then
            fail_log "tls/$name: did not serve the backend's body over TLS within 20 s" "$WORK/$([[ $name == portico ]] && echo portico-tls || echo tls-$name).out"
            stop "$PROXY_PID" "$STOP_SIG"
            continue
        fi
        proxy_up
        local proto
        proto=$(curl -sk --http2 -o /dev/null -w '%{http_version}' "https://127.0.0.1:$port/")
        [[ $proto == 2 ]] || log "tls/$name: warning: curl negotiated HTTP/$proto, not h2"
        case $name in portico | nginx | haproxy) retry test_stime "$name" "$port" ;; esac
        retry test_h2 "$name" "$port"
        stop "$PROXY_PID" "$STOP_SIG"
        PROXY_NAME=none
    done
}

check_route() { # NAME CONDITION-DESCRIPTION — logs and returns 1 on failure
    log "  check failed: $1: $2"
    return 1
}

# Functional checks of the routes of portico-http.yaml before measuring them.
verify_http_routes() {
    local base="http://127.0.0.1:$PORTICO_PORT" h ok=0 b
    h=$(curl -s -D - -o "$WORK/body" "${AUTH_H[@]}" "$base/json/plugins")
    [[ $h == *" 200"* && ${h,,} == *"content-encoding: gzip"* ]] || { check_route json-plugins "no gzipped 200 with the token: $h"; ok=1; }
    [[ $(gzip -dc "$WORK/body" 2>/dev/null | wc -c) == 2048 ]] || { check_route json-plugins "the gunzipped body is not the 2 KiB JSON"; ok=1; }
    [[ $(curl -s -o /dev/null -w '%{http_code}' -H 'Accept-Encoding: gzip' "$base/json/plugins") == 401 ]] || { check_route json-plugins "no 401 without a token"; ok=1; }
    [[ $(curl -s "${AUTH_H[@]}" "$base/json/plain" | wc -c) == 2048 ]] || { check_route json-plain "not the 2 KiB JSON, uncompressed"; ok=1; }
    [[ $(curl -s "${AUTH_H[@]}" "$base/json/jwt" | wc -c) == 2048 ]] || { check_route json-jwt "no 2 KiB JSON with the token"; ok=1; }
    [[ $(curl -s -o /dev/null -w '%{http_code}' "$base/json/jwt") == 401 ]] || { check_route json-jwt "no 401 without a token"; ok=1; }
    h=$(curl -s -D - -o /dev/null "${AUTH_H[@]}" "$base/json/ratelimit")
    [[ ${h,,} == *"ratelimit-limit: 1000000"* ]] || { check_route json-ratelimit "no RateLimit-Limit: 1000000 header: $h"; ok=1; }
    h=$(curl -s -D - -o /dev/null "${AUTH_H[@]}" "$base/json/compression")
    [[ ${h,,} == *"content-encoding: gzip"* ]] || { check_route json-compression "not gzipped: $h"; ok=1; }
    curl -s -o /dev/null "$base/cacheable/hit"
    h=$(curl -s -D - -o /dev/null "$base/cacheable/hit")
    [[ ${h,,} == *"x-cache: hit"* ]] || { check_route cacheable-hit "the second request is not a HIT: $h"; ok=1; }
    [[ $(curl -s "$base/cacheable/proxied") == "$BODY" ]] || { check_route cacheable-proxied "wrong body"; ok=1; }
    [[ $(curl -s "$base/resilient") == "$BODY" ]] || { check_route resilient "wrong body"; ok=1; }
    b=$(curl -s "$base/agg3")
    echo "$b" | $PY -c 'import json, sys; d = json.load(sys.stdin); assert all(d[k]["ok"] for k in "abc"), d' 2>/dev/null \
        || { check_route aggregate "not an object with a, b, c: $b"; ok=1; }
    return $ok
}

# Scenarios 2-4 share one Portico process per round (routes of portico-http.yaml).
scenarios_http() {
    local base="http://127.0.0.1:$PORTICO_PORT" flip=$(((ROUND + 1) % 2))
    wait_turn
    log "== portico (plain HTTP routes, round $ROUND) =="
    start_proxy portico-http
    if ! wait_body "$base/" "$BODY"; then
        fail_log "portico-http: did not serve the backend's body within 20 s" "$WORK/portico-http.out"
        stop "$PROXY_PID" "$STOP_SIG"
        return 0
    fi
    proxy_up
    verify_http_routes || log "warning: a route does not behave as expected; its numbers are suspect"

    # pair A B — the order of two variants, swapped every other round.
    pair() { if ((flip)); then echo "$2 $1"; else echo "$1 $2"; fi; }
    # url_of VARIANT — the path each variant requests.
    url_of() {
        case $1 in
            json-*) echo "$base/json/${1#json-}" ;;
            cacheable-proxied) echo "$base/cacheable/proxied" ;; cacheable-hit) echo "$base/cacheable/hit" ;;
            plain) echo "$base/" ;; resilient) echo "$base/resilient" ;;
            single) echo "$base/agg/a" ;; aggregate) echo "$base/agg3" ;;
        esac
    }
    local v
    if want plugins; then
        log "-- scenario 2 (plugins), round $ROUND"
        for v in $(pair json-plain json-plugins); do retry test_wrk plugins "$v" "$(url_of "$v")" "${AUTH_H[@]}"; done
        for v in $(pair json-plain json-plugins); do retry test_h2load_rate plugins "$v" "$(url_of "$v")" "$RATE" "${AUTH_H[@]}"; done
        # Where the cost is: each plugin alone, fixed rate only.
        for v in json-jwt json-ratelimit json-compression; do retry test_h2load_rate plugins "$v" "$(url_of "$v")" "$RATE" "${AUTH_H[@]}"; done
    fi
    if want cache; then
        log "-- scenario 3 (cache, resilience), round $ROUND"
        for v in $(pair cacheable-proxied cacheable-hit); do retry test_wrk cache "$v" "$(url_of "$v")"; done
        for v in $(pair plain resilient); do retry test_wrk cache "$v" "$(url_of "$v")"; done
        for v in $(pair cacheable-proxied cacheable-hit); do retry test_loadgen cache "$v" "$(url_of "$v")" "$RATE"; done
        for v in $(pair plain resilient); do retry test_loadgen cache "$v" "$(url_of "$v")" "$RATE"; done
    fi
    if want aggregate; then
        log "-- scenario 4 (aggregate), round $ROUND"
        for v in $(pair single aggregate); do retry test_wrk aggregate "$v" "$(url_of "$v")"; done
        for v in $(pair single aggregate); do retry test_loadgen aggregate "$v" "$(url_of "$v")" "$LAT_RATE"; done
    fi
    stop "$PROXY_PID" "$STOP_SIG"
    PROXY_NAME=none
}

# ------------------------------------------------------------------ main

for ((ROUND = 1; ROUND <= REPEAT; ROUND++)); do
    log "===== round $ROUND/$REPEAT ====="
    want tls && scenario_tls
    if want plugins || want cache || want aggregate; then scenarios_http; fi
done
ROUND=0

stop "$BACKEND_PID" TERM

# ------------------------------------------------------------------ report

$PY - "$WORK/meta.json" "$JWT_JSON" <<EOF
import json, sys
meta = {
    "stamp": "$STAMP",
    "date": "$(date)",
    "machine": {"nproc": "$(nproc)", "uname_r": "$(uname -r)",
                "cpu_model": "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo | tr -d '"')"},
    "git_head": "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)",
    "portico_mtime": "$PORTICO_MTIME",
    "portico_sha256_prefix": "$PORTICO_SHA",
    "portico_path": "$PORTICO_SRC",
    "rounds": $REPEAT,
    "scenarios": "$ONLY".split(","),
    "forced": bool($FORCED),
    "params": {"quick": $QUICK, "sat_secs": $SAT_SECS, "rate_secs": $RATE_SECS, "warmup_secs": $WARMUP_SECS,
               "conns": $CONNS, "rate": $RATE, "lat_rate": $LAT_RATE, "stime_secs": $STIME_SECS,
               "stime_clients": $STIME_CLIENTS, "h2_requests": $H2_REQUESTS,
               "proxy_core": $PROXY_CORE, "load_core": $LOAD_CORE},
    "tools": {"nginx": "$(nginx -v 2>&1 | sed 's/.*: //')", "haproxy": "$(haproxy -v 2>/dev/null | head -1 | awk '{ print $3 }')",
              "openssl": "$(openssl version | awk '{ print $2 }')", "wrk": "$(wrk -v 2>&1 | head -1 | awk '{ print $2 }')",
              "h2load": "$(h2load --version 2>/dev/null | awk '{ print $2 }')"},
    "jwt_bench": json.loads(sys.argv[2]),
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF
cp "$RESULTS" "$WORK/meta.json" "$RAW/" 2>/dev/null || true
for f in "$WORK"/*.out "$WORK"/*error.log; do
    [[ -s $f ]] && tail -n 50 "$f" >"$RAW/$(basename "$f").tail"
done
echo
$PY "$SCN/report.py" report "$RESULTS" "$WORK/meta.json" "$OUT"
log "JSON: $OUT/scenarios-$STAMP.json; table: $OUT/scenarios-table-$STAMP.md; raw: $RAW/"
