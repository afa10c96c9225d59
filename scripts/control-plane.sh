#!/usr/bin/env bash
# Starts a throwaway, real Kubernetes control plane on loopback for the e2e tests (e2e/,
# scripts/e2e.sh), and keeps it running in the foreground until interrupted.
#
# Usage: scripts/control-plane.sh BIN_DIR [WORK_DIR]
#
#   BIN_DIR   holds the binaries `etcd`, `kube-apiserver` and `kube-controller-manager` (any
#             release from 1.24 on; how they were built does not matter). Also needed on PATH:
#             openssl and curl. kubectl is not needed by this script, only by you.
#   WORK_DIR  where certificates, keys, the etcd data, logs and the kubeconfigs go. Default: a new
#             temporary directory, removed on exit. A WORK_DIR you name is kept, but what the
#             script put in it is removed on exit, except the logs (*.log).
#
# What it starts, all bound to 127.0.0.1 on free ports (printed at start; fixed ones can be asked
# for with ETCD_PORT, ETCD_PEER_PORT, APISERVER_PORT and CONTROLLER_MANAGER_PORT):
#   - etcd, plain HTTP on loopback, one member, data in WORK_DIR/etcd;
#   - kube-apiserver, HTTPS with a self-signed CA and serving certificate made here with openssl;
#     authentication by bearer token (--token-auth-file: one admin token, group system:masters,
#     and one for the controller manager), authorization RBAC, service-account tokens signed by
#     a key made here (--service-account-issuer/-key-file/-signing-key-file), so TokenRequest
#     works: `kubectl create token SA` prints a token the API server accepts;
#     --service-cluster-ip-range=10.0.0.0/24 (the `kubernetes` Service gets 10.0.0.1 but no
#     Endpoints: the API server refuses a loopback address there, so its endpoint reconciler is
#     off); the aggregation layer's front-proxy certificates are set up too;
#   - kube-controller-manager with all default controllers (so Deployments get ReplicaSets,
#     ReplicaSets get Pods, namespaces get their `default` ServiceAccount, deleted namespaces are
#     emptied, garbage is collected), one service-account credential per controller, no leader
#     election.
#
# What it does NOT start: no scheduler, no kubelet, no kube-proxy, no container runtime, no CNI,
# no DNS. Pods are created but stay Pending (no node) unless something binds and reports on them
# — the project's e2e harness plays that kubelet part itself.
#
# Once the API server answers /readyz, the `default` namespace exists and the controller manager
# has created its `default` ServiceAccount, it writes WORK_DIR/kubeconfig (cluster-admin by
# token), prints `export KUBECONFIG=...`, and waits. Ctrl-C or SIGTERM (e.g. `kill %1` when run
# with `&`) stops all three processes and removes the temporary files. If one of them dies on its
# own, the others are stopped too and the script exits non-zero; see the logs in WORK_DIR.
set -euo pipefail

usage() {
  echo "usage: $0 BIN_DIR [WORK_DIR]" >&2
  exit 2
}
if [ "$#" -lt 1 ] || [ "$#" -gt 2 ]; then usage; fi

bin_dir=$(cd "$1" && pwd)
for tool in etcd kube-apiserver kube-controller-manager; do
  if [ ! -x "$bin_dir/$tool" ]; then
    echo "error: $bin_dir/$tool is missing or not executable" >&2
    exit 1
  fi
done
for tool in openssl curl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is needed on PATH" >&2; exit 1; }
done

# The work directory: ours (removed whole on exit) or the caller's (only our files removed).
if [ "$#" -eq 2 ]; then
  mkdir -p "$2"
  work_dir=$(cd "$2" && pwd)
  own_work_dir=false
else
  work_dir=$(mktemp -d "${TMPDIR:-/tmp}/control-plane.XXXXXX")
  own_work_dir=true
fi
pki="$work_dir/pki"

# --- stopping -----------------------------------------------------------------------------

pids=()      # the processes started, in start order
names=()     # their names, same order

