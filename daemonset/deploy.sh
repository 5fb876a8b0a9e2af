#!/usr/bin/env bash
# Ambit on a local cluster; what `make image`, `make kind-deploy`, `make minikube-deploy` and `make undeploy` run.
#
#   daemonset/deploy.sh image            build the image (docker, else podman)
#   daemonset/deploy.sh kind-deploy      image, `kind load`, bpffs on the nodes, the CA and Observer certificates,
#                                        CRDs where missing, `kubectl apply -k`
#   daemonset/deploy.sh minikube-deploy  image, `minikube image load`, then the same
#   daemonset/deploy.sh undeploy         remove the sample app and Ambit (CRDs only with UNDEPLOY_CRDS=1)
#
# Settings (environment or make variables): IMAGE (ambit:dev), ENGINE (docker|podman; default: the first one
# whose daemon answers), KIND_CLUSTER (ambit), MINIKUBE_PROFILE (minikube), KUBE_CONTEXT (undeploy: the
# current context), AMBIT_CA_DIR (where the CA is kept between deploys: ~/.local/share/ambit/ca; the operator's
# certificate for `ambit observe` is issued into its operator/ directory).
# Every kubectl call names its context, so nothing lands on another cluster than the one named.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-ambit:dev}
KIND_CLUSTER=${KIND_CLUSTER:-ambit}
MINIKUBE_PROFILE=${MINIKUBE_PROFILE:-minikube}
AMBIT_CA_DIR=${AMBIT_CA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/ambit/ca}
NS=ambit-system
CRDS=(authorizationpolicies peerauthentications)

