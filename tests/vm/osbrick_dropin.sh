#!/bin/sh
# VM tier: luks-agent as a drop-in for os-brick's LUKS encryptors, both
# ways, against the real os-brick from PyPI (tests/harness/osbrick.sh)
# driven as nova drives it (tests/vm/osbrick_driver.py): get_volume_encryptor
# + attach_volume/detach_volume, device_path a symlink to the loop device,
# a key manager whose key is the same 32 bytes as our local key store's.
# For LUKS1 (provider luks) and LUKS2 (luks2):
#   A. os-brick formats and attaches, data written through its mapping,
#      os-brick detaches; luks-agent attaches (same mapping name, DM uuid,
#      table and symlink), reads that data, writes its own, detaches;
#      os-brick attaches again and reads ours; luks-agent's attach of
#      os-brick's live mapping is idempotent and its detach removes it.
#   B. luks-agent formats on first use, writes, detaches; os-brick attaches
#      without reformatting (header bytes and LUKS UUID unchanged), reads
#      our data, detaches.
# Runs as root in the guest (vm/run.sh). Every check exits non-zero on
# failure; a missing os-brick venv is a failure, never a skip.
. tests/vm/lib.sh
VENV=${LUKS_AGENT_OSBRICK_VENV:-/var/cache/luks-agent-tests/osbrick-venv}
T_START=$T0

LUKS_AGENT_OSBRICK_VENV=$VENV tests/harness/osbrick.sh check \
    || fail "os-brick venv missing: run tests/harness/osbrick.sh install (scripts/install-deps.sh does) on the host"
[ -x "$BIN" ] || fail "$BIN missing: cargo build --release"
PY=$VENV/bin/python
OSBRICK_VERSION=$($PY -c 'import importlib.metadata as m; print(m.version("os-brick"))')

# os-brick in one long-lived process (as in nova-compute): importing it
# costs seconds under TCG. Requests and answers are JSON lines over FIFOs.
mkfifo "$W/brick.in" "$W/brick.out"
$PY tests/vm/osbrick_driver.py serve <"$W/brick.in" >"$W/brick.out" 2>"$W/brick.err" &
BRICK_PID=$!
cleanup() { kill "$BRICK_PID" 2>/dev/null || true; }
trap cleanup EXIT
exec 3>"$W/brick.in" 4<"$W/brick.out"

# brick OP PROVIDER LINK KEY: os-brick attach_volume/detach_volume. The key
# reaches os-brick as the path of our key store's 0600 file for KEY.
brick() {
    echo "{\"op\": \"$1\", \"provider\": \"$2\", \"device_path\": \"$3\", \"key_id\": \"$4\", \"key_file\": \"$W/keys/$4\"}" >&3
    read -r BRICK_REPLY <&4 || fail "os-brick driver died: $(cat "$W/brick.err")"
    case "$BRICK_REPLY" in
        *'"ok": true'*) BRICK_S=$(echo "$BRICK_REPLY" | sed 's/.*"seconds": \([0-9.]*\).*/\1/') ;;
        *) fail "os-brick $1 ($2, $3): $BRICK_REPLY" ;;
    esac
}

new_volume() { # name -> DEV (loop), LINK (the connector's symlink), MAP
    truncate -s 32M "$W/$1.img"
    DEV=$(losetup --find --show "$W/$1.img")
    LINK=/dev/disk/by-id/os-brick+$1
    ln -sfn "$DEV" "$LINK"
    MAP=crypt-os-brick+$1
}
luks_uuid() { cryptsetup luksUUID "$DEV"; }
header_sum() { # the header and keyslot area (everything before the data)
    off=$($BIN luks dump --json "$DEV" | sed 's/.*"data_offset_bytes":\([0-9]*\).*/\1/')
    head -c "$off" "$DEV" | sha256sum | cut -d' ' -f1
}
# The crypt table without the key field (5) and the optional parameters.
table_nokey() { dmsetup table "$1" | awk '{print $1,$2,$3,$4,$6,$7,$8}'; }
table_opts() { dmsetup table "$1" | cut -d' ' -f9-; }
pattern() { dd if=/dev/urandom of="$W/$1" bs=64k count=16 status=none; }
write() { dd if="$W/$1" of="$2" bs=64k oflag=direct status=none; }
same() { cmp -n 1048576 "$W/$1" "$2"; }

