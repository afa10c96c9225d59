#!/usr/bin/env bash
# Measures that the agent's and the store's state stay bounded whatever names clients send, and
# what a listing costs — the figures of the bounded-state issue, with the release binary:
#
#   bash scripts/bounded-state.sh          # about six minutes
#
# For one Redis server and for the memory store:
#   1. 100,000 campaigns on distinct names with 1 s terms (`election-agent bench names`), with
#      EA_LEASE_RETENTION=5s; then, once the terms, the retention and the minute the agent
#      remembers announcements are over, Redis' DBSIZE and the agent's RSS against where they
#      started (after a warm-up), and a new campaign on a name used before gets a higher token;
#   2. a kind with 100,000 records of ended leases and 10 live leases: ListLeaders' time; then
#      with 200,000, five listings while 20 gRPC clients campaign and renew: each listing's time,
#      the agent's RSS and the clients' failed requests.
#
# It builds the release binary, starts its own Redis server and agents on free loopback ports and
# stops them on exit. Needs redis-server, redis-cli, jq and curl (installed from Debian's packages
# when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

RETENTION=${RETENTION:-5}   # seconds
FLOOD=${FLOOD:-100000}      # campaigns on distinct names
FLOOD_CLIENTS=8


missing=()
for tool in redis-server redis-cli jq curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools jq curl
  $sudo service redis-server stop >/dev/null 2>&1 || true
fi

step "building the release binary"
cargo build --release --locked --quiet
AGENT=./target/release/election-agent

scratch_and_cleanup


REDIS=$(free_port)
redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$WORK" --logfile "$WORK/redis.log" </dev/null >/dev/null 2>&1 &
PIDS+=($!)
until redis-cli -p "$REDIS" ping >/dev/null 2>&1; do sleep 0.05; done

# start_agent MODE RETENTION: starts an agent on the memory store or the Redis server.
start_agent() {
  GRPC=$(free_port)
  HTTP=$(free_port)
  local store=(EA_REDIS_MODE=memory)
  [ "$1" = memory ] || store=(EA_REDIS_URLS="redis://127.0.0.1:$REDIS")
  env -i PATH="$PATH" EA_ENV=production EA_LOG_LEVEL=warning EA_BIND_ADDRESS=127.0.0.1 \
    EA_GRPC_PORT="$GRPC" EA_HTTP_PORT="$HTTP" EA_KUBE_ENABLE=false "${store[@]}" \
    EA_LEASE_RETENTION="$2" "$AGENT" </dev/null >"$WORK/agent-$1.log" 2>&1 &
  AGENT_PID=$!
  PIDS+=("$AGENT_PID")
  until curl -sf "http://127.0.0.1:$HTTP/readyz" >/dev/null 2>&1; do
    kill -0 "$AGENT_PID" 2>/dev/null || { cat "$WORK/agent-$1.log" >&2; exit 1; }
    sleep 0.1
  done
}
stop_agent() { kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true; }

rss_mib() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$AGENT_PID/status"; }
dbsize() { if [ "$1" = memory ]; then echo "-"; else redis-cli -p "$REDIS" dbsize; fi; }
# names KIND COUNT: COUNT campaigns with 1 s terms on distinct names of KIND; prints the report.
names() {
  "$AGENT" bench names --address "http://127.0.0.1:$GRPC" -c "$FLOOD_CLIENTS" \
    -i $(($2 / FLOOD_CLIENTS)) --term 1000 --kind "$1" --json 2>/dev/null
}
# campaign KIND NAME TERM_MS: campaigns over HTTP; prints the answer.
campaign() {
  curl -sf -XPOST -H 'Content-Type: application/json' \
    -d "{\"candidate\":\"probe\",\"term\":$3}" "http://127.0.0.1:$HTTP/election/$1/$2"
}
# listing KIND: lists KIND over HTTP; prints "<milliseconds> <leaders>".
listing() {
  local ms
  ms=$(curl -sf -o "$WORK/list.json" -w '%{time_total}' "http://127.0.0.1:$HTTP/election/$1" |
    awk '{ printf "%.1f", $1 * 1000 }')
  echo "$ms $(jq '.leaders | length' "$WORK/list.json")"
}
within() { awk -v a="$1" -v b="$2" -v pct="$3" 'BEGIN { print (a <= b * (1 + pct / 100)) ? "met" : "NOT met" }'; }
row() { printf '%-8s %-58s %s\n' "$@"; }
RESULTS=()

