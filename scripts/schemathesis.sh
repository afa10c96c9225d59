#!/usr/bin/env bash
# Fuzzes the REST API from its own OpenAPI document: starts the built agent (memory store,
# Kubernetes off) on free loopback ports and runs schemathesis (PyPI, pinned below, installed into
# target/tools/venv) with every check against the document the agent serves, bounded (a fixed
# seed, 30 examples per operation, about a minute); then again, shorter, with authentication on
# and a policy, so the 401s and 403s are checked against the document too. Any failure fails
# the run.
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

# Starts the agent with the variables given (NAME=value ...) on fresh ports; sets $port.
start_agent() {
  port=$(free_port)
  local grpc log
  grpc=$(free_port)
  log="$WORK/agent-$port.log"
  env "$@" EA_KUBE_ENABLE=false EA_BIND_ADDRESS=127.0.0.1 EA_HTTP_PORT="$port" EA_GRPC_PORT="$grpc" \
    EA_ENV=development "$agent" >"$log" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "schemathesis.sh: the agent exited" >&2; exit 1; }
    sleep 0.1
  done
}

# Runs schemathesis (in the scratch directory: its cache goes into the working directory) against
# the agent on $port, with the extra arguments given.
run_schemathesis() {
  (cd "$WORK" && "$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
    --checks all --phases examples,coverage,fuzzing --seed 1 \
    --workers 2 --request-timeout 2 --exclude-path-regex '^/kube/' "$@")
}

start_agent
step "schemathesis against http://127.0.0.1:$port/openapi.json (authentication off)"
run_schemathesis --max-examples 30

# Authentication on, with a policy that allows some elections and verbs and not others, and
# /metrics protected: the 401s and 403s the agent then answers must be the document's too.
printf 'alice-token,alice,1\n' >"$WORK/tokens.csv"
cat >"$WORK/policy.yaml" <<'POLICY'
rules:
  - subjects: [alice]
    kinds: ["*"]
    elections: ["a*", "0*", "_*"]
    verbs: [get, watch, campaign, extend, resign]
POLICY
start_agent EA_AUTH_TOKENS_FILE="$WORK/tokens.csv" EA_AUTH_POLICY_FILE="$WORK/policy.yaml" \
  EA_AUTH_METRICS=true
step "schemathesis against http://127.0.0.1:$port/openapi.json (tokens, a policy)"
run_schemathesis --max-examples 10 -H 'Authorization: Bearer alice-token'
