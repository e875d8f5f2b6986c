# Sourced by the VM test scripts (`. tests/vm/lib.sh`), in the guest as
# root: strict mode, the agent binary ($BIN), a work directory ($W), the
# pass/fail/ms helpers, and an agent configured with a local key store
# under $W ($A, config $W/agent.toml, 0600 as the agent requires).
set -eu
BIN=${BIN:-target/release/luks-agent}
W=$(mktemp -d /tmp/vmtest.XXXXXX)
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
pass() { printf 'ok - %s\n' "$*"; }
ms() { echo $(($(date +%s%N) / 1000000)); }
T0=$(ms)

cat >"$W/agent.toml" <<CONF
state_dir = "$W/state"
[key_manager.local]
dir = "$W/keys"
CONF
chmod 600 "$W/agent.toml"
A="$BIN --config $W/agent.toml"
# os-brick-style device paths live here; the guest has no udev to make it.
mkdir -p /dev/disk/by-id
