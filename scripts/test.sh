#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, checks formatting
# and lints, runs every test. This is the README's test command and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# The Redis store's tests start real redis-server and redis-sentinel processes on free ports,
# and drive them with redis-cli.
missing_redis=()
for tool in redis-server redis-sentinel redis-cli; do
  command -v "$tool" >/dev/null 2>&1 || missing_redis+=("$tool")
done
if [ "${#missing_redis[@]}" -gt 0 ]; then
  step "installing Redis for the store tests (missing: ${missing_redis[*]})"
  apt_install redis-server redis-sentinel redis-tools
  # Debian's packages may start a system redis (6379) and sentinel (26379); the tests run their
  # own on free ports, so stop those rather than leave them holding resources.
  as_root service redis-server stop >/dev/null 2>&1 || true
  as_root service redis-sentinel stop >/dev/null 2>&1 || true
fi

# The chart's tests (tests/chart.rs, tests/rbac.rs) run helm.
install_helm

# The alert tests (tests/alerts.rs) check the chart's rules and run their unit tests with
# promtool, from Debian's prometheus package.
if ! command -v promtool >/dev/null 2>&1; then
  step "installing promtool for the alert tests (Debian: prometheus)"
  # Without its recommended node exporter, which would start a service of its own.
  apt_install --no-install-recommends prometheus
  # The package may start a Prometheus server (9090); the tests need only promtool.
  as_root service prometheus stop >/dev/null 2>&1 || true
  if command -v systemctl >/dev/null 2>&1; then
    as_root systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

# The fuzz targets (fuzz/: a crate of its own, run with cargo fuzz on nightly) must keep compiling
# against the agent's code. Checked on stable, sharing target/ with the lints above: under a
# minute. When the agent's dependencies change, `cargo check --manifest-path fuzz/Cargo.toml`
# brings fuzz/Cargo.lock along; commit it.
step "fuzz targets: cargo fmt --check, cargo clippy (fuzz/)"
cargo fmt --manifest-path fuzz/Cargo.toml --check
CARGO_TARGET_DIR="$PWD/target" cargo clippy --manifest-path fuzz/Cargo.toml --locked --lib --bins -- -D warnings

step "cargo nextest run (unit, integration and binary tests)"
cargo nextest run --locked --no-fail-fast

# The REST API fuzzed from its own OpenAPI document (the agent nextest just built).
scripts/schemathesis.sh

# Last, so that a skip (no cluster configured) is the last thing printed.
step "e2e tests (a real Kubernetes cluster from KUBECONFIG)"
scripts/e2e.sh