say() { echo "ambit: $*" >&2; }
die() { echo "ambit: error: $*" >&2; exit 2; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not installed ($2)"; }

engine() {
  if [ -n "${ENGINE:-}" ]; then
    need "$ENGINE" "ENGINE=$ENGINE"
    "$ENGINE" info >/dev/null 2>&1 || die "$ENGINE is installed but cannot reach its daemon ('$ENGINE info' fails)"
    echo "$ENGINE"; return
  fi
  local e found=()
  for e in docker podman; do
    if command -v "$e" >/dev/null 2>&1; then
      if "$e" info >/dev/null 2>&1; then echo "$e"; return; fi
      found+=("$e (client at $(command -v "$e"), but '$e info' cannot reach a daemon)")
    fi
  done
  if [ ${#found[@]} -eq 0 ]; then found=("neither docker nor podman is installed"); fi
  die "no container engine to build the image: $(IFS=';'; echo "${found[*]}"). Start Docker or install podman," \
      "or build on a machine that has one: docker build -f daemonset/Containerfile -t $IMAGE ."
}

build_image() {
  local e=$1 ignore=()
  [ "$e" = podman ] && ignore=(--ignorefile daemonset/Containerfile.dockerignore)
  say "building $IMAGE with $e"
  "$e" build "${ignore[@]}" -f daemonset/Containerfile -t "$IMAGE" .
}

# The CA's key material, kept in AMBIT_CA_DIR between deploys so that a redeploy keeps the identities the agents
# trust: a root made once with the image's own code (python -m agent.ca --init), unless the directory already
# holds a CA, e.g. an intermediate whose root stays offline (`ambit ca --dir ROOT --issue intermediate --out
# AMBIT_CA_DIR`, daemonset/README.md). Every deploy also issues, from it, the agents' Observer certificate and
# the operator's (AMBIT_CA_DIR/observer, AMBIT_CA_DIR/operator): 90 days each, renewed by deploying again. The
# directory goes into the container and back as tar streams: no file owned by the container's user lands here.
ca_material() {
  local e=$1 td
  td=$(sed -n 's/^ *- AMBIT_TRUST_DOMAIN=//p' daemonset/base/kustomization.yaml)
  if ca_layout >/dev/null; then
    say "using the CA in $AMBIT_CA_DIR ($(ca_layout))"
  else
    say "creating a CA root for trust domain $td in $AMBIT_CA_DIR"
  fi
  mkdir -p "$AMBIT_CA_DIR" && chmod 700 "$AMBIT_CA_DIR"
  tar -C "$AMBIT_CA_DIR" -cf - . | "$e" run -i --rm --entrypoint sh "$IMAGE" -c \
    'set -e; rm -rf /tmp/ca; mkdir -m 700 /tmp/ca; tar -C /tmp/ca -xf -; rm -rf /tmp/ca/observer /tmp/ca/operator
     for step in "--init" "--issue observer --out /tmp/ca/observer" "--issue operator --out /tmp/ca/operator"; do
       python -m agent.ca --dir /tmp/ca --trust-domain "$1" $step >&2
     done
     tar -C /tmp/ca -cf - .' \
    sh "$td" | tar -C "$AMBIT_CA_DIR" -xf -
  chmod 600 "$AMBIT_CA_DIR"/*-key.pem "$AMBIT_CA_DIR"/observer/tls.key "$AMBIT_CA_DIR"/operator/tls.key
}

# Which CA AMBIT_CA_DIR holds: "root" (root-cert.pem + root-key.pem) or "intermediate" (Istio's plug-in files).
ca_layout() {
  if [ -s "$AMBIT_CA_DIR/ca-cert.pem" ]; then echo intermediate
  elif [ -s "$AMBIT_CA_DIR/root-key.pem" ]; then echo root
  else return 1; fi
}

# Objects holding keys are applied server-side: `kubectl apply` (client-side) would copy the whole object, the
# key included, into its kubectl.kubernetes.io/last-applied-configuration annotation.
apply_server_side() {
  "$@" --dry-run=client -o yaml | "${k[@]}" apply --server-side --force-conflicts --field-manager=ambit-deploy -f -
}

secrets() {
  local files=(root-cert.pem root-key.pem) from=() f
  if [ "$(ca_layout)" = intermediate ]; then files=(ca-cert.pem ca-key.pem cert-chain.pem root-cert.pem); fi
  for f in "${files[@]}"; do
    if [ -e "$AMBIT_CA_DIR/$f" ]; then from+=(--from-file="$AMBIT_CA_DIR/$f"); fi  # (cert-chain.pem: optional)
  done
  apply_server_side "${k[@]}" -n "$NS" create secret generic ambit-cacerts "${from[@]}"
  apply_server_side "${k[@]}" -n "$NS" create configmap ambit-trust-bundle --from-file="$AMBIT_CA_DIR/root-cert.pem"
  apply_server_side "${k[@]}" -n "$NS" create secret tls ambit-observer-tls \
    --cert="$AMBIT_CA_DIR/observer/tls.crt" --key="$AMBIT_CA_DIR/observer/tls.key"
  # Earlier deploys put the root in ambit-ca-root with a client-side apply, so its key sits in that Secret's
  # annotation too: the Secret is replaced by ambit-cacerts, and goes.
  "${k[@]}" -n "$NS" delete secret ambit-ca-root --ignore-not-found
}

apply_all() {
  local ctx=$1 crd k=(kubectl --context "$1")  # (k: seen by the functions called from here)
  need kubectl "https://kubernetes.io/docs/tasks/tools/"
  say "deploying to context $ctx"
  "${k[@]}" apply -f daemonset/base/namespace.yaml
  secrets
  for crd in "${CRDS[@]}"; do
    if "${k[@]}" get crd "$crd.security.istio.io" >/dev/null 2>&1; then
      say "CRD $crd.security.istio.io exists: kept"
    else
      "${k[@]}" apply -f "daemonset/crds/$crd.yaml"
      "${k[@]}" wait --for condition=established --timeout=60s "crd/$crd.security.istio.io"
    fi
  done
  "${k[@]}" apply -k daemonset/base
  "${k[@]}" -n "$NS" rollout status deployment/ambit-ca --timeout=180s
  "${k[@]}" -n "$NS" rollout status daemonset/ambit-agent --timeout=300s
  say "Ambit runs on context $ctx. Next: kubectl --context $ctx apply -k daemonset/sample (see daemonset/README.md)"
  say "flows from this machine: the operator certificate is in $AMBIT_CA_DIR/operator (README: Who reads the flows)"
}

# The agent pins its tcx links in the node's bpffs (/sys/fs/bpf/ambit). systemd mounts bpffs at boot, but not
# when it runs in a container, as on kind nodes and minikube's docker driver: mount it there when missing.
BPFFS_CHECK="grep -q '^[^ ]* /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf"

kind_deploy() {
  need kind "https://kind.sigs.k8s.io/"
  need kubectl "https://kubernetes.io/docs/tasks/tools/"
  local e; e=$(engine)
  kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER" \
    || die "no kind cluster '$KIND_CLUSTER': kind create cluster --name $KIND_CLUSTER --config daemonset/kind-cluster.yaml"
  build_image "$e"
  say "loading $IMAGE into kind cluster $KIND_CLUSTER"
  if [ "$e" = docker ]; then
    kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
  else
    local archive; archive=$(mktemp --suffix=.tar); trap 'rm -f "$archive"' RETURN
    "$e" save -o "$archive" "$IMAGE" && kind load image-archive "$archive" --name "$KIND_CLUSTER"
  fi
  ca_material "$e"
  local node
  for node in $(kind get nodes --name "$KIND_CLUSTER"); do "$e" exec "$node" sh -c "$BPFFS_CHECK"; done
  apply_all "kind-$KIND_CLUSTER"
}

minikube_deploy() {
  need minikube "https://minikube.sigs.k8s.io/"
  need kubectl "https://kubernetes.io/docs/tasks/tools/"
  local e; e=$(engine)
  minikube -p "$MINIKUBE_PROFILE" status >/dev/null 2>&1 \
    || die "minikube profile '$MINIKUBE_PROFILE' is not running: minikube start -p $MINIKUBE_PROFILE --nodes 2 --cni kindnet"
  build_image "$e"
  say "loading $IMAGE into minikube profile $MINIKUBE_PROFILE"
  if [ "$e" = docker ]; then
    minikube -p "$MINIKUBE_PROFILE" image load "$IMAGE"
  else
    local archive; archive=$(mktemp --suffix=.tar); trap 'rm -f "$archive"' RETURN
    "$e" save -o "$archive" "$IMAGE" && minikube -p "$MINIKUBE_PROFILE" image load "$archive"
  fi
  ca_material "$e"
  local node
  for node in $(minikube -p "$MINIKUBE_PROFILE" node list | cut -f1); do
    minikube -p "$MINIKUBE_PROFILE" ssh -n "$node" -- sudo sh -c "\"$BPFFS_CHECK\""
  done
  apply_all "$MINIKUBE_PROFILE"
}

undeploy() {
  need kubectl "https://kubernetes.io/docs/tasks/tools/"
  local ctx=${KUBE_CONTEXT:-$(kubectl config current-context)}
  local k=(kubectl --context "$ctx")
  say "removing Ambit from context $ctx"
  "${k[@]}" delete -k daemonset/sample --ignore-not-found --wait=false
  "${k[@]}" delete -k daemonset/base --ignore-not-found
  if [ "${UNDEPLOY_CRDS:-0}" = 1 ]; then  # only the ones Ambit installed: Istio's carry no managed-by=ambit
    "${k[@]}" delete crd -l app.kubernetes.io/managed-by=ambit --ignore-not-found
  else
    say "kept the security.istio.io CRDs (and every policy in them); UNDEPLOY_CRDS=1 removes Ambit's"
  fi
}

case "${1:-}" in
  image) e=$(engine); build_image "$e" ;;
  kind-deploy) kind_deploy ;;
  minikube-deploy) minikube_deploy ;;
  undeploy) undeploy ;;
  *) die "usage: $0 image|kind-deploy|minikube-deploy|undeploy" ;;
esac