# Stops what was started (last started first: TERM, then KILL after 15 s) and removes the files.
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local i pid deadline
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=${pids[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "${names[i]} did not stop in 15 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  if [ "$own_work_dir" = true ]; then
    rm -rf "$work_dir"
  else
    rm -rf "$pki" "$work_dir/etcd" "$work_dir/kubeconfig" "$work_dir/controller-manager.kubeconfig"
  fi
  [ "${#pids[@]}" -eq 0 ] || echo "control plane stopped" >&2
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- ports --------------------------------------------------------------------------------

chosen_ports=" "
# Prints a TCP port on 127.0.0.1 that nothing listens on and that was not chosen before.
free_port() {
  local port _
  for _ in $(seq 1 200); do
    port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    case "$chosen_ports" in *" $port "*) continue ;; esac
    # A refused connection means nothing listens there.
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "error: found no free port" >&2
  return 1
}
etcd_port=${ETCD_PORT:-$(free_port)}; chosen_ports+="$etcd_port "
etcd_peer_port=${ETCD_PEER_PORT:-$(free_port)}; chosen_ports+="$etcd_peer_port "
apiserver_port=${APISERVER_PORT:-$(free_port)}; chosen_ports+="$apiserver_port "
kcm_port=${CONTROLLER_MANAGER_PORT:-$(free_port)}; chosen_ports+="$kcm_port "
server="https://127.0.0.1:$apiserver_port"

# --- certificates, keys, tokens -----------------------------------------------------------

mkdir -p "$pki"
chmod 700 "$pki"
(
  cd "$pki"
  # A CA of our own: it signs the serving certificate, is the --client-ca-file, and the root CA
  # the controller manager puts into every namespace (kube-root-ca.crt).
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=control-plane-ca" \
    -keyout ca.key -out ca.crt 2>/dev/null
  # The API server's serving certificate: valid for loopback and the in-cluster names.
  cat >serving.ext <<'EOF'
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, IP:10.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local
EOF
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout apiserver.key -out apiserver.csr 2>/dev/null
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile serving.ext -out apiserver.crt 2>/dev/null
  # The aggregation layer's front proxy: a CA of its own and the client certificate the API
  # server presents to extension API servers. Configuring it also publishes the request-header
  # CA in kube-system/extension-apiserver-authentication, which the controller manager reads
  # (without it, it logs "missing content for CA bundle" over and over).
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=front-proxy-ca" \
    -keyout front-proxy-ca.key -out front-proxy-ca.crt 2>/dev/null
  printf '%s\n' 'basicConstraints = CA:FALSE' 'keyUsage = critical, digitalSignature, keyEncipherment' \
    'extendedKeyUsage = clientAuth' >client.ext
  openssl req -newkey rsa:2048 -nodes -subj "/CN=front-proxy-client" \
    -keyout front-proxy-client.key -out front-proxy-client.csr 2>/dev/null
  openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
    -CAcreateserial -days 3650 -extfile client.ext -out front-proxy-client.crt 2>/dev/null
  # The key pair that signs and verifies service-account tokens.
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
)

# Static bearer tokens: token,user,uid,"groups". The controller manager's user is the one the
# API server's built-in RBAC policy gives the controller manager's rights to.
admin_token=$(openssl rand -hex 32)
kcm_token=$(openssl rand -hex 32)
cat >"$pki/tokens.csv" <<EOF
$admin_token,admin,admin,"system:masters"
$kcm_token,system:kube-controller-manager,system:kube-controller-manager,
EOF

# write_kubeconfig FILE USER TOKEN: a kubeconfig for the API server, as USER with bearer TOKEN.
write_kubeconfig() {
  local file=$1 user=$2 token=$3
  local ca_data
  ca_data=$(base64 <"$pki/ca.crt" | tr -d '\n')
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: control-plane
  cluster:
    server: $server
    certificate-authority-data: $ca_data
users:
- name: $user
  user:
    token: $token
contexts:
- name: $user@control-plane
  context:
    cluster: control-plane
    user: $user
    namespace: default
current-context: $user@control-plane
EOF
  chmod 600 "$file"
}
write_kubeconfig "$work_dir/controller-manager.kubeconfig" system:kube-controller-manager "$kcm_token"

# --- starting -----------------------------------------------------------------------------

# start NAME COMMAND...: runs it in the background with its output in WORK_DIR/NAME.log.
start() {
  local name=$1
  shift
  "$@" >"$work_dir/$name.log" 2>&1 &
  pids+=("$!")
  names+=("$name")
}

# Fails (and so stops everything) when a started process has exited.
check_alive() {
  local i
  for i in "${!pids[@]}"; do
    if ! kill -0 "${pids[i]}" 2>/dev/null; then
      echo "error: ${names[i]} exited; the end of $work_dir/${names[i]}.log:" >&2
      tail -n 20 "$work_dir/${names[i]}.log" >&2 || true
      return 1
    fi
  done
}

# wait_for WHAT SECONDS COMMAND...: retries COMMAND every half second until it succeeds; exits
# (stopping everything) on a timeout or when a started process died.
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    check_alive || exit 1
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "error: timed out after ${seconds}s waiting for $what" >&2
      exit 1
    fi
    sleep 0.5
  done
}

