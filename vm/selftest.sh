#!/usr/bin/env bash
# Proves that the VM tier works, end to end:
#   1. the guest kernel has device-mapper;
#   2. a failing command's exit code comes back (exit 3 -> 3);
#   3. --env and --results reach the command, and files it writes come back;
#   4. a dm-crypt round trip with the host's cryptsetup on a loop device:
#      luksFormat (LUKS2, pbkdf2, 1000 iterations), open, write a pattern
#      through /dev/mapper, read it back, check the table references the
#      volume key in the kernel keyring, and that the luks-agent binary
#      (target/release/luks-agent, built if missing) accepts the key file
#      (exit 0) and rejects a wrong one (exit 2); close.
# Usage: vm/selftest.sh            (host; about a minute under TCG)
# vm/selftest.sh guest-roundtrip   is step 4's guest side, run by vm/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = guest-roundtrip ]; then
    [ "${VM_GUEST:-}" = 1 ] || { echo "guest-roundtrip runs inside vm/run.sh" >&2; exit 1; }
    agent=$PWD/target/release/luks-agent
    work=$(mktemp -d /tmp/roundtrip.XXXXXX)
    name=vm-selftest
    dev=
    teardown() {
        cryptsetup close "$name" 2>/dev/null || true
        [ -z "$dev" ] || losetup -d "$dev" 2>/dev/null || true
    }
    trap teardown EXIT
    truncate -s 64M "$work/disk.img"
    dev=$(losetup -f --show "$work/disk.img")
    echo "loop device: $dev"
    head -c 64 /dev/urandom >"$work/key"
    head -c 64 /dev/urandom >"$work/wrong"
    cryptsetup luksFormat --batch-mode --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
        --key-file "$work/key" "$dev"
    cryptsetup open --key-file "$work/key" "$dev" "$name"
    [ -b "/dev/mapper/$name" ] || { echo "/dev/mapper/$name missing" >&2; exit 1; }

    head -c $((4 << 20)) /dev/urandom >"$work/pattern"
    dd if="$work/pattern" of="/dev/mapper/$name" bs=1M oflag=direct conv=fsync status=none
    dd if="/dev/mapper/$name" of="$work/back" bs=1M count=4 iflag=direct status=none
    cmp "$work/pattern" "$work/back"
    echo "pattern read back through dm-crypt: ok"
    # LUKS2's data segment starts at 16 MiB: the ciphertext must differ.
    dd if="$dev" of="$work/raw" bs=1M skip=16 count=4 iflag=direct status=none
    if cmp -s "$work/pattern" "$work/raw"; then echo "data is not encrypted on $dev" >&2; exit 1; fi
    echo "ciphertext differs from plaintext: ok"

    table=$(dmsetup table "$name")
    echo "dmsetup table: $table"
    case "$table" in
        *" crypt aes-xts-plain64 :"*":logon:cryptsetup:"*) echo "volume key referenced in the kernel keyring: ok" ;;
        *) echo "no keyring reference in the table" >&2; exit 1 ;;
    esac

    "$agent" luks test-passphrase --key-file "$work/key" "$dev"
    echo "luks-agent test-passphrase with the key: exit 0: ok"
    rc=0
    "$agent" luks test-passphrase --key-file "$work/wrong" "$dev" || rc=$?
    [ "$rc" = 2 ] || { echo "luks-agent test-passphrase with a wrong key: exit $rc, want 2" >&2; exit 1; }
    echo "luks-agent test-passphrase with a wrong key: exit 2: ok"

    cryptsetup close "$name"
    [ ! -e "/dev/mapper/$name" ] || { echo "/dev/mapper/$name still there after close" >&2; exit 1; }
    losetup -d "$dev"
    dev=
    echo "closed: ok"
    exit 0
fi

step() { echo; echo "== $*"; }
fail() { echo "vm/selftest: FAIL: $*" >&2; exit 1; }

vm/install.sh
if [ ! -x target/release/luks-agent ]; then
    step "cargo build --release"
    cargo build --release --locked
fi

step "device-mapper in the guest"
out=$(vm/run.sh -- /bin/sh -c 'cat /proc/misc | grep device-mapper; uname -r')
echo "$out"
grep -q 'device-mapper' <<<"$out" || fail "no device-mapper in the guest"

step "exit code propagation (exit 3)"
rc=0
vm/run.sh -- /bin/sh -c 'echo failing on purpose; exit 3' || rc=$?
[ "$rc" = 3 ] || fail "vm/run.sh exited $rc, want 3"
echo "vm/run.sh exited 3: ok"

step "--env and --results"
res=target/vm/selftest-results
rm -rf "$res"
vm/run.sh --env GREETING='hello from the host' --results "$res" -- \
    /bin/sh -c 'echo "$GREETING" >"$VM_RESULTS/greeting"; pwd >"$VM_RESULTS/cwd"'
[ "$(cat "$res/greeting")" = 'hello from the host' ] || fail "--env/--results: $(cat "$res/greeting" 2>&1)"
[ "$(cat "$res/cwd")" = "$PWD" ] || fail "cwd in the guest: $(cat "$res/cwd"), want $PWD"
rm -rf "$res"
echo "environment and results directory: ok"

step "dm-crypt round trip with cryptsetup and luks-agent"
start=$EPOCHREALTIME
vm/run.sh -- "$PWD/vm/selftest.sh" guest-roundtrip
echo "round trip: ok ($(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s in all)"

echo
echo "vm/selftest: all passed"
