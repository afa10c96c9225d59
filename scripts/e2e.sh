#!/usr/bin/env bash
# Runs the end-to-end tests (e2e/) against the Kubernetes cluster that KUBECONFIG (or
# ~/.kube/config) names. Without one, says loudly that they were skipped — it never pretends
# they passed. The tests create and delete a namespace `ea-e2e-<pid>` of their own.
set -euo pipefail
cd "$(dirname "$0")/.."

kubeconfig="${KUBECONFIG:-$HOME/.kube/config}"
if [ -z "${KUBECONFIG:-}" ] && [ ! -f "$HOME/.kube/config" ]; then
  cat <<'BANNER'

  ###########################################################################
  #  e2e: SKIPPED — no Kubernetes cluster configured (KUBECONFIG is unset    #
  #  and there is no ~/.kube/config). The e2e/ tests did NOT run.            #
  #  Point KUBECONFIG at a cluster (kind, k3d, minikube, ...) to run them.   #
  ###########################################################################

BANNER
  exit 0
fi

printf '\n==> e2e against the cluster of %s\n' "$kubeconfig"
cargo nextest run --locked --run-ignored only --no-fail-fast -E 'binary(/^e2e_/)'
