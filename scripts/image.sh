#!/usr/bin/env bash
# Builds the container image localhost/election-agent:<version> with podman: the release binary,
# stripped, and the shared libraries it links, staged as a root filesystem under target/image/ and
# put `FROM scratch` by the Dockerfile. Non-interactive; progress goes to stderr and the last line
# of stdout is the image reference, so callers can take it with `scripts/image.sh | tail -n 1`.
#
#   scripts/image.sh [--tag TAG]
#
# TAG defaults to the version in Cargo.toml, which must equal the chart's appVersion: the chart's
# default image is localhost/election-agent:<appVersion>. Loading the image into a cluster is left
# to you; the script prints how.
set -euo pipefail
cd "$(dirname "$0")/.."

repository=localhost/election-agent
chart=helm/election-agent/Chart.yaml

fail() {
  echo "image.sh: error: $*" >&2
  exit 1
}
step() { printf '\n==> %s\n' "$*" >&2; }

tag=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --tag)
      if [ "$#" -lt 2 ] || [ -z "$2" ]; then fail "--tag needs a value"; fi
      tag=$2
      shift 2
      ;;
    --tag=*)
      tag=${1#--tag=}
      [ -n "$tag" ] || fail "--tag needs a value"
      shift
      ;;
    -h | --help)
      sed -n '2,11s/^# \{0,1\}//p' "$0"
      exit 0
      ;;
    *) fail "unknown argument '$1' (usage: scripts/image.sh [--tag TAG])" ;;
  esac
done

for tool in podman cargo ldd strip; do
  command -v "$tool" >/dev/null 2>&1 || fail "'$tool' is not installed (podman: apt-get install -y podman runc)"
done

# The package's version: the first `version = "…"` of Cargo.toml, which is [package]'s.
version=$(sed -n 's/^version = "\([^"]*\)"$/\1/p' Cargo.toml | head -n 1)
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart")
[ -n "$version" ] || fail "no version in Cargo.toml"
[ -n "$app_version" ] || fail "no appVersion in $chart"
if [ "$version" != "$app_version" ]; then
  if [ -z "$tag" ]; then
    fail "Cargo.toml's version ($version) differs from $chart's appVersion ($app_version), the tag the chart pulls by default; make them equal, or pass --tag and set the chart's image.tag"
  fi
  echo "image.sh: warning: Cargo.toml's version ($version) differs from $chart's appVersion ($app_version)" >&2
fi
tag=${tag:-$version}
reference="$repository:$tag"

step "building the release binary"
cargo build --release --locked >&2 || fail "cargo build --release failed"
binary=target/release/election-agent
[ -x "$binary" ] || fail "$binary was not built"

step "staging the root filesystem in target/image/rootfs"
stage=target/image
rootfs=$stage/rootfs
rm -rf "$stage"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc"
install -m 0755 "$binary" "$rootfs/usr/local/bin/election-agent"
strip --strip-all "$rootfs/usr/local/bin/election-agent"

# The libraries the dynamic loader resolves, and the loader itself, each at the path ldd names
# (copied with symlinks followed). A static binary has none.
if ldd_out=$(ldd "$binary" 2>&1); then
  if printf '%s\n' "$ldd_out" | grep -q 'not found'; then
    fail "ldd cannot resolve every library of $binary:"$'\n'"$ldd_out"
  fi
  while read -r path; do
    mkdir -p "$rootfs$(dirname "$path")"
    cp -L "$path" "$rootfs$path"
    chmod 0755 "$rootfs$path"
  done < <(printf '%s\n' "$ldd_out" | awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }')
elif ! printf '%s\n' "$ldd_out" | grep -q 'not a dynamic executable\|statically linked'; then
  fail "ldd $binary failed: $ldd_out"
fi

# The user the image runs as (Dockerfile: USER 65532:65532), named for tools that look it up.
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/:/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
# Host names (Redis URLs) resolve through /etc/hosts, then DNS (/etc/resolv.conf, which the
# runtime mounts, as it does /etc/hosts). glibc 2.34+ has both modules inside libc, so no
# libnss_*.so is needed; without this file glibc would ask DNS before /etc/hosts.
cat >"$rootfs/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
EOF
chmod 0644 "$rootfs"/etc/*
# Nothing else: in a cluster the agent reads the ServiceAccount token and CA from the mounted
# volume (the CA is the only TLS root it needs; its Redis connections have no TLS).

step "podman build -t $reference (context: $stage)"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
podman build --file Dockerfile \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
  --tag "$reference" "$stage" >&2 || fail "podman build failed"

size=$(podman image inspect --format '{{.Size}}' "$reference") || fail "podman cannot inspect $reference"
cat <<EOF

Built $reference: $((size / 1000000)) MB ($size bytes; the binary stripped, glibc's libraries, nothing else).

Load it into a cluster (this script does not):
  podman save -o election-agent.tar $reference
  kind load image-archive election-agent.tar        # kind
  k3s ctr images import election-agent.tar          # k3s (on each node)
  minikube image load election-agent.tar            # minikube
or push it to a registry the cluster pulls from:
  podman tag $reference REGISTRY/election-agent:$tag && podman push REGISTRY/election-agent:$tag
  helm install … --set image.repository=REGISTRY/election-agent --set image.tag=$tag
The chart's default image is $repository:<its appVersion>, pulled IfNotPresent.

$reference
EOF
