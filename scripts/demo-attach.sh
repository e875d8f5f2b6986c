#!/bin/sh
# The main job, end to end on a loop device with the built-in local key
# store: create a key, attach a blank volume (formatted as LUKS2 on first
# use), write through the dm-crypt mapping, detach, attach again (no
# format, milliseconds), read the data back, detach. Needs root and a
# kernel with device-mapper; scripts/demo.sh runs it in a guest otherwise.
set -eu
BIN=${BIN:-target/release/luks-agent}
W=$(mktemp -d /tmp/luks-agent-demo.XXXXXX)
LOOP=""
LINK=/dev/disk/by-id/luks-agent-demo-volume
cleanup() {
    "$BIN" --config "$W/agent.toml" detach --volume-id demo-volume --device "$LINK" \
        --encryption "$ENC" >/dev/null 2>&1 || true
    rm -f "$LINK"
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    rm -rf "$W"
}
ENC='{}'
trap cleanup EXIT

cat >"$W/agent.toml" <<CONF
state_dir = "$W/state"
[key_manager.local]
dir = "$W/keys"
CONF
A="$BIN --config $W/agent.toml"

KEY=$($A keys create)
echo "demo: created key $KEY in the local key store"
ENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"cipher\": \"aes-xts-plain64\", \"key_size\": 256, \"encryption_key_id\": \"$KEY\"}"

truncate -s 64M "$W/volume.img"
LOOP=$(losetup --find --show "$W/volume.img")
mkdir -p /dev/disk/by-id
ln -sfn "$LOOP" "$LINK"
echo "demo: blank volume on $LOOP, device path $LINK -> $LOOP"

echo "demo: attach (first use: formats LUKS2, then maps it)"
$A attach --volume-id demo-volume --device "$LINK" --encryption "$ENC" --json
echo "demo: $LINK now -> $(readlink "$LINK")"
echo "demo: the dm-crypt table references the kernel keyring, never the key:"
dmsetup table --showkeys crypt-luks-agent-demo-volume | sed 's/^/    /'
$A status

echo "hello from an encrypted volume" | dd of=/dev/mapper/crypt-luks-agent-demo-volume conv=sync bs=512 count=1 status=none
if grep -q "hello from an encrypted volume" "$LOOP"; then
    echo "demo: plaintext found on the raw device" >&2
    exit 1
fi
echo "demo: wrote a message; the raw device holds only ciphertext"

echo "demo: detach"
$A detach --volume-id demo-volume --device "$LINK" --encryption "$ENC" --json
echo "demo: $LINK restored -> $(readlink "$LINK")"

echo "demo: attach again (already formatted: unlock and map)"
$A attach --volume-id demo-volume --device "$LINK" --encryption "$ENC" --json
printf 'demo: read back: '
dd if=/dev/mapper/crypt-luks-agent-demo-volume bs=512 count=1 status=none | tr -d '\0'
$A detach --volume-id demo-volume --device "$LINK" --encryption "$ENC" --json

echo "demo: a device that holds a filesystem is never formatted:"
truncate -s 64M "$W/other.img"
OTHER=$(losetup --find --show "$W/other.img")
mkfs.ext4 -q "$OTHER"
ln -sfn "$OTHER" /dev/disk/by-id/luks-agent-demo-other
KEY2=$($A keys create)
if $A attach --volume-id demo-other --device /dev/disk/by-id/luks-agent-demo-other \
    --encryption "{\"provider\": \"luks\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY2\"}"; then
    echo "demo: it formatted a filesystem!" >&2
    exit 1
fi
rm -f /dev/disk/by-id/luks-agent-demo-other
losetup -d "$OTHER"
echo "demo: done"
