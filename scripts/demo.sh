#!/usr/bin/env bash
# Runs the main job end to end (scripts/demo-attach.sh): attach and detach
# of an encrypted volume on a loop device with the built-in local key store.
# On a kernel without device-mapper (like the CI machines) it runs inside
# the QEMU guest that the VM test tier boots, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run as root (it creates loop devices and dm-crypt mappings)" >&2
    exit 1
fi
scripts/install-deps.sh >/dev/null
cargo build --release --locked --quiet

if grep -q device-mapper /proc/misc 2>/dev/null; then
    exec scripts/demo-attach.sh
fi
echo "demo: this kernel has no device-mapper; running the demo inside the VM tier's guest (vm/run.sh)"
exec vm/run.sh --timeout 600 -- /bin/sh scripts/demo-attach.sh
