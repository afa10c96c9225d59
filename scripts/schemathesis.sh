#!/usr/bin/env bash
# Fuzzes the REST API from its own OpenAPI document: starts the built agent (memory store,
# Kubernetes off) on free loopback ports and runs schemathesis (PyPI, pinned below, installed into
# target/tools/venv) with every check against the document the agent serves, bounded (a fixed
# seed, 30 examples per operation, about a minute). Any failure fails the run.
#
# The GetPods routes (/kube/...) are left out: with Kubernetes off they answer 501, which is their
# contract (SPEC §4) but which schemathesis counts as a server error; tests/discovery_api.rs and
# the e2e suite cover them.
#
#   scripts/schemathesis.sh        # after a build (scripts/test.sh builds the agent first)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

version=4.32.5
venv="$PWD/target/tools/venv"
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  step "installing schemathesis $version (PyPI) into target/tools/venv"
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv python3-pip; python3 -m venv "$venv"; }
  "$venv/bin/pip" install --quiet "schemathesis==$version"
fi

agent="$PWD/target/debug/election-agent"
[ -x "$agent" ] || cargo build --locked --quiet
scratch_and_cleanup
port=$(free_port)
grpc=$(free_port)
log="$WORK/agent.log"
EA_KUBE_ENABLE=false EA_BIND_ADDRESS=127.0.0.1 EA_HTTP_PORT="$port" EA_GRPC_PORT="$grpc" \
  EA_ENV=development "$agent" >"$log" 2>&1 &
pid=$!
PIDS+=("$pid")
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "schemathesis.sh: the agent exited" >&2; exit 1; }
  sleep 0.1
done

step "schemathesis against http://127.0.0.1:$port/openapi.json"
# Its cache goes into the working directory: a scratch one, not the repository.
cd "$WORK"
"$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
  --checks all --phases examples,coverage,fuzzing --max-examples 30 --seed 1 \
  --workers 2 --request-timeout 2 --exclude-path-regex '^/kube/'
