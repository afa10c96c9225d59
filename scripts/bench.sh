#!/usr/bin/env bash
# Measures the agent against the targets of its performance issue, on this machine, and prints
# each figure next to its target — as a ratio to what Redis itself does with the agent's own Lua
# script, so the figures mean the same on any machine.
#
#   bash scripts/bench.sh            # full run (a few minutes)
#   ITERATIONS=200 bash scripts/bench.sh
#
# It builds the release binary, starts its own Redis servers (one single, three for Redlock) and
# agents on free loopback ports, and stops all of them on exit. Needs redis-server,
# redis-benchmark, redis-cli, jq, curl and valgrind (installed from Debian's packages when
# missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

CLIENTS=${CLIENTS:-100}          # clients of every benchmark (the issue's figure)
ITERATIONS=${ITERATIONS:-300}    # per client: 1 + 2 x ITERATIONS requests
MANY_CLIENTS=${MANY_CLIENTS:-3000}
SHARED=${SHARED:-4}              # HTTP/2 connections shared by the clients in the multiplexed runs
POD_ITERATIONS=${POD_ITERATIONS:-2000}
REDIS_REQUESTS=${REDIS_REQUESTS:-300000}


missing=()
for tool in redis-server redis-benchmark redis-cli jq curl valgrind; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools jq curl valgrind
  $sudo service redis-server stop >/dev/null 2>&1 || true
fi

# 3000 clients hold 3000 connections, on each side.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

step "building the release binary"
cargo build --release --locked --quiet
AGENT=./target/release/election-agent

scratch_and_cleanup


# start_redis VAR: starts a Redis server and stores its port in VAR.
start_redis() {
  local port
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis-$port.log" </dev/null >/dev/null 2>&1 &
  PIDS+=($!)
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
  printf -v "$1" '%s' "$port"
}

# start_agent NAME REDIS_URLS: starts an agent, sets AGENT_PID, GRPC and HTTP. AGENT_WRAPPER, if
# set, is the command the agent runs under (valgrind).
start_agent() {
  GRPC=$(free_port)
  HTTP=$(free_port)
  # shellcheck disable=SC2086 # the wrapper is a command and its arguments
  env -i PATH="$PATH" EA_ENV=production EA_LOG_LEVEL=warning EA_NAME="$1" \
    EA_BIND_ADDRESS=127.0.0.1 EA_GRPC_PORT="$GRPC" EA_HTTP_PORT="$HTTP" EA_KUBE_ENABLE=false \
    EA_REDIS_URLS="$2" ${AGENT_WRAPPER:-} "$AGENT" </dev/null >"$WORK/agent-$1.log" 2>&1 &
  AGENT_PID=$!
  PIDS+=("$AGENT_PID")
  until curl -sf "http://127.0.0.1:$HTTP/readyz" >/dev/null 2>&1; do
    kill -0 "$AGENT_PID" 2>/dev/null || { cat "$WORK/agent-$1.log" >&2; exit 1; }
    sleep 0.1
  done
}

rss_mib() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

# cpu_ticks PID: the process's CPU time so far, user + system, in clock ticks (/proc/PID/stat
# fields 14 and 15; the command name, field 2, is in parentheses and may hold spaces).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

# children_cpu_us FILE: the CPU time, user + system, of this shell's waited-for children so far,
# in µs, from the second line of bash's `times` ("1m2.345s 0m0.678s") written to FILE: `times`
# must run in this shell itself (a command substitution would be a new one, without children).
children_cpu_us() {
  awk 'NR == 2 {
    split($1, u, /[ms]/); split($2, s, /[ms]/)
    printf "%d", ((u[1] + s[1]) * 60 + u[2] + s[2]) * 1000000 }' "$1"
}

