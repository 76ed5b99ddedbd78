#!/usr/bin/env bash
# Install everything devmig needs on a Debian bookworm machine, idempotently,
# saying what it does. Called by `make demo`, `make test` and `.ci/run`.
#
#   1. Debian packages (apt), only those missing.
#   2. Go >= 1.26 (builds the test control plane only): the machine's own if
#      new enough, else the official toolchain module from the Go module proxy.
#   3. uv (pinned) from PyPI, in a private venv.
#   4. The Python workspace from uv.lock (builds the native core and the
#      generated gRPC code).
#   5. kube-apiserver, etcd and helm from Go modules (tests/controlplane/build.sh),
#      skipped with --no-controlplane.
#
# Tools land in ${DEVMIG_CACHE:-~/.cache/devmig}; nothing outside the clone
# but that cache and Debian's packages is touched.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${DEVMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/devmig}
UV_VERSION=0.13.8
# The Go release the test tools are built with; any >= 1.26 on the machine will do.
GO_MIN_MINOR=26
GO_FALLBACK=1.26.8
log() { printf '[bootstrap] %s\n' "$*" >&2; }

controlplane=1
for a in "$@"; do
  case $a in
    --no-controlplane) controlplane=0 ;;
    *) echo "usage: $0 [--no-controlplane]" >&2; exit 2 ;;
  esac
done
mkdir -p "$cache"

# 1. Debian packages ------------------------------------------------------
apt_pkgs=(gcc make git openssl ca-certificates curl unzip python3 python3-venv python3-dev pkg-config graphviz
  # the real-kernel test (tests/kernel): QEMU, busybox, the kernel source and its build deps
  qemu-system-x86 busybox-static linux-source-6.12 bc bison flex libelf-dev libssl-dev cpio xz-utils
  # the two-node test (tests/twonode): the guests' root filesystem
  debootstrap erofs-utils
  # the fuzz targets (agent-native/fuzz): clang with its libFuzzer and sanitizer runtimes
  clang-14 libclang-rt-14-dev)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  log "Debian packages: all present"
fi
# Debian's own 6.12 kernel test (tests/kernel/debian) builds mtty.ko against
# the headers of the kernel that matches the installed linux-source-6.12.
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.12)
headers="linux-headers-${srcver%%-*}+deb12-amd64"
if ! dpkg-query -W -f='${Status}' "$headers" 2>/dev/null | grep -q "install ok installed"; then
  log "installing $headers"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$headers"
fi

# 2. Go ---------------------------------------------------------------------
go_ok() {
  local v
  v=$("$1" env GOVERSION 2>/dev/null) || return 1 # e.g. go1.26.8
  v=${v#go}
  [ "${v%%.*}" -gt 1 ] || { [ "${v%%.*}" -eq 1 ] && [ "$(echo "$v" | cut -d. -f2)" -ge $GO_MIN_MINOR ]; }
}
if command -v go >/dev/null && go_ok "$(command -v go)"; then
  log "Go: $(go env GOVERSION) at $(command -v go)"
elif [ -x "$cache/go/bin/go" ] && go_ok "$cache/go/bin/go"; then
  log "Go: cached $("$cache/go/bin/go" env GOVERSION)"
else
  # The official toolchain is published on the Go module proxy as the module
  # golang.org/toolchain; this is what `GOTOOLCHAIN=goX` downloads too.
  proxy=${GOPROXY:-https://proxy.golang.org}; proxy=${proxy%%,*}
  zip="$cache/go-$GO_FALLBACK.zip"
  log "Go: fetching go$GO_FALLBACK from the Go module proxy ($proxy)"
  curl -fsSL -o "$zip" "$proxy/golang.org/toolchain/@v/v0.0.1-go$GO_FALLBACK.linux-amd64.zip"
  rm -rf "$cache/go" "$cache/go.tmp" && mkdir -p "$cache/go.tmp"
  unzip -q "$zip" -d "$cache/go.tmp"
  mv "$cache/go.tmp/golang.org/toolchain@v0.0.1-go$GO_FALLBACK.linux-amd64" "$cache/go"
  rm -rf "$cache/go.tmp" "$zip"
  chmod -R u+w "$cache/go"
  log "Go: installed $("$cache/go/bin/go" env GOVERSION) in $cache/go"
fi
export PATH="$cache/go/bin:$PATH"

# 3. uv ---------------------------------------------------------------------
# Only uv is exposed on PATH (through $cache/path), not the venv's python.
uv="$cache/path/uv"
if [ -x "$uv" ] && [ "$("$uv" --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
  log "uv: $UV_VERSION cached"
else
  log "uv: installing $UV_VERSION from PyPI into $cache/tools"
  rm -rf "$cache/tools"
  python3 -m venv "$cache/tools"
  "$cache/tools/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION"
  mkdir -p "$cache/path" && ln -sf "$cache/tools/bin/uv" "$uv"
fi

# 4. Python workspace -------------------------------------------------------
log "Python workspace: uv sync --locked (builds the native core and the gRPC code when they changed)"
(cd "$here" && "$uv" sync --locked --python 3.11)

# 5. Control-plane binaries -------------------------------------------------
if [ $controlplane -eq 1 ]; then
  "$here/tests/controlplane/build.sh" >/dev/null
fi
log "done"
