#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, checks formatting
# and lints, runs every test. This is the README's test command and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo-nextest >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

# Last, so that the suite's own summary closes the output.
step "cargo nextest run (unit, integration and binary tests)"
cargo nextest run --locked --no-fail-fast
