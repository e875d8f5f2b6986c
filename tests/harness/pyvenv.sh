#!/bin/sh
# Pinned Python venvs of the OpenStack code the tests drive, outside the
# repository. A venv must not live under /tmp: the guest mounts its own
# tmpfs there and sees the host root (and so the venv) read-only over 9p.
#
#   tests/harness/pyvenv.sh NAME install   create/update the venv; a no-op
#                                          (no network) when its stamp
#                                          matches the lock
#   tests/harness/pyvenv.sh NAME check     exit 0 when the venv is complete
#   tests/harness/pyvenv.sh NAME path      print the venv directory
#
# NAME   package checked  lock                          used by
# osbrick  os-brick 7.1.1  osbrick-requirements.lock   VM drop-in test, benchmark
# nova     nova 34.0.0     nova-requirements.lock      the os-brick plug-in tests
# cursive  cursive 0.3.1   cursive-requirements.lock   image signature compat
#                                                      test and benchmark
#
# The venv is $LUKS_AGENT_<NAME>_VENV (upper case), default
# /var/cache/luks-agent-tests/<NAME>-venv.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
NAME=${1:-}
# EXE: a program the venv must have; PROBE: Python that must import.
EXE=privsep-helper
PROBE=
case "$NAME" in
    osbrick) PKG=os-brick PIN=7.1.1 ;;
    nova) PKG=nova PIN=34.0.0 ;;
    cursive) PKG=cursive PIN=0.3.1 EXE=python
        PROBE='import cursive.signature_utils, cursive.certificate_utils, castellan.key_manager.barbican_key_manager' ;;
    *) echo "usage: $0 osbrick|nova|cursive install|check|path" >&2; exit 1 ;;
esac
shift
LOCK=$HERE/$NAME-requirements.lock
UPPER=$(echo "$NAME" | tr a-z A-Z)
eval "VENV=\${LUKS_AGENT_${UPPER}_VENV:-/var/cache/luks-agent-tests/$NAME-venv}"
STAMP=$VENV/.luks-agent-$NAME-stamp

die() { echo "pyvenv.sh $NAME: $*" >&2; exit 1; }

stamp_text() {
    printf 'lock sha256 %s\npython %s\n' \
        "$(sha256sum "$LOCK" | cut -d' ' -f1)" \
        "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
}

venv_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_text)" ] || return 1
    [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/$EXE" ] || return 1
    [ -z "$PROBE" ] || "$VENV/bin/python" -c "$PROBE" >/dev/null 2>&1 || return 1
    [ "$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$PKG'))" 2>/dev/null)" = "$PIN" ]
}

install() {
    if venv_ok; then
        echo "pyvenv.sh $NAME: already installed: $VENV ($PKG $PIN)" >&2
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
        echo "pyvenv.sh $NAME: removing broken venv $VENV" >&2
        rm -rf "$VENV"
    fi
    if [ ! -e "$VENV" ]; then
        echo "pyvenv.sh $NAME: creating venv $VENV" >&2
        python3 -m venv "$VENV" || die "python3 -m venv failed (on Debian install python3-venv)"
    fi
    echo "pyvenv.sh $NAME: installing $PKG==$PIN into $VENV" >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet -r "$LOCK" \
        || die "pip install -r $LOCK failed"
    stamp_text >"$STAMP"
    venv_ok || die "venv $VENV incomplete after install ($PKG $PIN, $EXE${PROBE:+, imports})"
}

case "${1:-}" in
    install) install ;;
    check) venv_ok || die "venv $VENV missing or incomplete: run tests/harness/pyvenv.sh $NAME install" ;;
    path) echo "$VENV" ;;
    *) die "usage: $0 $NAME install|check|path" ;;
esac