# A first os-brick call starts its privsep daemon; do that outside the
# timed steps (the start of nova-compute).
t0=$(ms)
echo '{"op": "warmup"}' >&3
read -r BRICK_REPLY <&4 || fail "os-brick driver did not start: $(cat "$W/brick.err")"
case "$BRICK_REPLY" in *'"ok": true'*) ;; *) fail "os-brick driver warm-up: $BRICK_REPLY $(cat "$W/brick.err")" ;; esac
pass "os-brick $OSBRICK_VERSION driver up in $(($(ms) - t0)) ms (import under TCG)"

for provider in luks luks2; do
    case $provider in luks) version=1 ;; luks2) version=2 ;; esac
    ENC_OF() { echo "{\"provider\": \"$provider\", \"control_location\": \"front-end\", \"cipher\": \"aes-xts-plain64\", \"key_size\": 256, \"encryption_key_id\": \"$1\"}"; }

    # ---- A. os-brick formats; luks-agent attaches.
    KEY=$($A keys create)
    [ "$(stat -c %a "$W/keys/$KEY")" = 600 ] || fail "key store file mode $(stat -c %a "$W/keys/$KEY")"
    ENC=$(ENC_OF "$KEY")
    new_volume "ob-$provider"
    VID=vol-ob-$provider
    brick attach "$provider" "$LINK" "$KEY"
    [ -b "/dev/mapper/$MAP" ] || fail "$provider: os-brick made no /dev/mapper/$MAP"
    [ "$(readlink "$LINK")" = "/dev/mapper/$MAP" ] || fail "$provider: os-brick left $LINK -> $(readlink "$LINK")"
    cryptsetup luksDump "$DEV" | grep -q "^Version:[[:space:]]*$version\$" || fail "$provider: os-brick did not write LUKS$version"
    UUID=$(luks_uuid)
    BRICK_DMUUID=$(dmsetup info -c --noheadings -o uuid "$MAP")
    BRICK_TABLE=$(table_nokey "$MAP")
    BRICK_OPTS=$(table_opts "$MAP")
    pattern p1
    write p1 "$LINK"
    pass "$provider: os-brick formatted LUKS$version and attached in ${BRICK_S} s; mapping $MAP, $LINK -> /dev/mapper/$MAP"
    brick detach "$provider" "$LINK" "$KEY"
    [ ! -e "/dev/mapper/$MAP" ] || fail "$provider: os-brick detach left the mapping"
    # os-brick leaves the symlink pointing at the removed mapping; the
    # connector recreates it at the next connect. Do the connector's part.
    ln -sfn "$DEV" "$LINK"

    t0=$(ms)
    OUT=$($A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json) || fail "$provider: we cannot attach os-brick's volume"
    t1=$(ms)
    echo "$OUT" | grep -q '"formatted":false' || fail "$provider: we formatted os-brick's volume: $OUT"
    echo "$OUT" | grep -q "\"mapping\":\"$MAP\"" || fail "$provider: our mapping name differs from os-brick's $MAP: $OUT"
    [ "$(luks_uuid)" = "$UUID" ] || fail "$provider: LUKS UUID changed"
    [ "$(readlink "$LINK")" = "/dev/mapper/$MAP" ] || fail "$provider: our symlink $(readlink "$LINK"), os-brick's /dev/mapper/$MAP"
    [ "$(dmsetup info -c --noheadings -o uuid "$MAP")" = "$BRICK_DMUUID" ] || fail "$provider: DM uuid $(dmsetup info -c --noheadings -o uuid "$MAP"), os-brick's $BRICK_DMUUID"
    [ "$(table_nokey "$MAP")" = "$BRICK_TABLE" ] || fail "$provider: table '$(table_nokey "$MAP")', os-brick's '$BRICK_TABLE'"
    same p1 "$LINK" || fail "$provider: we read different data than os-brick wrote"
    pass "$provider: we attach os-brick's volume in $((t1 - t0)) ms and read its data; same mapping name, symlink, DM uuid and table (options: ours '$(table_opts "$MAP")', os-brick's '$BRICK_OPTS')"
    pattern p2
    write p2 "$LINK"
    $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null
    [ "$(readlink "$LINK")" = "$DEV" ] || fail "$provider: symlink not restored after our detach"

    brick attach "$provider" "$LINK" "$KEY"
    [ "$(luks_uuid)" = "$UUID" ] || fail "$provider: os-brick reformatted"
    same p2 "$LINK" || fail "$provider: os-brick reads different data than we wrote"
    pass "$provider: os-brick attaches it again in ${BRICK_S} s and reads what we wrote"
    OUT=$($A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json)
    echo "$OUT" | grep -q '"action":"identity"' || fail "$provider: our attach over os-brick's mapping: $OUT"
    [ "$(dmsetup ls | grep -c "^${MAP}[[:space:]]")" -eq 1 ] || fail "$provider: not exactly one mapping"
    $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null
    [ ! -e "/dev/mapper/$MAP" ] || fail "$provider: our detach left os-brick's mapping"
    if cryptsetup status "$MAP" >/dev/null 2>&1; then fail "$provider: cryptsetup still sees $MAP"; fi
    brick detach "$provider" "$LINK" "$KEY"
    pass "$provider: our attach of os-brick's live mapping is idempotent, our detach removes it, os-brick's detach after that succeeds"
    losetup -d "$DEV"

    # ---- B. luks-agent formats; os-brick attaches.
    KEY=$($A keys create)
    ENC=$(ENC_OF "$KEY")
    new_volume "ag-$provider"
    VID=vol-ag-$provider
    OUT=$($A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json)
    echo "$OUT" | grep -q '"formatted":true' || fail "$provider: our first attach did not format: $OUT"
    cryptsetup luksDump "$DEV" | grep -q "^Version:[[:space:]]*$version\$" || fail "$provider: we did not write LUKS$version"
    OUR_DMUUID=$(dmsetup info -c --noheadings -o uuid "$MAP")
    OUR_TABLE=$(table_nokey "$MAP")
    pattern p3
    write p3 "$LINK"
    $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null
    UUID=$(luks_uuid)
    HSUM=$(header_sum)

    brick attach "$provider" "$LINK" "$KEY"
    [ "$(luks_uuid)" = "$UUID" ] || fail "$provider: os-brick changed our LUKS UUID (reformatted)"
    [ "$(header_sum)" = "$HSUM" ] || fail "$provider: os-brick changed our header bytes"
    [ "$(readlink "$LINK")" = "/dev/mapper/$MAP" ] || fail "$provider: os-brick's symlink $(readlink "$LINK")"
    [ "$(dmsetup info -c --noheadings -o uuid "$MAP")" = "$OUR_DMUUID" ] || fail "$provider: os-brick's DM uuid differs from ours ($OUR_DMUUID)"
    [ "$(table_nokey "$MAP")" = "$OUR_TABLE" ] || fail "$provider: os-brick's table '$(table_nokey "$MAP")', ours '$OUR_TABLE'"
    same p3 "$LINK" || fail "$provider: os-brick reads different data than we wrote"
    pass "$provider: os-brick attaches our volume in ${BRICK_S} s without reformatting (UUID and header bytes unchanged), reads our data; same mapping, DM uuid and table"
    brick detach "$provider" "$LINK" "$KEY"
    [ ! -e "/dev/mapper/$MAP" ] || fail "$provider: os-brick detach left the mapping"
    losetup -d "$DEV"
done

echo "VM os-brick drop-in: all checks passed in $(($(ms) - T_START)) ms (os-brick $OSBRICK_VERSION, $(cryptsetup --version | cut -d' ' -f1-2), kernel $(uname -r))"
