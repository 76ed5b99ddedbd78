#!/usr/bin/env bash
# Build the real control-plane binaries devmig's tests run against
# (kube-apiserver, etcd, helm, and kubectl for the CLI-facing tests) from published Go modules, into a cache keyed
# by version and by the hash of the module files, outside the clone.
#
#   tests/controlplane/build.sh            build what is missing, print paths
#   tests/controlplane/build.sh --print    print the paths only (no build)
#
# A cold build takes many minutes on 2 cores (kube-apiserver dominates);
# a warm run returns at once. Nothing built here is ever committed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${DEVMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devmig}
bin="$cache/bin"
mkdir -p "$bin"

# The versions are read from the module files, the single source of truth.
modver() { # module-dir module-path
  awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$here/$1/go.mod"
}
K8S=$(modver apiserver k8s.io/kubernetes)
ETCD=$(modver etcd go.etcd.io/etcd/server/v3)
HELM=$(modver helm helm.sh/helm/v4)

# Key each binary by version + hash of go.mod/go.sum, so a change of either
# triggers a rebuild and a stale binary is never reused.
key() { cat "$here/$1/go.mod" "$here/$1/go.sum" | sha256sum | cut -c1-12; }
apiserver="$bin/kube-apiserver-$K8S-$(key apiserver)"
etcd="$bin/etcd-$ETCD-$(key etcd)"
helm="$bin/helm-$HELM-$(key helm)"
kubectl="$bin/kubectl-$K8S-$(key apiserver)"

print() {
  echo "KUBE_APISERVER=$apiserver"
  echo "ETCD=$etcd"
  echo "HELM=$helm"
  echo "KUBECTL=$kubectl"
}
if [ "${1:-}" = "--print" ]; then print; exit 0; fi

export CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { printf '[controlplane] %s\n' "$*" >&2; }

build() { # name out dir pkg ldflags
  local name=$1 out=$2 dir=$3 pkg=$4 ldflags=$5
  if [ -x "$out" ]; then log "$name: cached at $out"; return; fi
  log "$name: building $pkg (cold builds take minutes; progress below)"
  local start=$SECONDS
  (cd "$here/$dir" && go build -v -trimpath -ldflags "$ldflags" -o "$out.tmp" "$pkg" 2>&1 |
    awk '{ n++; if (n % 100 == 0) printf "[controlplane]   %s: %d packages compiled\n", name, n > "/dev/stderr" }' name="$name")
  mv "$out.tmp" "$out"
  log "$name: built in $((SECONDS - start)) s"
}

minor=${K8S#v1.}; minor=${minor%%.*}
L="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  L="$L -X $p.gitVersion=$K8S -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  L="$L -X $p.gitCommit=0000000000000000000000000000000000000000 -X $p.buildDate=1970-01-01T00:00:00Z"
done
build kube-apiserver "$apiserver" apiserver k8s.io/kubernetes/cmd/kube-apiserver "$L"
build kubectl "$kubectl" apiserver k8s.io/kubernetes/cmd/kubectl "$L"
build etcd "$etcd" etcd go.etcd.io/etcd/server/v3 "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD"
build helm "$helm" helm helm.sh/helm/v4/cmd/helm "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM"
print
