#!/bin/sh
# os-brick from PyPI (pinned in osbrick-requirements.lock) in a venv outside
# the repository, for the VM tier's drop-in test and the benchmark. The venv
# must not live under /tmp: the guest mounts its own tmpfs there and sees the
# host root (and so this venv) read-only over 9p.
#
#   tests/harness/osbrick.sh install   create/update the venv; a no-op (no
#                                      network) when its stamp matches the lock
#   tests/harness/osbrick.sh check     exit 0 when the venv is complete, else 1
#   tests/harness/osbrick.sh path      print the venv directory
#
# The venv is $LUKS_AGENT_OSBRICK_VENV, default
# /var/cache/luks-agent-tests/osbrick-venv.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
LOCK=$HERE/osbrick-requirements.lock
VENV=${LUKS_AGENT_OSBRICK_VENV:-/var/cache/luks-agent-tests/osbrick-venv}
PIN=7.1.1
STAMP=$VENV/.luks-agent-osbrick-stamp

die() { echo "osbrick.sh: $*" >&2; exit 1; }

stamp_text() {
    printf 'lock sha256 %s\npython %s\n' \
        "$(sha256sum "$LOCK" | cut -d' ' -f1)" \
        "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
}

venv_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_text)" ] || return 1
    [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/privsep-helper" ] || return 1
    [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("os-brick"))' 2>/dev/null)" = "$PIN" ]
}

install() {
    if venv_ok; then
        echo "osbrick.sh: already installed: $VENV (os-brick $PIN)" >&2
        return 0
    fi
    mkdir -p "$(dirname "$VENV")"
    # One installer at a time (parallel test runs share the venv).
    exec 9>"$VENV.lock"
    flock -w 1800 9 || die "timed out waiting for $VENV.lock"
    venv_ok && return 0
    rm -f "$STAMP"
    if [ -e "$VENV" ] && ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
        [ -f "$VENV/pyvenv.cfg" ] || die "$VENV exists and is not a venv; refusing to touch it"
        echo "osbrick.sh: removing broken venv $VENV" >&2
        rm -rf "$VENV"
    fi
    if [ ! -e "$VENV" ]; then
        echo "osbrick.sh: creating venv $VENV" >&2
        python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian install python3-venv)"
    fi
    echo "osbrick.sh: installing os-brick==$PIN into $VENV" >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet -r "$LOCK" \
        || die "pip install -r $LOCK failed"
    stamp_text >"$STAMP"
    venv_ok || die "venv $VENV incomplete after install (os-brick $PIN, privsep-helper)"
}

case "${1:-}" in
    install) install ;;
    check) venv_ok || die "os-brick venv $VENV missing or incomplete: run tests/harness/osbrick.sh install" ;;
    path) echo "$VENV" ;;
    *) die "usage: $0 install|check|path" ;;
esac
