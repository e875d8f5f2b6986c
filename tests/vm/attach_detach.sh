#!/bin/sh
# VM tier: attach and detach for real, inside a guest with device-mapper.
# Runs as root in the guest (vm/run.sh); the host's cryptsetup and dmsetup
# are the oracles. Every check exits non-zero on failure.
. tests/vm/lib.sh

new_volume() { # name size -> sets DEV (loop) and LINK (symlink like os-brick's)
    truncate -s "$2" "$W/$1.img"
    DEV=$(losetup --find --show "$W/$1.img")
    LINK=/dev/disk/by-id/os-brick+$1
    ln -sfn "$DEV" "$LINK"
}

for provider in luks luks2; do
    KEY=$($A keys create)
    ENC="{\"provider\": \"$provider\", \"control_location\": \"front-end\", \"cipher\": \"aes-xts-plain64\", \"key_size\": 256, \"encryption_key_id\": \"$KEY\"}"
    new_volume "vol-$provider" 64M
    VID=vol-$provider
    MAP=crypt-os-brick+vol-$provider

    t0=$(ms)
    OUT=$($A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json)
    t1=$(ms)
    echo "$OUT" | grep -q '"formatted":true' || fail "$provider: first attach did not format: $OUT"
    [ -b "/dev/mapper/$MAP" ] || fail "$provider: /dev/mapper/$MAP missing"
    [ "$(readlink "$LINK")" = "/dev/mapper/$MAP" ] || fail "$provider: symlink not repointed"
    pass "$provider: first attach formatted and mapped in $((t1 - t0)) ms (process included)"

    TABLE=$(dmsetup table --showkeys "$MAP")
    echo "$TABLE" | grep -q ":32:logon:luks-agent:" || fail "$provider: table has no keyring reference: $TABLE"
    cryptsetup status "$MAP" | grep -q "type:.*LUKS" || fail "$provider: cryptsetup status does not recognise the mapping"
    UUID=$(dmsetup info -c --noheadings -o uuid "$MAP")
    case "$UUID" in CRYPT-LUKS[12]-*-"$MAP") ;; *) fail "$provider: dm uuid $UUID" ;; esac
    pass "$provider: table references the keyring, cryptsetup status and dm uuid as cryptsetup"

    dd if=/dev/urandom of="$W/pattern" bs=64k count=16 status=none
    dd if="$W/pattern" of="/dev/mapper/$MAP" bs=64k oflag=direct status=none
    OUT2=$($A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json)
    echo "$OUT2" | grep -q '"action":"identity"' || fail "$provider: second attach not idempotent: $OUT2"

    t0=$(ms)
    $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC"
    t1=$(ms)
    [ ! -e "/dev/mapper/$MAP" ] || fail "$provider: mapping still there after detach"
    [ "$(readlink "$LINK")" = "$DEV" ] || fail "$provider: symlink not restored"
    $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC" || fail "$provider: second detach failed"
    pass "$provider: detach in $((t1 - t0)) ms removes the mapping and restores the symlink; twice is fine"

    # The passphrase os-brick would derive opens it with cryptsetup.
    $A keys fetch --key-id "$KEY" --reveal --check 2>/dev/null | sed -n 's/^passphrase: //p' | tr -d '\n' >"$W/pass-$provider"
    cryptsetup open --key-file "$W/pass-$provider" "$DEV" "cs-$provider"
    cmp -n 1048576 "$W/pattern" "/dev/mapper/cs-$provider" || fail "$provider: cryptsetup reads different data"
    dd if=/dev/urandom of="$W/pattern" bs=64k count=16 status=none
    dd if="$W/pattern" of="/dev/mapper/cs-$provider" bs=64k oflag=direct status=none
    cryptsetup close "cs-$provider"
    pass "$provider: cryptsetup opens our volume with os-brick's passphrase, reads our data and writes its own"

    t0=$(ms)
    OUT3=$($A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json)
    t1=$(ms)
    echo "$OUT3" | grep -q '"formatted":false' || fail "$provider: re-attach formatted again: $OUT3"
    cmp -n 1048576 "$W/pattern" "/dev/mapper/$MAP" || fail "$provider: we do not read what cryptsetup wrote"
    pass "$provider: re-attach of a formatted volume in $((t1 - t0)) ms reads what cryptsetup wrote"

    # A wrong key for an existing volume: refused, never reformatted.
    $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC"
    OTHER_KEY=$($A keys create)
    BEFORE=$(sha256sum "$DEV" | cut -d' ' -f1)
    set +e
    $A attach --volume-id "$VID" --device "$LINK" --encryption "$(echo "$ENC" | sed "s/$KEY/$OTHER_KEY/")" 2>"$W/err"
    rc=$?
    set -e
    [ "$rc" -eq 2 ] || fail "$provider: wrong key gave exit $rc: $(cat "$W/err")"
    [ "$(sha256sum "$DEV" | cut -d' ' -f1)" = "$BEFORE" ] || fail "$provider: wrong key changed the device"
    $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null
    pass "$provider: a wrong key is refused (exit 2), the volume untouched"

    # Extend: the backing device grows, the mapping follows.
    OLD=$(blockdev --getsize64 "/dev/mapper/$MAP")
    truncate -s 96M "$W/vol-$provider.img"
    losetup -c "$DEV"
    NEW=$($A extend --volume-id "$VID" --device "$LINK" --encryption "$ENC")
    GOT=$(blockdev --getsize64 "/dev/mapper/$MAP")
    OFFSET=$($BIN luks dump --json "$DEV" | sed 's/.*"data_offset_bytes":\([0-9]*\).*/\1/')
    [ "$NEW" = "$GOT" ] || fail "$provider: extend reported $NEW, mapping is $GOT"
    [ "$GOT" -eq $((96 * 1024 * 1024 - OFFSET)) ] || fail "$provider: extended size $GOT (was $OLD, data offset $OFFSET)"
    cmp -n 1048576 "$W/pattern" "/dev/mapper/$MAP" || fail "$provider: data changed by extend"
    $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC"
    pass "$provider: extend grows the mapping from $OLD to $GOT bytes (device size minus data offset), data intact"

    # The guard: header destroyed after use -> the marker refuses a format.
    dd if=/dev/zero of="$DEV" bs=1M count=17 status=none
    BEFORE=$(sha256sum "$DEV" | cut -d' ' -f1)
    if $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" 2>"$W/err"; then fail "$provider: formatted over a used volume"; fi
    grep -q "records key .* as formatted" "$W/err" || fail "$provider: wrong refusal: $(cat "$W/err")"
    [ "$(sha256sum "$DEV" | cut -d' ' -f1)" = "$BEFORE" ] || fail "$provider: refused attach wrote to the device"
    pass "$provider: a used volume whose header vanished is refused, nothing written"
    losetup -d "$DEV"
