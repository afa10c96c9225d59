#!/usr/bin/env bash
# The soak of the hardening issue: steady leadership traffic with Observe and watch streams,
# while Redis and an agent are restarted under it, on loopback:
#
#   bash scripts/soak.sh        # 10 minutes; or SOAK_MINUTES=3, or: bash scripts/soak.sh 3
#
#   1. one Redis server (no persistence by default: a restart loses every lease — the hard case
#      for fencing tokens; REDIS_PERSISTENCE=aof keeps them) and two agents on it: `restarted`,
#      restarted every minute, and `steady`, never restarted (see "memory" below);
#   2. `election-agent bench soak` for the whole run: candidates over gRPC and REST campaign,
#      extend, resign and hand over across a set of elections, through both agents; one Observe
#      (gRPC) and one watch (SSE) stream per election, opened again whenever they end; failures
#      counted by kind, never fatal; every fencing token any client sees checked against those
#      seen before (it must never go backwards);
#   3. meanwhile, at :30 of every minute, Redis is stopped (SIGTERM), left down REDIS_DOWN_SECONDS
#      and started again on the same port; at :00 of every minute after the first, the restarted
#      agent gets SIGTERM, is waited for and started again on the same ports;
#   4. the report: requests and failures by kind, streams and their reconnections, token
#      regressions, and each agent's RSS (VmRSS, every 2 s) — per-minute medians and a trend.
#
# Memory: an agent restarted every minute starts afresh each minute, so a slope through all its
# samples would only draw the saw of its restarts, and a leak could never outgrow a minute. Hence
# two figures: `restarted` is compared across incarnations at the same age (40-55 s: after the
# Redis restart it lived through, before its own), which shows whether a fresh agent settles
# higher as the run goes on; `steady` lives through every Redis restart and every reconnecting
# stream, and its slope after the warm-up (WARM_UP, 2m) is the leak figure. The limit
# (RSS_SLOPE_LIMIT, 0.5 MB/min) is 4 MB over the 8 minutes judged: 20 % of the ~20 MB the agent
# holds under this load, the bar scripts/flood.sh sets for memory back at its start. It is well
# above the noise (the allocator's arenas move RSS by a megabyte or two between samples, which
# moves a least-squares slope over 8 minutes by a few hundredths of a MB/min) and fine enough for
# what matters: at the soak's ~27,000 requests a minute it is ~20 bytes per request.
#
# It fails (exit 1) on a token regression, an RSS trend above the limit, a minute without any
# successful request, an unexpected failure (e.g. INTERNAL, HTTP 500), a stream version that did
# not increase, an agent that does not exit 0 on SIGTERM, or a panic in an agent's log.
#
# Needs redis-server, redis-cli and curl (Debian's; installed when missing). Builds the release
# binary, unless AGENT names one. Leaves the report's JSON and the logs in target/soak/.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

SOAK_MINUTES=${1:-${SOAK_MINUTES:-10}}
REDIS_DOWN_SECONDS=${REDIS_DOWN_SECONDS:-2}
REDIS_PERSISTENCE=${REDIS_PERSISTENCE:-none}   # none | aof
WARM_UP=${WARM_UP:-2m}
RSS_SLOPE_LIMIT=${RSS_SLOPE_LIMIT:-0.5}         # MB (10^6 bytes) per minute
# As the container image runs it (Dockerfile), like scripts/flood.sh. AGENT_TUNABLES= (empty)
# measures without.
AGENT_TUNABLES=${AGENT_TUNABLES-glibc.malloc.tcache_count=0}
# More options for `election-agent bench soak` (e.g. "--elections 32 --pause 50ms").
SOAK_ARGS=${SOAK_ARGS:-}

if ! [[ "$SOAK_MINUTES" =~ ^[1-9][0-9]*$ ]]; then
  echo "soak: minutes must be a whole number from 1, not \"$SOAK_MINUTES\"" >&2
  exit 2