# bench PID ARGS...: runs the agent benchmark against the agent PID, shows its text report on
# stderr and prints its JSON with the agent's CPU time per request added (`cpu_us_per_request`,
# µs of user + system time, from /proc/PID/stat before and after the run). With PID "self" the
# agent runs inside the benchmark's process (`bench pods`), and the figure is that process's:
# agent and load generator together.
bench() {
  local pid=$1 json before after us
  shift
  if [ "$pid" = self ]; then
    times >"$WORK/times-before"
    "$AGENT" bench "$@" --json >"$WORK/bench.json"
    times >"$WORK/times-after"
    us=$(($(children_cpu_us "$WORK/times-after") - $(children_cpu_us "$WORK/times-before")))
    json=$(cat "$WORK/bench.json")
  else
    before=$(cpu_ticks "$pid")
    json=$("$AGENT" bench "$@" --json)
    after=$(cpu_ticks "$pid")
    us=$(((after - before) * TICK_US))
  fi
  json=$(jq --argjson us "$us" '. + {cpu_us_per_request: (($us / .requests) * 10 | round / 10)}' <<<"$json")
  jq -r '"    \(.benchmark), \(.clients) clients over \(.connections) connections: \(.requests) requests, \(.requests_per_second | floor) requests/s, p50 \(.latency_ms.p50) ms, p90 \(.latency_ms.p90) ms, p99 \(.latency_ms.p99) ms, max \(.latency_ms.max) ms, errors \(.errors) \(.errors_by_kind), CPU \(.cpu_us_per_request) µs/request"' <<<"$json" >&2
  echo "$json"
}

# instructions NAME REDIS_URLS: sets INSTRUCTIONS to the agent's user-space instructions per gRPC
# request, counted by callgrind — unlike CPU time, much the same from run to run and on a busy
# machine, so it shows what a change did. The agent runs under valgrind (one thread at a time,
# some fifty times slower); the count covers a run of 50 clients after a warm-up, and includes
# what the agent does between requests (timers, housekeeping), shared out.
instructions() {
  local out="$WORK/callgrind-$1" json ir
  AGENT_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=$out" start_agent "callgrind-$1" "$2"
  "$AGENT" bench grpc --address "http://127.0.0.1:$GRPC" -c 20 -i 20 --json >/dev/null
  callgrind_control --zero "$AGENT_PID" >/dev/null 2>&1
  json=$("$AGENT" bench grpc --address "http://127.0.0.1:$GRPC" -c 50 -i 100 --json)
  callgrind_control --dump "$AGENT_PID" >/dev/null 2>&1
  kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
  ir=$(awk '/^summary:/ { print $2; exit }' "$(grep -l '^desc: Trigger: dump' "$out"*)")
  INSTRUCTIONS=$(jq -r --argjson ir "$ir" '($ir / .requests) | round' <<<"$json")
}

step "Redis: one server, and three for Redlock"
start_redis SINGLE
start_redis R1; start_redis R2; start_redis R3

step "redis-benchmark: EVALSHA of the agent's campaign script (src/store/redis/lease.lua), $CLIENTS clients"
SHA=$(redis-cli -p "$SINGLE" script load "$(cat src/store/redis/lease.lua)")
# Same shape as the agent's call: one key [prefix]/lease/[kind]/[election], then command,
# candidate, term, command id, the channel it announces changes on, the election's name and the
# retention (1 day, the default). The
# holder campaigns again (a renewal: the script's write path) on one of $CLIENTS elections; the
# id is random (one call in $CLIENTS repeats the last id of its election and takes the cheaper
# re-run path).
redis-benchmark -p "$SINGLE" -c "$CLIENTS" -n "$REDIS_REQUESTS" -r "$CLIENTS" --csv \
  evalsha "$SHA" 1 "ela/lease/bench/redis-benchmark-__rand_int__" campaign holder 10000 \
  "redis-benchmark:__rand_int__" ela/events "bench redis-benchmark" 86400000 \
  >"$WORK/redis-benchmark.csv"
REDIS_RPS=$(awk -F'"' 'NR == 2 { printf "%d", $4 }' "$WORK/redis-benchmark.csv")
echo "    redis-benchmark EVALSHA: $REDIS_RPS requests/s" >&2
redis-cli -p "$SINGLE" flushall >/dev/null

