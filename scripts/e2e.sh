#!/usr/bin/env bash
# Runs the end-to-end tests (e2e/) against the Kubernetes cluster that KUBECONFIG (or
# ~/.kube/config) names. Without one, says loudly that they were skipped — it never pretends
# they passed. Each test creates and deletes a namespace `ea-e2e-<test>-<pid>` of its own; on a
# cluster without a kubelet (such as scripts/control-plane.sh's) the harness plays kubelet for
# that namespace and says so in a banner.
set -euo pipefail
cd "$(dirname "$0")/.."

kubeconfig="${KUBECONFIG:-$HOME/.kube/config}"
if [ -z "${KUBECONFIG:-}" ] && [ ! -f "$HOME/.kube/config" ]; then
  cat <<'BANNER'

  ###########################################################################
  #  e2e: SKIPPED — no Kubernetes cluster configured (KUBECONFIG is unset    #
  #  and there is no ~/.kube/config). The e2e/ tests did NOT run.            #
  #  Point KUBECONFIG at a cluster (kind, k3d, minikube, or                  #
  #  scripts/control-plane.sh) to run them.                                  #
  ###########################################################################

BANNER
  exit 0
fi

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# Two agents sharing one store (e2e/operator.rs) need a redis-server of their own, on a free port.
if ! command -v redis-server >/dev/null 2>&1; then
  step "installing redis-server for the e2e tests"
  apt_install redis-server
  # Debian's package may start a system redis on 6379; the tests run their own, so stop it.
  as_root service redis-server stop >/dev/null 2>&1 || true
fi

# The chart's scenario (e2e/operator/chart.rs) installs the chart with helm and asks kubectl.
install_helm

# With podman, that scenario also runs the image (scripts/image.sh builds it: a release build).
if command -v podman >/dev/null 2>&1; then
  step "building the image for the e2e tests (scripts/image.sh)"
  EA_E2E_IMAGE="$(scripts/image.sh | tail -n 1)"
  export EA_E2E_IMAGE
else
  step "podman is not installed: the e2e tests will not run the image"
fi

# Build and run only the e2e test binaries (Cargo.toml's [[test]] targets named e2e_*): the rest
# of the suite is scripts/test.sh's business.
targets=()
while read -r name; do targets+=(--test "$name"); done < <(sed -n 's/^name = "\(e2e_[a-z_]*\)"$/\1/p' Cargo.toml)
if [ "${#targets[@]}" -eq 0 ]; then
  echo "error: Cargo.toml names no e2e_* test target" >&2
  exit 1
fi

printf '\n==> e2e against the cluster of %s\n' "$kubeconfig"
started=$SECONDS
status=0
cargo nextest run --locked --run-ignored only --no-fail-fast "${targets[@]}" || status=$?
printf '\n==> e2e took %d s (exit %d)\n' "$((SECONDS - started))" "$status"
exit "$status"
