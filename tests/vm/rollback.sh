#!/bin/sh
# VM tier: a failed attach rolls back what it created. The failure is real
# and comes after the mapping exists: the device path cannot be repointed
# (it lives on a read-only file system; or a directory stands where the
# temporary link must go). Afterwards there must be no mapping, no node, no
# `luks-agent:` key in the keyring, no attach record, the link unchanged,
# and the error must name the cause. With the removal of the mapping made
# to fail too (strace injects EBUSY into device-mapper ioctls), the
# error must name both.
# Runs as root in the guest (vm/run.sh); exits non-zero on any failure.
. tests/vm/lib.sh
RUN=/run/luks-agent
our_keys() { grep -c 'logon .*luks-agent:' /proc/keys || true; }

new_volume() { # name link-dir -> VID DEV LINK MAP KEY ENC
    VID=vol-$1
    truncate -s 24M "$W/$1.img"
    DEV=$(losetup --find --show "$W/$1.img")
    LINK=$2/os-brick+$1
    ln -sfn "$DEV" "$LINK"
    MAP=crypt-os-brick+$1
    KEY=$($A keys create)
    ENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
}
attach() { $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json; }
rolled_back() { # context
    ! dmsetup info "$MAP" >/dev/null 2>&1 || fail "$1: mapping $MAP left"
    [ ! -e "/dev/mapper/$MAP" ] || fail "$1: node left"
    [ "$(readlink "$LINK")" = "$DEV" ] || fail "$1: link -> $(readlink "$LINK")"
    [ ! -e "$RUN/volumes/$VID.json" ] && [ ! -e "$RUN/volumes/$VID.json.tmp" ] || fail "$1: attach record left"
    i=0
    while [ "$(our_keys)" != 0 ]; do
        i=$((i + 1))
        [ $i -lt 40 ] || fail "$1: keys left: $(grep luks-agent: /proc/keys)"
        sleep 0.05
    done
}

# 1. The link lives on a read-only file system.
mkdir "$W/ro"
mount -t tmpfs tmpfs "$W/ro"
new_volume ro "$W/ro"
mount -o remount,ro "$W/ro"
set +e
attach >/dev/null 2>"$W/err"
rc=$?
set -e
[ "$rc" -ne 0 ] || fail "read-only link: attach succeeded"
grep -q "repointing $LINK" "$W/err" && grep -q "Read-only file system" "$W/err" || fail "read-only link: cause not reported: $(cat "$W/err")"
! grep -q "rollback" "$W/err" || fail "read-only link: rollback reported failing: $(cat "$W/err")"
rolled_back "read-only link"
# The format itself stays (it destroyed nothing and is recorded): a later
# attach through a writable path opens it without formatting again.
UUID=$($BIN luks dump --json "$DEV" | sed -n 's/^{"version":[0-9]*,"uuid":"\([^"]*\)".*/\1/p')
[ -n "$UUID" ] || fail "read-only link: no header after the rolled back first use"
pass "repointing a link on a read-only file system fails (exit $rc: $(sed 's/.*: //' "$W/err" | head -c 60)): mapping, key, record rolled back, link untouched"
ln -sfn "$DEV" "/dev/disk/by-id/os-brick+ro"
LINK=/dev/disk/by-id/os-brick+ro
OUT=$(attach)
echo "$OUT" | grep -q '"formatted":false' || fail "read-only link: formatted again: $OUT"
$A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC"
rolled_back "read-only link, detached"
pass "the volume formatted before the rollback attaches later without a new format"
umount "$W/ro"
losetup -d "$DEV"

# 2. A directory where the temporary link must go.
new_volume dir /dev/disk/by-id
mkdir "/dev/disk/by-id/.os-brick+dir.luks-agent-tmp"
touch "/dev/disk/by-id/.os-brick+dir.luks-agent-tmp/x"
set +e
attach >/dev/null 2>"$W/err"
rc=$?
set -e
[ "$rc" -ne 0 ] || fail "directory: attach succeeded"
grep -q "repointing $LINK" "$W/err" && grep -q "File exists" "$W/err" || fail "directory: cause not reported: $(cat "$W/err")"
rolled_back "directory in the way"
rm -r "/dev/disk/by-id/.os-brick+dir.luks-agent-tmp"
OUT=$(attach)
echo "$OUT" | grep -q '"formatted":false' || fail "directory: formatted again: $OUT"
$A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC"
rolled_back "directory in the way, detached"
losetup -d "$DEV"
pass "a directory where the link must go fails the attach (exit $rc): rolled back; attaches once it is gone"

# 3. The rollback fails too: device-mapper answers EBUSY to every ioctl
# from the rollback's first DM_DEV_REMOVE on (strace fault injection), so
# the mapping cannot be removed. Which ioctl that is comes from a traced run
# of the same failing first-use attach on a twin volume.
mount -t tmpfs tmpfs "$W/ro"
new_volume twin "$W/ro"
mount -o remount,ro "$W/ro"
strace -f -qq -o "$W/trace" -e trace=ioctl $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1 || true
rolled_back "twin"
N=$(awk '/DM_DEV_REMOVE/ { print NR; exit }' "$W/trace")
[ -n "$N" ] || fail "no DM_DEV_REMOVE in the traced rollback"
losetup -d "$DEV"
umount "$W/ro"
mount -t tmpfs tmpfs "$W/ro"
new_volume busy "$W/ro"
mount -o remount,ro "$W/ro"
set +e
strace -f -qq -o /dev/null -e trace=ioctl -e inject="ioctl:error=EBUSY:when=$N+" \
    $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>"$W/err"
rc=$?
set -e
[ "$rc" -ne 0 ] || fail "busy rollback: attach succeeded"
grep -q "repointing $LINK" "$W/err" || fail "busy rollback: cause missing: $(cat "$W/err")"
grep -q "rollback also failed: device-mapper .* of '$MAP' .*EBUSY" "$W/err" || fail "busy rollback: rollback failure missing: $(cat "$W/err")"
# The volume is named once, at the front.
[ "$(grep -o "volume $VID" "$W/err" | wc -l)" = 1 ] || fail "busy rollback: the volume is not named exactly once: $(cat "$W/err")"
# What could be undone was: the record; the key never outlives the load.
[ ! -e "$RUN/volumes/$VID.json" ] || fail "busy rollback: record left"
[ "$(our_keys)" = 0 ] || sleep 0.5
[ "$(our_keys)" = 0 ] || fail "busy rollback: key left"
dmsetup info "$MAP" >/dev/null 2>&1 || fail "busy rollback: the mapping should still be there"
$A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC"
rolled_back "busy rollback, detached"
losetup -d "$DEV"
umount "$W/ro"
pass "a rollback that cannot remove the mapping reports cause and rollback failure (exit $rc); detach clears the mapping"
echo "VM rollback: all checks passed in $(($(ms) - T0)) ms"