step "agent on one Redis server"
start_agent single "redis://127.0.0.1:$SINGLE"
sleep 1
IDLE_RSS=$(rss_mib "$AGENT_PID")
echo "    idle RSS: $IDLE_RSS MiB" >&2
GRPC_SINGLE=$(bench "$AGENT_PID" grpc --address "http://127.0.0.1:$GRPC" -c "$CLIENTS" -i "$ITERATIONS")
GRPC_SINGLE_MUX=$(bench "$AGENT_PID" grpc --address "http://127.0.0.1:$GRPC" -c "$CLIENTS" -i "$ITERATIONS" --connections "$SHARED")
HTTP_SINGLE=$(bench "$AGENT_PID" http --address "http://127.0.0.1:$HTTP" -c "$CLIENTS" -i "$ITERATIONS")
kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true

# many CONNECTIONS: peak RSS of a fresh agent while $MANY_CLIENTS gRPC clients share CONNECTIONS.
many() {
  start_agent "many-$1" "redis://127.0.0.1:$SINGLE"
  "$AGENT" bench grpc --address "http://127.0.0.1:$GRPC" -c "$MANY_CLIENTS" -i 20 --connections "$1" \
    --json >"$WORK/many-$1.json" &
  local bench_pid=$! peak=0
  while kill -0 "$bench_pid" 2>/dev/null; do
    peak=$(awk -v a="$peak" -v b="$(rss_mib "$AGENT_PID")" 'BEGIN { print (b > a ? b : a) }')
    sleep 0.1
  done
  wait "$bench_pid"
  jq -r '"    \(.clients) clients over \(.connections) connections: \(.requests) requests, \(.requests_per_second | floor) requests/s, p99 \(.latency_ms.p99) ms, errors \(.errors)"' "$WORK/many-$1.json" >&2
  echo "    peak RSS: $peak MiB" >&2
  kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
  PEAK_RSS=$peak
}
step "agent serving $MANY_CLIENTS concurrent gRPC clients, one connection each"
many "$MANY_CLIENTS"; PEAK_RSS_OWN=$PEAK_RSS
step "agent serving $MANY_CLIENTS concurrent gRPC clients over 100 connections"
many 100; PEAK_RSS_SHARED=$PEAK_RSS

step "agent on three Redis servers (Redlock)"
start_agent redlock "redis://127.0.0.1:$R1,redis://127.0.0.1:$R2,redis://127.0.0.1:$R3"
GRPC_REDLOCK=$(bench "$AGENT_PID" grpc --address "http://127.0.0.1:$GRPC" -c "$CLIENTS" -i "$ITERATIONS")
GRPC_REDLOCK_MUX=$(bench "$AGENT_PID" grpc --address "http://127.0.0.1:$GRPC" -c "$CLIENTS" -i "$ITERATIONS" --connections "$SHARED")
HTTP_REDLOCK=$(bench "$AGENT_PID" http --address "http://127.0.0.1:$HTTP" -c "$CLIENTS" -i "$ITERATIONS")
kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true

step "agent instructions per gRPC request (callgrind; one Redis server, then Redlock)"
instructions single "redis://127.0.0.1:$SINGLE"; INSTRUCTIONS_SINGLE=$INSTRUCTIONS
instructions redlock "redis://127.0.0.1:$R1,redis://127.0.0.1:$R2,redis://127.0.0.1:$R3"
INSTRUCTIONS_REDLOCK=$INSTRUCTIONS
echo "    one Redis: $INSTRUCTIONS_SINGLE, Redlock: $INSTRUCTIONS_REDLOCK instructions per request (user space)" >&2

step "GetPods from the caches: a 50-pod Deployment, $CLIENTS clients (in-process agent)"
PODS=$(bench self pods -c "$CLIENTS" -i "$POD_ITERATIONS" --pods 50)

