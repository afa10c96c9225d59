#!/usr/bin/env bash
# The connection flood of the hardening issue, against the release binary with its default
# limits, on loopback:
#
#   bash scripts/flood.sh          # about two minutes; CONNECTIONS=20000 FLOOD_SECONDS=60
#
#   1. an agent (memory store) starts; its RSS and open descriptors are read after a warm-up
#      (requests, and a flood of 1,000 connections for 3 s);
#   2. two flood processes each keep CONNECTIONS/2 connections open, half on each port: on the
#      gRPC port idle ones (connect, send nothing) and silent HTTP/2 ones (the preface and
#      SETTINGS, then nothing, PINGs unanswered); on the HTTP port idle ones and slowloris ones
#      (headers, one more byte every second, never ending). Whenever the agent closes one, the
#      flooder opens another RECONNECT_SECONDS later (1; 0: at once, a connection storm as fast
#      as the flooders' CPU allows), so the pressure lasts;
#   3. meanwhile, twice a second, fresh clients ask: GET /livez and a REST campaign (curl, each a
#      new connection), a gRPC campaign (`election-agent client`, a new process and connection —
#      its time includes the process start); each answer's status and time are kept;
#   4. the agent's RSS and descriptors during the flood; the flood stops; after the agent's
#      housekeeping (10 s), its RSS against where it started.
#
# It fails if a probe fails or takes more than PROBE_LIMIT_MS (100), if the agent holds more
# connections than its caps allow, or if RSS after the flood is more than 20 % above the start.
# Needs curl and python3 (Debian's; installed when missing). Builds the release binary, unless
# AGENT names one.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

CONNECTIONS=${CONNECTIONS:-20000}     # held by the two flood processes together
FLOOD_SECONDS=${FLOOD_SECONDS:-60}
RECONNECT_SECONDS=${RECONNECT_SECONDS:-1}
FLOOD_NICE=${FLOOD_NICE:-10}
# As the container image runs it (Dockerfile): without glibc's per-thread caches, which pin
# pages of freed memory. AGENT_TUNABLES= (empty) measures without.
AGENT_TUNABLES=${AGENT_TUNABLES-glibc.malloc.tcache_count=0}
PROBE_LIMIT_MS=${PROBE_LIMIT_MS:-100}


missing=()
for tool in curl python3; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl python3
fi

per_flooder=$((CONNECTIONS / 2))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((per_flooder + 100)) ]; then
  echo "flood: each flood process needs $((per_flooder + 100)) descriptors; ulimit -n is $(ulimit -n)" >&2
  exit 1
fi

if [ -z "${AGENT:-}" ]; then
  step "building the release binary"
  cargo build --release --locked --quiet
  AGENT=./target/release/election-agent
fi

scratch_and_cleanup
FLOODERS=()


rss_mb() { awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
anon_mb() { awk '/RssAnon/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
cpu_seconds() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
descriptors() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

cat >"$WORK/flood.py" <<'PY'
"""Keeps connections of the given kinds open to the agent; reopens each one the agent closes."""
import collections, json, selectors, socket, sys, time

host = "127.0.0.1"
grpc, http, count, seconds, reconnect = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                         float(sys.argv[4]), float(sys.argv[5]))
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
KINDS = [(grpc, "idle"), (grpc, "h2-silent"), (http, "idle"), (http, "slowloris")]
sel = selectors.DefaultSelector()
stats = {"opened": 0, "closed_by_agent": 0, "connect_failed": 0}
slow = set()
reopen = collections.deque()  # (when, port, kind), in time order

def open_one(port, kind):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((host, port))
    sel.register(s, selectors.EVENT_WRITE, (port, kind, "connecting"))

def closed(s, port, kind, reason):
    sel.unregister(s)
    slow.discard(s)
    s.close()
    stats[reason] += 1
    reopen.append((time.monotonic() + reconnect, port, kind))

for i in range(count):
    open_one(*KINDS[i % len(KINDS)])
end = time.monotonic() + seconds
next_trickle = next_report = time.monotonic() + 1
while time.monotonic() < end:
    for key, events in sel.select(timeout=0.2):
        s, (port, kind, state) = key.fileobj, key.data
        if state == "connecting":
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                closed(s, port, kind, "connect_failed")
                continue
            stats["opened"] += 1
            try:
                if kind == "h2-silent":
                    s.send(PREFACE)
                elif kind == "slowloris":
                    s.send(b"GET /livez HTTP/1.1\r\nHost: agent\r\n")
                    slow.add(s)
            except OSError:
                closed(s, port, kind, "closed_by_agent")
                continue
            sel.modify(s, selectors.EVENT_READ, (port, kind, "open"))
        else:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                closed(s, port, kind, "closed_by_agent")
    now = time.monotonic()
    while reopen and reopen[0][0] <= now:
        _, port, kind = reopen.popleft()
        open_one(port, kind)
    if now >= next_trickle:
        next_trickle = now + 1
        for s in list(slow):
            try:
                s.send(b"X")
            except OSError:
                pass
    if now >= next_report:
        next_report = now + 5
        print(json.dumps({"open": len(sel.get_map()), **stats}), file=sys.stderr, flush=True)
print(json.dumps({"open": len(sel.get_map()), **stats}))
PY

cat >"$WORK/probe.py" <<'PY'
"""Every INTERVAL seconds, as a fresh client (a new connection each): GET /livez, a REST
campaign, and a gRPC campaign spoken by hand over HTTP/2 (no gRPC library needed). Prints, per
probe, how many answered within LIMIT ms, and p50/p99/max; exits 1 if any did not."""
import socket, struct, sys, time

host = "127.0.0.1"
grpc, http, seconds, interval, limit = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                                        float(sys.argv[4]), float(sys.argv[5]))