# GET PATH on the API server as admin; fails unless the answer is 2xx.
api_get() {
  curl --silent --fail --max-time 5 --cacert "$pki/ca.crt" \
    -H "Authorization: Bearer $admin_token" "$server$1"
}

echo "starting etcd on 127.0.0.1:$etcd_port" >&2
start etcd "$bin_dir/etcd" \
  --name control-plane \
  --data-dir "$work_dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "control-plane=http://127.0.0.1:$etcd_peer_port"
wait_for "etcd" 60 curl --silent --fail --max-time 5 "http://127.0.0.1:$etcd_port/health"

echo "starting kube-apiserver on $server" >&2
start kube-apiserver "$bin_dir/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 \
  --advertise-address 127.0.0.1 \
  --secure-port "$apiserver_port" \
  --tls-cert-file "$pki/apiserver.crt" \
  --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --token-auth-file "$pki/tokens.csv" \
  --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" \
  --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --endpoint-reconciler-type none \
  --requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
  --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User \
  --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --proxy-client-cert-file "$pki/front-proxy-client.crt" \
  --proxy-client-key-file "$pki/front-proxy-client.key" \
  --allow-privileged=true \
  --profiling=false
wait_for "kube-apiserver /readyz" 120 api_get /readyz
# The API server creates the `default` namespace itself, shortly after it is ready.
wait_for "the default namespace" 60 api_get /api/v1/namespaces/default

echo "starting kube-controller-manager (health on https://127.0.0.1:$kcm_port)" >&2
start kube-controller-manager "$bin_dir/kube-controller-manager" \
  --kubeconfig "$work_dir/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$work_dir/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$work_dir/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 \
  --secure-port "$kcm_port" \
  --controllers '*' \
  --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file "$pki/sa.key" \
  --root-ca-file "$pki/ca.crt" \
  --cluster-signing-cert-file "$pki/ca.crt" \
  --cluster-signing-key-file "$pki/ca.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --profiling=false
# The serviceaccount controller creating `default` in `default` shows the controllers run, and
# pods can be admitted there (the ServiceAccount admission plugin needs it).
wait_for "the default ServiceAccount" 120 api_get /api/v1/namespaces/default/serviceaccounts/default

write_kubeconfig "$work_dir/kubeconfig" admin "$admin_token"
cat <<EOF

control plane ready: $("$bin_dir/kube-apiserver" --version 2>/dev/null || echo kube-apiserver)
  API server          $server
  etcd                http://127.0.0.1:$etcd_port
  controller manager  https://127.0.0.1:$kcm_port
  logs                $work_dir/*.log
  kubeconfig          $work_dir/kubeconfig

export KUBECONFIG=$work_dir/kubeconfig

Ctrl-C (or SIGTERM) stops it.
EOF

# --- running ------------------------------------------------------------------------------

# Wait for any of the three to exit (a signal interrupts this wait and runs the traps).
while true; do
  wait -n || true
  check_alive || exit 1
done