fi
case "$REDIS_PERSISTENCE" in
  none) persistence=(--save '' --appendonly no) ;;
  aof) persistence=(--save '' --appendonly yes --appendfsync everysec) ;;
  *) echo "soak: REDIS_PERSISTENCE is none or aof" >&2; exit 2 ;;
esac

missing=()
for tool in redis-server redis-cli curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  apt_install redis-server redis-tools curl
  as_root service redis-server stop >/dev/null 2>&1 || true
fi

if [ -z "${AGENT:-}" ]; then
  step "building the release binary"
  cargo build --release --locked --quiet
  AGENT=${CARGO_TARGET_DIR:-target}/release/election-agent
fi

scratch_and_cleanup
mkdir -p "$WORK/redis"

# Microseconds since the epoch, and a sleep until such an instant.
now_us() { local t=${EPOCHREALTIME//[.,]/}; echo $((10#$t)); }
sleep_until() {
  local left=$(($1 - $(now_us)))
  if [ "$left" -gt 0 ]; then sleep "$((left / 1000000)).$(printf '%06d' $((left % 1000000)))"; fi
}
START_US=$(now_us)
# Seconds since the soak's load started (or since the script did, before it).
clock() { local us=$(($(now_us) - START_US)); printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000)); }
log() { printf '%7s s  %s\n' "$(clock)" "$*" >&2; }
forget() { local keep=() pid; for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done; PIDS=("${keep[@]}"); }

REDIS_PORT=$(free_port)
start_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 "${persistence[@]}" --dir "$WORK/redis" \
    --logfile "$WORK/redis.log" </dev/null >/dev/null 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done
}

declare -A AGENT_PID GRPC HTTP
AGENT_FAILURES=0
# start_agent NAME: starts (again) the agent NAME on its ports and writes its pid file.
start_agent() {
  local name=$1
  : "${GRPC[$name]:=$(free_port)}" "${HTTP[$name]:=$(free_port)}"
  env -i PATH="$PATH" GLIBC_TUNABLES="$AGENT_TUNABLES" EA_ENV=production EA_LOG_LEVEL=warning \
    EA_NAME="soak-$name" EA_BIND_ADDRESS=127.0.0.1 EA_GRPC_PORT="${GRPC[$name]}" \
    EA_HTTP_PORT="${HTTP[$name]}" EA_KUBE_ENABLE=false EA_REDIS_MODE=single \
    EA_REDIS_URLS="redis://127.0.0.1:$REDIS_PORT" "$AGENT" </dev/null >>"$WORK/agent-$name.log" 2>&1 &
  AGENT_PID[$name]=$!
  PIDS+=("${AGENT_PID[$name]}")
  echo "${AGENT_PID[$name]}" >"$WORK/$name.pid.new"
  mv "$WORK/$name.pid.new" "$WORK/$name.pid"
  local waited=0
  until curl -sf "http://127.0.0.1:${HTTP[$name]}/readyz" >/dev/null 2>&1; do
    if ! kill -0 "${AGENT_PID[$name]}" 2>/dev/null; then
      echo "soak: agent $name exited at start" >&2
      tail -n 20 "$WORK/agent-$name.log" >&2
      exit 1
    fi
    waited=$((waited + 1))
    if [ "$waited" -gt 300 ]; then log "agent $name not ready after 30 s; going on"; return; fi
    sleep 0.1
  done
}
# stop_agent NAME: SIGTERM, and waits for it to exit.
stop_agent() {
  local name=$1 pid=${AGENT_PID[$1]} status=0
  kill -TERM "$pid" 2>/dev/null || log "agent $name had exited before its SIGTERM"
  wait "$pid" || status=$?
  forget "$pid"
  if [ "$status" -ne 0 ]; then
    AGENT_FAILURES=$((AGENT_FAILURES + 1))
    log "agent $name exited $status on SIGTERM"
  fi
}