done

# Plain mode: the same key and table as `cryptsetup create --key-file=-`.
KEY=$($A keys create)
new_volume plain 32M
ENC="{\"provider\": \"plain\", \"control_location\": \"front-end\", \"cipher\": \"aes-xts-plain64\", \"key_size\": 256, \"encryption_key_id\": \"$KEY\"}"
$A attach --volume-id vol-plain --device "$LINK" --encryption "$ENC" >/dev/null
MAP=crypt-os-brick+plain
[ "$(dmsetup info -c --noheadings -o uuid "$MAP")" = "CRYPT-PLAIN-$MAP" ] || fail "plain: dm uuid"
OURS=$(dmsetup table --showkeys "$MAP")
echo "$OURS" | grep -q ":32:logon:luks-agent:" || fail "plain: no keyring reference: $OURS"
dd if=/dev/urandom of="$W/pattern" bs=64k count=16 status=none
dd if="$W/pattern" of="/dev/mapper/$MAP" bs=64k oflag=direct status=none
$A detach --volume-id vol-plain --device "$LINK" --encryption "$ENC"
$A keys fetch --key-id "$KEY" --reveal --check 2>/dev/null | sed -n 's/^passphrase: //p' | tr -d '\n' >"$W/pass-plain"
cryptsetup create --key-file=- --cipher aes-xts-plain64 --key-size 256 cs-plain "$DEV" <"$W/pass-plain"
THEIRS=$(dmsetup table cs-plain)
# Same target: length, cipher, iv offset, device and offset; only the key
# field differs in form (ours a keyring reference, theirs the key itself).
[ "$(echo "$OURS" | awk '{print $1,$2,$3,$4,$6,$7,$8}')" = "$(echo "$THEIRS" | awk '{print $1,$2,$3,$4,$6,$7,$8}')" ] \
    || fail "plain: tables differ: ours '$OURS' theirs '$THEIRS'"
