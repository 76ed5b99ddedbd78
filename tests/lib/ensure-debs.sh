# Sourced by the test build scripts (tests/kernel, tests/twonode):
# ensure_debs PKG... installs the Debian packages not installed yet with apt,
# or, with DEVMIG_NO_INSTALL=1 (how pytest runs the scripts), names them and
# exits 3, which the tests turn into a skip (or a failure under CI=true).
# The caller defines log().
ensure_debs() {
  local missing=() p sudo=""
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "${DEVMIG_NO_INSTALL:-0}" = 1 ]; then
    log "missing Debian packages: ${missing[*]} (apt-get install ${missing[*]})"
    exit 3
  fi
  log "installing Debian packages: ${missing[*]}"
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}
