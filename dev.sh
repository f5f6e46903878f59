#!/usr/bin/env bash
# lungnode's two commands, for a fresh Debian 12 machine (run as root, or with sudo):
#
#   ./dev.sh run    install what the node needs and start it on its embedded defaults
#                   (SQLite and storage in /var/lib/lungnode, CPU unless a GPU is present,
#                   the bundled demo model, DICOM port 11112); extra arguments go to `lungnode run`
#   ./dev.sh test   install what the tests need (DCMTK, Orthanc, dicom3tools, PostgreSQL, ...),
#                   run ruff and mypy, then the whole test suite; extra arguments go to pytest
#
# Both are idempotent: a second call skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LUNGNODE_VENV:-.venv}
PY=${PYTHON:-/usr/bin/python3}
[ -x "$PY" ] || PY=python3

RUN_APT=(python3 python3-venv python3-dev)
TEST_APT=(dcmtk orthanc orthanc-dicomweb dicom3tools postgresql openssl systemd chromium chromium-driver)

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then echo "dev.sh: need root to apt-get install ${missing[*]}" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts services on install; the tests start their own throw-away instances.
  if command -v service >/dev/null; then service orthanc stop >/dev/null 2>&1 || true; fi
}

venv_install() {
  local extra=$1 stamp
  stamp="$VENV/.lungnode-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-$extra"
  [ -f "$stamp" ] && return 0
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned, so that nothing pulls CUDA packages (a CPU wheel is provided locally).
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  if [ "$extra" = dev ]; then
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
  else
    "$VENV/bin/python" -m pip install -q -e .
  fi
  touch "$stamp"
}

cmd=${1:-}
shift || true
case "$cmd" in
  run)
    apt_install "${RUN_APT[@]}"
    venv_install run
    exec "$VENV/bin/lungnode" run "$@"
    ;;
  test)
    apt_install "${RUN_APT[@]}" "${TEST_APT[@]}"
    # The viewer test fetches the prebuilt OHIF viewer with `npm pack` (Debian's npm, unless a
    # Node.js distribution that bundles npm is already there).
    command -v npm >/dev/null || apt_install npm
    venv_install dev
    # Lint and types first (about half a minute); either failing fails the run.
    echo "dev.sh: ruff check ." >&2
    "$VENV/bin/ruff" check .
    echo "dev.sh: mypy (config in pyproject.toml)" >&2
    "$VENV/bin/mypy"
    set +e
    "$VENV/bin/python" -m pytest "$@"
    rc=$?
    set -e
    # pytest exit 5 = no tests collected (e.g. a -k filter matched nothing): not a failure here.
    [ $rc -eq 5 ] && rc=0
    exit $rc
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