cmp -n 1048576 "$W/pattern" /dev/mapper/cs-plain || fail "plain: cryptsetup reads different data (different key)"
cryptsetup remove cs-plain
losetup -d "$DEV"
pass "plain: same table as cryptsetup create (but the key), and cryptsetup reads what we wrote"

# Concurrency: two attaches of one volume at once make one mapping (one
# formats and creates, the other finds it); a busy mapping is retried by
# detach until its user lets go.
KEY=$($A keys create)
new_volume conc 32M
ENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
$A attach --volume-id vol-conc --device "$LINK" --encryption "$ENC" --json >"$W/c1" 2>&1 &
P1=$!
$A attach --volume-id vol-conc --device "$LINK" --encryption "$ENC" --json >"$W/c2" 2>&1 &
P2=$!
wait $P1 || fail "concurrent attach 1: $(cat "$W/c1")"
wait $P2 || fail "concurrent attach 2: $(cat "$W/c2")"
cat "$W/c1" "$W/c2" | grep -c '"action":"created"' | grep -qx 1 || fail "concurrent attaches: $(cat "$W/c1" "$W/c2")"
cat "$W/c1" "$W/c2" | grep -c '"formatted":true' | grep -qx 1 || fail "concurrent attaches formatted twice"
[ "$(dmsetup ls | grep -c 'crypt-os-brick+conc')" -eq 1 ] || fail "concurrent attaches: not exactly one mapping"
pass "two concurrent attaches of one volume: one format, one mapping, both succeed"
MAP=crypt-os-brick+conc
sleep 2 <"/dev/mapper/$MAP" &
HOLDER=$!
$A detach --volume-id vol-conc --device "$LINK" --encryption "$ENC" 2>"$W/err" || fail "detach of a briefly busy mapping: $(cat "$W/err")"
wait $HOLDER || true
[ ! -e "/dev/mapper/$MAP" ] || fail "busy mapping not removed"
pass "detach retries a busy mapping until it is released"
losetup -d "$DEV"