rps() { jq -r '.requests_per_second | floor' <<<"$1"; }
p99() { jq -r '.latency_ms.p99' <<<"$1"; }
errors() { jq -r '.errors' <<<"$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
verdict() { awk -v v="$1" -v t="$2" -v dir="$3" 'BEGIN { ok = (dir == "min") ? v >= t : v <= t; print ok ? "met" : "NOT met" }'; }

row() { printf '%-38s %-26s %-16s %s\n' "$@"; }
echo
echo "Results ($(nproc) cores; Redis, agent and load generator on this machine; $CLIENTS clients)"
row "measure" "figure" "target" "verdict"
row "redis-benchmark EVALSHA" "$REDIS_RPS req/s" "(baseline)" ""
for mode in single redlock; do
  if [ "$mode" = single ]; then g=$GRPC_SINGLE m=$GRPC_SINGLE_MUX h=$HTTP_SINGLE min=0.5; else g=$GRPC_REDLOCK m=$GRPC_REDLOCK_MUX h=$HTTP_REDLOCK min=0.3; fi
  r=$(ratio "$(rps "$g")" "$REDIS_RPS")
  row "gRPC $mode" "$(rps "$g") req/s = $r x" ">= $min x redis" "$(verdict "$r" "$min" min)"
  r=$(ratio "$(rps "$m")" "$REDIS_RPS")
  row "gRPC $mode, $SHARED connections" "$(rps "$m") req/s = $r x" ">= $min x redis" "$(verdict "$r" "$min" min)"
  r=$(ratio "$(rps "$h")" "$(rps "$g")")
  row "HTTP $mode" "$(rps "$h") req/s = $r x gRPC" ">= 0.8 x gRPC" "$(verdict "$r" 0.8 min)"
done
row "gRPC single p99" "$(p99 "$GRPC_SINGLE") ms" "<= 5 ms" "$(verdict "$(p99 "$GRPC_SINGLE")" 5 max)"
row "gRPC single p99, $SHARED connections" "$(p99 "$GRPC_SINGLE_MUX") ms" "<= 5 ms" "$(verdict "$(p99 "$GRPC_SINGLE_MUX")" 5 max)"
row "GetPods (50 pods)" "$(rps "$PODS") req/s" ">= 20000 req/s" "$(verdict "$(rps "$PODS")" 20000 min)"
cpu() { jq -r '.cpu_us_per_request' <<<"$1"; }
row "agent CPU/request, gRPC single" "$(cpu "$GRPC_SINGLE") µs" "(halve)" ""
row "agent CPU/request, gRPC single, $SHARED c." "$(cpu "$GRPC_SINGLE_MUX") µs" "" ""
row "agent CPU/request, HTTP single" "$(cpu "$HTTP_SINGLE") µs" "" ""
row "agent CPU/request, gRPC redlock" "$(cpu "$GRPC_REDLOCK") µs" "(halve)" ""
row "agent CPU/request, gRPC redlock, $SHARED c." "$(cpu "$GRPC_REDLOCK_MUX") µs" "" ""
row "agent CPU/request, HTTP redlock" "$(cpu "$HTTP_REDLOCK") µs" "" ""
row "GetPods CPU/request (agent+client)" "$(cpu "$PODS") µs" "" ""
row "instructions/request, gRPC single" "$INSTRUCTIONS_SINGLE" "(callgrind)" ""
row "instructions/request, gRPC redlock" "$INSTRUCTIONS_REDLOCK" "(callgrind)" ""
row "RSS idle" "$IDLE_RSS MiB" "<= 16 MiB" "$(verdict "$IDLE_RSS" 16 max)"
row "RSS, $MANY_CLIENTS clients, own conn." "$PEAK_RSS_OWN MiB" "<= 64 MiB" "$(verdict "$PEAK_RSS_OWN" 64 max)"
row "RSS, $MANY_CLIENTS clients, 100 conn." "$PEAK_RSS_SHARED MiB" "<= 64 MiB" "$(verdict "$PEAK_RSS_SHARED" 64 max)"
total_errors=0
for j in "$GRPC_SINGLE" "$GRPC_SINGLE_MUX" "$HTTP_SINGLE" "$GRPC_REDLOCK" "$GRPC_REDLOCK_MUX" \
  "$HTTP_REDLOCK" "$PODS" "$(cat "$WORK/many-$MANY_CLIENTS.json")" "$(cat "$WORK/many-100.json")"; do
  total_errors=$((total_errors + $(errors "$j")))
done
row "failed requests (all runs)" "$total_errors" "0" "$(verdict "$total_errors" 0 max)"
