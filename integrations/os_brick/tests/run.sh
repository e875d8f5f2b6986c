#!/bin/sh
# Runs the os-brick plug-in tests (test_plugin.py) with the nova venv's
# interpreter (nova 34.0.0, os-brick 7.1.1: tests/harness/pyvenv.sh nova),
# the plug-in from this checkout, as root.
#
#   integrations/os_brick/tests/run.sh MODES [unittest args...]
#
# MODES: libvirt (host: starts a real libvirtd with tests/harness/libvirtd.sh,
# stopped when the tests end), dm (the guest of the VM tier: real dm-crypt),
# or both, comma-separated. LUKS_AGENT_BIN: the agent (default the release
# build). Exit status: the tests'.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
MODES=${1:?usage: run.sh libvirt|dm|libvirt,dm [unittest args]}
shift
VENV=$("$REPO/tests/harness/pyvenv.sh" nova path)
"$REPO/tests/harness/pyvenv.sh" nova check
case ",$MODES," in
    *,libvirt,*) "$REPO/tests/harness/libvirtd.sh" start --owner $$ ;;
esac
export LUKS_AGENT_TEST_MODES=$MODES
export LUKS_AGENT_BIN=${LUKS_AGENT_BIN:-$REPO/target/release/luks-agent}
export PYTHONPATH=$REPO/integrations/os_brick
export PYTHONWARNINGS=ignore
cd "$HERE"
"$VENV/bin/python" -m unittest -v test_plugin "$@"
