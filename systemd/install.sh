#!/bin/sh
# Install lungnode as systemd services: user, virtual environment, configuration, units.
#
#   sudo systemd/install.sh [--workers "0 1"] [--workers-only] [--uid N] [--no-enable]
#                           [--python python3] [--torch SPEC]
#   systemd/install.sh --destdir /tmp/stage    # files only, for packaging or a look (no root needed)
#
# What it does (idempotent; an existing /etc/lungnode/config.toml is never overwritten):
#   1. system user and group `lungnode` (home /var/lib/lungnode, no login shell; --uid N gives it a
#      fixed uid/gid, the same on every machine that shares the storage root over NFS)
#   2. /opt/lungnode/venv: a virtual environment with torch (--torch SPEC, default `torch` from
#      PyPI, the CUDA build; CPU only: --torch "torch --index-url https://download.pytorch.org/whl/cpu")
#      and this checkout installed; /opt/lungnode/docs: the documentation
#   3. /etc/lungnode/config.toml (root:lungnode 0640) from config.toml, with storage root
#      /var/lib/lungnode; checked with `lungnode check-config`
#   4. /etc/systemd/system/lungnode.service and lungnode-worker@.service, checked with
#      `systemd-analyze verify`; then daemon-reload, enable --now lungnode (not with
#      --workers-only: a GPU machine of a PostgreSQL deployment) and each lungnode-worker@N given
#      with --workers (N = GPU index)
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/lungnode
DESTDIR=""
PYTHON=python3
TORCH_SPEC="${LUNGNODE_TORCH_SPEC:-torch}"
WORKERS=""
ENABLE=1
USER_ID=""
NODE=1

while [ $# -gt 0 ]; do
    case "$1" in
        --destdir) DESTDIR=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --torch) TORCH_SPEC=$2; shift 2 ;;
        --workers) WORKERS=$2; shift 2 ;;
        --uid) USER_ID=$2; shift 2 ;;
        --workers-only) NODE=0; shift ;;
        --no-enable) ENABLE=0; shift ;;
        -h|--help) sed -n '2,/^set -eu$/{/^set -eu$/!p;}' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

say() { printf 'install.sh: %s\n' "$*"; }

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or with --destdir DIR to stage the files only)" >&2
    exit 1
fi

# 1. user
if [ -z "$DESTDIR" ]; then
    if ! getent passwd lungnode >/dev/null; then
        say "creating system user lungnode"
        if [ -n "$USER_ID" ]; then
            groupadd --system --gid "$USER_ID" lungnode
            set -- --uid "$USER_ID" --gid "$USER_ID"
        else
            set -- --user-group
        fi
        useradd --system "$@" --home-dir /var/lib/lungnode --no-create-home \
            --shell /usr/sbin/nologin --comment "lungnode DICOM AI node" lungnode
    fi
fi

# 2. program
if [ -z "$DESTDIR" ]; then
    say "virtual environment in $PREFIX/venv"
    install -d -m 0755 "$PREFIX"
    [ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv "$PREFIX/venv"
    "$PREFIX/venv/bin/pip" install --quiet --upgrade pip
    # shellcheck disable=SC2086 # SPEC may carry pip options (--index-url ...)
    "$PREFIX/venv/bin/pip" install --quiet $TORCH_SPEC
    "$PREFIX/venv/bin/pip" install --quiet "$SRC"
fi
install -d -m 0755 "$DESTDIR$PREFIX/docs"
for doc in "$SRC"/docs/*.md; do
    [ -e "$doc" ] && install -m 0644 "$doc" "$DESTDIR$PREFIX/docs/"
done

# 3. configuration
install -d -m 0750 "$DESTDIR/etc/lungnode"
CONF="$DESTDIR/etc/lungnode/config.toml"
if [ ! -e "$CONF" ]; then
    say "writing $CONF"
    sed 's|^root = .*|root = "/var/lib/lungnode"     # = StateDirectory of lungnode.service|' \
        "$SRC/config.toml" > "$CONF"
    chmod 0640 "$CONF"
else
    say "keeping existing $CONF"
fi
if [ -z "$DESTDIR" ]; then
    chown root:lungnode "$DESTDIR/etc/lungnode" "$CONF"
    "$PREFIX/venv/bin/lungnode" --config "$CONF" check-config
fi

# 4. units
UNITDIR="$DESTDIR/etc/systemd/system"
install -d -m 0755 "$UNITDIR"
install -m 0644 "$SRC/systemd/lungnode.service" "$UNITDIR/lungnode.service"
install -m 0644 "$SRC/systemd/lungnode-worker@.service" "$UNITDIR/lungnode-worker@.service"
if [ -z "$DESTDIR" ]; then
    systemd-analyze verify "$UNITDIR/lungnode.service"
    systemctl daemon-reload
    if [ "$ENABLE" -eq 1 ]; then
        if [ "$NODE" -eq 1 ]; then
            systemctl enable --now lungnode.service
        fi
        for n in $WORKERS; do
            systemctl enable --now "lungnode-worker@$n.service"
        done
    fi
    say "done: systemctl status lungnode; journalctl -u lungnode -f; curl -s http://127.0.0.1:9110/healthz"
else
    say "staged under $DESTDIR (no user, venv or systemctl)"
fi