for mode in single memory; do
  step "$mode: $FLOOD campaigns on distinct names, 1 s terms, EA_LEASE_RETENTION=${RETENTION}s"
  redis-cli -p "$REDIS" flushall >/dev/null
  start_agent "$mode" "${RETENTION}s"
  # Warm-up: the code paths and connections a campaign needs, then the name used again below.
  names warmup 800 >/dev/null
  first=$(campaign flood probe 1000 | jq .fencing_token)
  sleep 2
  start_rss=$(rss_mib); start_keys=$(dbsize "$mode")
  echo "    start: DBSIZE $start_keys, agent RSS $start_rss MiB" >&2
  report=$(names flood "$FLOOD")
  jq -r '"    \(.requests) campaigns, \(.requests_per_second | floor) requests/s, errors \(.errors)"' <<<"$report" >&2
  echo "    after the campaigns: DBSIZE $(dbsize "$mode"), agent RSS $(rss_mib) MiB" >&2
  # Terms end after 1 s, records go a retention later; the agent forgets announcements after a
  # minute, checked every 10 s.
  sleep $((RETENTION + 75))
  end_rss=$(rss_mib); end_keys=$(dbsize "$mode")
  echo "    $((RETENTION + 75)) s later: DBSIZE $end_keys, agent RSS $end_rss MiB" >&2
  again=$(campaign flood probe 1000 | jq .fencing_token)
  echo "    a campaign on a name used before: token $again, after $first" >&2
  stop_agent
  RESULTS+=("$(row "$mode" "RSS $start_rss -> $end_rss MiB (within 10 %)" "$(within "$end_rss" "$start_rss" 10)")")
  if [ "$mode" = single ]; then
    RESULTS+=("$(row "$mode" "DBSIZE $start_keys -> $end_keys (within 10 %)" "$(within "$end_keys" "$start_keys" 10)")")
  fi
  RESULTS+=("$(row "$mode" "token $first -> $again (higher)" "$([ "$again" -gt "$first" ] && echo met || echo "NOT met")")")
  RESULTS+=("$(row "$mode" "failed campaigns: $(jq .errors <<<"$report") (0)" "$([ "$(jq .errors <<<"$report")" = 0 ] && echo met || echo "NOT met")")")

  step "$mode: listing a kind with records of ended leases and 10 live leases"
  redis-cli -p "$REDIS" flushall >/dev/null
  start_agent "$mode" 1d
  names big 100000 >/dev/null
  for i in $(seq 0 9); do campaign big "live$i" 600000 >/dev/null; done
  sleep 2
  slowest=0
  for n in 1 2 3 4 5; do
    read -r ms count < <(listing big)
    echo "    100,000 ended + 10 live: listed $count in $ms ms" >&2
    [ "$count" = 10 ] || { echo "    expected 10 leaders" >&2; exit 1; }
    slowest=$(awk -v a="$slowest" -v b="$ms" 'BEGIN { print (b > a ? b : a) }')
  done
  RESULTS+=("$(row "$mode" "listing, 100,000 ended + 10 live: slowest $slowest ms (< 10 ms)" "$(awk -v v="$slowest" 'BEGIN { print v < 10 ? "met" : "NOT met" }')")")
  names big 100000 >/dev/null
  sleep 2
  before_rss=$(rss_mib)
  "$AGENT" bench grpc --address "http://127.0.0.1:$GRPC" -c 20 -i 400 --json >"$WORK/load.json" 2>/dev/null &
  load=$!
  sleep 0.5
  slowest=0; peak_rss=$before_rss
  for n in 1 2 3 4 5; do
    read -r ms count < <(listing big)
    echo "    200,000 ended + 10 live, under load: listed $count in $ms ms" >&2
    [ "$count" = 10 ] || { echo "    expected 10 leaders" >&2; exit 1; }
    slowest=$(awk -v a="$slowest" -v b="$ms" 'BEGIN { print (b > a ? b : a) }')
    peak_rss=$(awk -v a="$peak_rss" -v b="$(rss_mib)" 'BEGIN { print (b > a ? b : a) }')
  done
  wait "$load"
  load_errors=$(jq .errors "$WORK/load.json")
  echo "    concurrent load: $(jq .requests "$WORK/load.json") requests, errors $load_errors; RSS $before_rss -> at most $peak_rss MiB" >&2
  stop_agent
  RESULTS+=("$(row "$mode" "listing, 200,000 ended + 10 live, under load: slowest $slowest ms (< 100 ms)" "$(awk -v v="$slowest" 'BEGIN { print v < 100 ? "met" : "NOT met" }')")")
  RESULTS+=("$(row "$mode" "RSS while listing $before_rss -> $peak_rss MiB (within 20 %)" "$(within "$peak_rss" "$before_rss" 20)")")
  RESULTS+=("$(row "$mode" "failed concurrent requests: $load_errors (0)" "$([ "$load_errors" = 0 ] && echo met || echo "NOT met")")")
done

echo
echo "Results ($(nproc) cores; Redis, agent and load generator on this machine)"
printf '%s\n' "${RESULTS[@]}"