step "Redis on 127.0.0.1:$REDIS_PORT (persistence: $REDIS_PERSISTENCE); agents restarted and steady"
start_redis
start_agent restarted
start_agent steady
for name in restarted steady; do
  echo "    $name: gRPC 127.0.0.1:${GRPC[$name]}, HTTP 127.0.0.1:${HTTP[$name]}, pid ${AGENT_PID[$name]}" >&2
done

step "soak: $SOAK_MINUTES minute(s); Redis restarted at :30 of every minute, the restarted agent at :00"
# shellcheck disable=SC2086 # SOAK_ARGS is a list of options
"$AGENT" bench soak \
  --grpc-address "http://127.0.0.1:${GRPC[restarted]},http://127.0.0.1:${GRPC[steady]}" \
  --http-address "http://127.0.0.1:${HTTP[restarted]},http://127.0.0.1:${HTTP[steady]}" \
  --duration "${SOAK_MINUTES}m" \
  --watch-rss "restarted=$WORK/restarted.pid" --watch-rss "steady=$WORK/steady.pid" \
  --warm-up "$WARM_UP" --phase-from 40s --phase-to 55s --max-rss-slope "$RSS_SLOPE_LIMIT" \
  --json-file "$WORK/soak.json" $SOAK_ARGS >"$WORK/soak.txt" &
BENCH=$!
PIDS+=("$BENCH")
START_US=$(now_us)

redis_restarts=0
agent_restarts=0
for ((half = 1; half < 2 * SOAK_MINUTES; half++)); do
  sleep_until $((START_US + half * 30000000))
  kill -0 "$BENCH" 2>/dev/null || break
  if [ $((half % 2)) -eq 1 ]; then
    t0=$(now_us)
    kill -TERM "$REDIS_PID" 2>/dev/null || log "Redis had exited before its SIGTERM"
    wait "$REDIS_PID" || true
    forget "$REDIS_PID"
    sleep "$REDIS_DOWN_SECONDS"
    start_redis
    redis_restarts=$((redis_restarts + 1))
    log "Redis restarted: down $(( ($(now_us) - t0) / 1000 )) ms"
  else
    t0=$(now_us)
    stop_agent restarted
    t1=$(now_us)
    start_agent restarted
    agent_restarts=$((agent_restarts + 1))
    log "agent restarted: stopped in $(( (t1 - t0) / 1000 )) ms, ready again $(( ($(now_us) - t0) / 1000 )) ms after SIGTERM (pid ${AGENT_PID[restarted]})"
  fi
done

status=0
wait "$BENCH" || status=$?
forget "$BENCH"
for name in restarted steady; do stop_agent "$name"; done

echo
echo "soak: $SOAK_MINUTES min, $redis_restarts Redis restarts (persistence: $REDIS_PERSISTENCE, down ${REDIS_DOWN_SECONDS}s each), $agent_restarts agent restarts (SIGTERM, then started again)"
cat "$WORK/soak.txt"
# Kept for a look afterwards (target/ is outside the sources): the report's JSON and the logs.
rm -rf target/soak
mkdir -p target/soak
cp "$WORK/soak.json" target/soak/report.json 2>/dev/null || true
cp "$WORK"/agent-*.log "$WORK/redis.log" target/soak/
for name in restarted steady; do
  errors=$(grep -c '"level":"ERROR"' "$WORK/agent-$name.log" || true)
  panics=$(grep -c 'panicked' "$WORK/agent-$name.log" || true)
  echo "agent $name log: $errors ERROR line(s), $panics panic(s)"
  [ "$panics" -eq 0 ] || status=1
done
if [ "$AGENT_FAILURES" -gt 0 ]; then
  echo "FAIL: $AGENT_FAILURES agent exit(s) other than 0 on SIGTERM"
  status=1
fi
if [ "$status" -ne 0 ]; then
  for name in restarted steady; do
    echo "--- last lines of agent $name's log"
    tail -n 10 "$WORK/agent-$name.log"
  done
  echo "soak: FAILED"
  exit 1
fi
echo "soak: OK (report and logs: target/soak/)"