def http_call(request):
    with socket.create_connection((host, http), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b" ", 2)[1] == b"200"

def livez(_):
    return http_call(b"GET /livez HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")

def rest_campaign(i):
    body = b'{"candidate":"probe","term":10000}'
    return http_call(b"POST /election/flood/rest-%d HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (i, len(body), body))

def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

def literal(name_index, value, name=b""):
    # HPACK literal without indexing (no Huffman): indexed name, or a new one when index is 0.
    head = bytes([0x0F, name_index - 15]) if name_index >= 15 else bytes([name_index])
    new_name = bytes([len(name)]) + name if name_index == 0 else b""
    return head + new_name + bytes([len(value)]) + value

def grpc_campaign(i):
    election = b"grpc-%d" % i
    message = (b"\x0a" + bytes([len(election)]) + election + b"\x12\x05probe" + b"\x18\x90\x4e")
    headers = (b"\x83\x86" + literal(4, b"/grpc.election_agent.v1.Election/Campaign")
               + literal(1, b"agent") + literal(31, b"application/grpc") + literal(0, b"trailers", b"te"))
    with socket.create_connection((host, grpc), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(1, 4, 1, headers)
                  + frame(0, 1, 1, b"\x00" + struct.pack(">I", len(message)) + message))
        data, answered = b"", False
        while True:
            while len(data) >= 9 and len(data) >= 9 + int.from_bytes(data[:3], "big"):
                length, kind, flags = int.from_bytes(data[:3], "big"), data[3], data[4]
                stream = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
                if stream == 1 and kind == 0 and length > 5:
                    answered = True     # a CampaignResult; errors come as trailers only
                if stream == 1 and flags & 1:
                    return answered
                data = data[9 + length:]
            chunk = s.recv(65536)
            if not chunk:
                return False
            data += chunk

PROBES = [("livez", livez), ("rest-campaign", rest_campaign), ("grpc-campaign", grpc_campaign)]
times = {name: [] for name, _ in PROBES}
failed = {name: 0 for name, _ in PROBES}
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
    i += 1
    for name, probe in PROBES:
        start = time.monotonic()
        try:
            ok = probe(i)
        except OSError:
            ok = False
        ms = (time.monotonic() - start) * 1000
        times[name].append(ms)
        if not ok or ms > limit:
            failed[name] += 1
    time.sleep(interval)
for name, _ in PROBES:
    t = sorted(times[name])
    pick = lambda q: t[min(len(t) - 1, int(q * len(t)))]
    print(f"{name:14} {len(t):4} probes, {failed[name]} failed or over {limit:.0f} ms; "
          f"p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {t[-1]:.1f} ms")
sys.exit(1 if any(failed.values()) else 0)
PY

GRPC=$(free_port)
HTTP=$(free_port)
env -i PATH="$PATH" GLIBC_TUNABLES="$AGENT_TUNABLES" EA_ENV=production EA_LOG_LEVEL=info EA_BIND_ADDRESS=127.0.0.1 \
  EA_GRPC_PORT="$GRPC" EA_HTTP_PORT="$HTTP" EA_KUBE_ENABLE=false EA_REDIS_MODE=memory \
  "$AGENT" </dev/null >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
until curl -sf "http://127.0.0.1:$HTTP/livez" >/dev/null 2>&1; do sleep 0.05; done

step "warm-up"
"$AGENT" bench grpc --address "http://127.0.0.1:$GRPC" -c 10 -i 200 --json >/dev/null
"$AGENT" bench http --address "http://127.0.0.1:$HTTP" -c 10 -i 200 --json >/dev/null
# A small flood first, so that the code and the allocator's per-thread arenas a flood needs are
# in place before the start is measured: what the big one leaves behind is then its own.
python3 "$WORK/flood.py" "$GRPC" "$HTTP" 1000 3 1 >/dev/null 2>&1
sleep 12   # one housekeeping round
rss_start=$(rss_mb "$AGENT_PID")
anon_start=$(anon_mb "$AGENT_PID")
fds_start=$(descriptors "$AGENT_PID")
echo "agent at rest: RSS $rss_start MB, $fds_start descriptors" >&2

step "flood: $CONNECTIONS connections from two processes for ${FLOOD_SECONDS}s; probes twice a second"
for n in 1 2; do
  nice -n "$FLOOD_NICE" python3 "$WORK/flood.py" "$GRPC" "$HTTP" "$per_flooder" "$FLOOD_SECONDS" "$RECONNECT_SECONDS" \
    >"$WORK/flood-$n.json" 2>"$WORK/flood-$n.log" &
  PIDS+=($!)
  FLOODERS+=($!)
done
sleep 5   # let the flood reach the caps

peak_fds=0
peak_rss=0
cpu_start=$(cpu_seconds "$AGENT_PID")
python3 "$WORK/probe.py" "$GRPC" "$HTTP" "$((FLOOD_SECONDS - 10))" 0.5 "$PROBE_LIMIT_MS" \
  >"$WORK/probes.txt" &
PROBER=$!
PIDS+=("$PROBER")
while kill -0 "$PROBER" 2>/dev/null; do
  fds=$(descriptors "$AGENT_PID")
  rss=$(rss_mb "$AGENT_PID")
  [ "$fds" -gt "$peak_fds" ] && peak_fds=$fds
  awk -v a="$rss" -v b="$peak_rss" 'BEGIN { exit !(a > b) }' && peak_rss=$rss
  sleep 0.5
done
probes_ok=0
wait "$PROBER" && probes_ok=1
agent_cpu=$(awk -v a="$(cpu_seconds "$AGENT_PID")" -v b="$cpu_start" -v t="$((FLOOD_SECONDS - 10))" \
  'BEGIN { printf "%.2f", (a - b) / t }')
for pid in "${FLOODERS[@]}"; do wait "$pid" || true; done
for n in 1 2; do echo "flooder $n: $(cat "$WORK/flood-$n.json")" >&2; done

step "after the flood"
sleep 15   # the agent's housekeeping trims the heap after a burst of closed connections
rss_end=$(rss_mb "$AGENT_PID")
anon_end=$(anon_mb "$AGENT_PID")
fds_end=$(descriptors "$AGENT_PID")

failures=0
echo
echo "flood: $CONNECTIONS connections held by 2 processes (nice $FLOOD_NICE) for ${FLOOD_SECONDS}s, each reopened ${RECONNECT_SECONDS}s after the agent closed it (gRPC: idle + silent HTTP/2; HTTP: idle + slowloris)"
cat "$WORK/probes.txt"
[ "$probes_ok" -eq 1 ] || failures=$((failures + 1))
echo "agent CPU during the probes: $agent_cpu cores"
echo "agent descriptors: $fds_start at rest, peak $peak_fds during the flood, $fds_end after"
echo "agent RSS (GLIBC_TUNABLES=$AGENT_TUNABLES): $rss_start MB at rest, peak $peak_rss MB during the flood, $rss_end MB after (anonymous memory: $anon_start MB at rest, $anon_end MB after)"
grep -c 'connection cap reached' "$WORK/agent.log" | xargs echo "warnings 'connection cap reached' logged:"

caps=$(((4096 + 256) * 2 + 512))   # both caps, evicted connections still closing, the rest
if [ "$peak_fds" -gt "$caps" ]; then
  echo "FAIL: the agent held $peak_fds descriptors, more than its caps allow ($caps)"
  failures=$((failures + 1))
fi
if awk -v a="$rss_end" -v b="$rss_start" 'BEGIN { exit !(a > b * 1.2) }'; then
  echo "FAIL: RSS after the flood ($rss_end MB) is more than 20 % above the start ($rss_start MB)"
  failures=$((failures + 1))
fi
[ "$failures" -eq 0 ] && echo "flood: OK" || { echo "flood: $failures failure(s)"; exit 1; }