# An interrupted format: keyslot bytes written, no header yet. Without our
# record of the format it is refused (bytes we cannot account for), and so
# it is with a record that names no UUID (an older version's, which proves
# nothing); with the record a crash leaves (device and the UUID the format
# was writing) the next attach formats again under that UUID. Every refusal
# leaves the device as it was.
KEY=$($A keys create)
new_volume torn 32M
ENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
dd if=/dev/urandom of="$DEV" bs=4096 seek=8 count=32 conv=notrunc status=none
BEFORE=$(sha256sum <"$DEV")
if $A attach --volume-id vol-torn --device "$LINK" --encryption "$ENC" 2>"$W/err"; then fail "torn: attached without a record"; fi
grep -q "not blank" "$W/err" || fail "torn: wrong refusal: $(cat "$W/err")"
mkdir -p "$W/state/formatting" && echo "$DEV" >"$W/state/formatting/vol-torn"
if $A attach --volume-id vol-torn --device "$LINK" --encryption "$ENC" 2>"$W/err"; then fail "torn: formatted on a record without a UUID"; fi
grep -q "not blank" "$W/err" || fail "torn: wrong refusal with a record without a UUID: $(cat "$W/err")"
[ "$(sha256sum <"$DEV")" = "$BEFORE" ] || fail "torn: a refused attach wrote to the device"
UUID=$(cat /proc/sys/kernel/random/uuid)
printf '%s\n%s\n' "$DEV" "$UUID" >"$W/state/formatting/vol-torn"
$A attach --volume-id vol-torn --device "$LINK" --encryption "$ENC" --json | grep -q '"formatted":true' || fail "torn: not re-formatted"
[ "$(cryptsetup luksUUID "$DEV")" = "$UUID" ] || fail "torn: the redo did not keep the recorded UUID"
[ ! -e "$W/state/formatting/vol-torn" ] || fail "torn: record not cleared after the format"
$A detach --volume-id vol-torn --device "$LINK" --encryption "$ENC"
losetup -d "$DEV"
pass "an interrupted format is redone from our record under its UUID, refused without it or with an old record, untouched"

# The guard: xfs, a GPT, random data and a blank device whose key is
# marked formatted are all refused without a byte written.
refuse() { # name what
    KEY=$($A keys create)
    ENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
    if [ "$2" = marked ]; then
        mkdir -p "$W/state/formatted" && echo "$KEY" >"$W/state/formatted/$KEY"
    fi
    BEFORE=$(sha256sum "$DEV" | cut -d' ' -f1)
    set +e
    $A attach --volume-id "vol-$1" --device "$LINK" --encryption "$ENC" 2>"$W/err"
    rc=$?
    set -e
    [ "$rc" -eq 5 ] || fail "$1: exit $rc, expected 5: $(cat "$W/err")"
    [ "$(sha256sum "$DEV" | cut -d' ' -f1)" = "$BEFORE" ] || fail "$1: device changed"
    pass "$1 is refused (exit 5: $(sed 's/.*refusing to format: //' "$W/err" | head -c 90)), nothing written"
    losetup -d "$DEV"
}
new_volume xfs 320M
mkfs.xfs -q "$DEV"
refuse xfs fs
new_volume gpt 32M
printf 'label: gpt\n,8M\n' | sfdisk -q "$DEV" >/dev/null
refuse gpt pt
new_volume random 32M
dd if=/dev/urandom of="$DEV" bs=1M count=1 seek=8 conv=notrunc status=none
dd if=/dev/urandom of="$DEV" bs=64k count=1 conv=notrunc status=none
refuse random data
new_volume marked 32M
refuse marked marked

# The guard: a device that holds a filesystem is never formatted.
if command -v mkfs.ext4 >/dev/null 2>&1; then
    KEY=$($A keys create)
    new_volume fs 64M
    mkfs.ext4 -q "$DEV"
    BEFORE=$(sha256sum "$DEV" | cut -d' ' -f1)
    ENC="{\"provider\": \"luks\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
    set +e
    $A attach --volume-id vol-fs --device "$LINK" --encryption "$ENC" 2>"$W/err"
    rc=$?
    set -e
    [ "$rc" -eq 5 ] || fail "ext4: exit $rc, expected 5: $(cat "$W/err")"
    grep -q "not blank" "$W/err" || fail "ext4: wrong refusal: $(cat "$W/err")"
    [ "$(sha256sum "$DEV" | cut -d' ' -f1)" = "$BEFORE" ] || fail "ext4: device changed"
    pass "a device holding ext4 is refused (exit 5), nothing written"
    losetup -d "$DEV"
else
    fail "mkfs.ext4 missing on the host"
fi

# udev: our rules give the mapping /dev/disk/by-id/luks-agent-<volume id>
# and keep the encrypted lower device away from desktop tools. udev does
# not run in the guest; `udevadm test` evaluates the rules for a device.
KEY=$($A keys create)
new_volume udev 32M
ENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
$A attach --volume-id vol-udev-1 --device "$LINK" --encryption "$ENC" >/dev/null
mount -t tmpfs tmpfs /etc/udev/rules.d
sed "s|/usr/bin/luks-agent|$PWD/$BIN|" udev/61-luks-agent.rules >/etc/udev/rules.d/61-luks-agent.rules
DMDEV=$(dmsetup info -c --noheadings -o blkdevname crypt-os-brick+udev)
udevadm test --action=add "/sys/class/block/$DMDEV" 2>/dev/null >"$W/udev-dm" || true
grep -qx "DEVLINKS=.*/dev/disk/by-id/luks-agent-vol-udev-1.*" "$W/udev-dm" || fail "udev: no stable link: $(grep -E 'DEVLINKS|LUKS_AGENT' "$W/udev-dm")"
udevadm test --action=add "/sys/class/block/$(basename "$DEV")" 2>/dev/null >"$W/udev-lower" || true
grep -qx "UDISKS_IGNORE=1" "$W/udev-lower" || fail "udev: lower device not hidden"
umount /etc/udev/rules.d
$A detach --volume-id vol-udev-1 --device "$LINK" --encryption "$ENC"
losetup -d "$DEV"
pass "udev rules: /dev/disk/by-id/luks-agent-<volume id> for the mapping, lower device ignored by desktop tools"

# Older mapping names, as os-brick reuses them: a mapping that already
# exists under the bare basename of the device path, or under the
# multipath WWN, is the volume's mapping (attach reuses it, detach removes
# it); no second mapping is made.
legacy() { # what name [attach options]
    KEY=$($A keys create)
    new_volume "$1" 32M
    ENC="{\"provider\": \"luks\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
    vid=vol-$1
    shift
    name=$1
    shift
    $A attach --volume-id "$vid" --device "$LINK" --encryption "$ENC" >/dev/null
    $A detach --volume-id "$vid" --device "$LINK" --encryption "$ENC"
    $A keys fetch --key-id "$KEY" --reveal --check 2>/dev/null | sed -n 's/^passphrase: //p' | tr -d '\n' >"$W/pass-legacy"
    cryptsetup open --key-file "$W/pass-legacy" "$DEV" "$name"
    rm -f "$W/pass-legacy"
    OUT=$($A attach --volume-id "$vid" --device "$LINK" --encryption "$ENC" "$@" --json)
    echo "$OUT" | grep -q "\"mapping\":\"$name\"" || fail "legacy $name: not reused: $OUT"
    echo "$OUT" | grep -q '"action":"identity"' || fail "legacy $name: not an identity attach: $OUT"
    [ "$(dmsetup ls | grep -c "^crypt-os-brick+")" -eq 0 ] || fail "legacy $name: a second mapping was made: $(dmsetup ls)"
    [ "$(readlink "$LINK")" = "/dev/mapper/$name" ] || fail "legacy $name: symlink points at $(readlink "$LINK")"
    $A detach --volume-id "$vid" --device "$LINK" --encryption "$ENC" "$@"
    [ ! -e "/dev/mapper/$name" ] || fail "legacy $name: detach left the mapping"
    losetup -d "$DEV"
}
legacy legacy-base os-brick+legacy-base
legacy legacy-wwn 3600a098038303053453f463045727a6d --multipath-id 3600a098038303053453f463045727a6d
pass "mappings under older names (the bare basename, the multipath WWN) are reused and removed, as os-brick does"

# back-end control location and no provider are no-ops.
OUT=$($A attach --volume-id vol-noop --device /dev/null --encryption '{"provider": "luks", "control_location": "back-end"}' --json)
echo "$OUT" | grep -q '"action":"no_op"' || fail "back-end not a no-op: $OUT"
pass "back-end volumes are a no-op"

echo "VM attach/detach: all checks passed"
