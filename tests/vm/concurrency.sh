#!/bin/sh
# VM tier: concurrency. 32 first-use attaches of 32 volumes at once, then
# rounds of 8 racing attach/detach calls for one volume; afterwards every
# volume is detached (32 at once) and nothing may be left: no mapping, no
# /dev/mapper node, no key in the kernel keyring, no stale or temporary
# symlink, no attach record.
# Runs as root in the guest (vm/run.sh); exits non-zero on any failure.
. tests/vm/lib.sh
RUN=/run/luks-agent
# Every key the kernel shows us before we start (id, type, description,
# and for keyrings such as the user and session keyrings their key count):
# afterwards there must be exactly these again.
keys_now() { awk '{ print $1, $8, $9, $10 }' /proc/keys | sort; }
keys_now >"$W/keys-before"
our_keys() { grep -c 'logon .*luks-agent:' /proc/keys || true; }

# Volume i: image, loop device, os-brick style link (one at a time:
# losetup --find races with itself); then its key and metadata (in
# parallel). LUKS1 and LUKS2 alternate.
setup() { # i
    truncate -s 20M "$W/v$1.img"
    dev=$(losetup --find --show "$W/v$1.img")
    echo "$dev" >"$W/dev$1"
    ln -sfn "$dev" "/dev/disk/by-id/os-brick+conc-$1"
}
metadata() { # i
    key=$($A keys create)
    provider=luks2
    [ $(($1 % 2)) -eq 0 ] || provider=luks
    echo "{\"provider\": \"$provider\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$key\"}" >"$W/enc$1"
}
op() { # attach|detach i
    $A "$1" --volume-id "conc-$2" --device "/dev/disk/by-id/os-brick+conc-$2" --encryption-file "$W/enc$2" --json
}

# --- 32 parallel first-use attaches ----------------------------------------
VOLS=$(seq 1 32)
for i in $VOLS; do setup "$i"; done
for i in $VOLS; do metadata "$i" & done
wait
t0=$(ms)
for i in $VOLS; do
    op attach "$i" >"$W/out$i" 2>&1 &
    echo $! >"$W/pid$i"
done
for i in $VOLS; do
    wait "$(cat "$W/pid$i")" || fail "attach $i: $(cat "$W/out$i")"
done
t1=$(ms)
[ "$(cat "$W"/out* | grep '"action":"created"' | grep -c '"formatted":true')" -eq 32 ] || fail "attaches: $(cat "$W"/out*)"
# Each mapping sits on its own volume's loop device and references the
# keyring; each link points at its mapping.
for i in $VOLS; do
    dev=$(cat "$W/dev$i")
    echo "crypt-os-brick+conc-$i ${dev#/dev/}"
    [ -b "/dev/mapper/crypt-os-brick+conc-$i" ] || fail "no node for volume $i"
    [ "$(readlink "/dev/disk/by-id/os-brick+conc-$i")" = "/dev/mapper/crypt-os-brick+conc-$i" ] || fail "link $i not repointed"
done | sort >"$W/want"
dmsetup deps -o devname | sed 's/^\([^:]*\):.*(\(.*\)).*/\1 \2/' | sort >"$W/deps"
cmp -s "$W/want" "$W/deps" || fail "mappings and devices: $(diff "$W/want" "$W/deps")"
[ "$(dmsetup table | grep -c ' crypt .*:logon:luks-agent:')" -eq 32 ] || fail "tables: $(dmsetup table)"
N=$(dmsetup ls | grep -c '^crypt-os-brick+conc-' || true)
[ "$N" -eq 32 ] || fail "$N mappings after 32 attaches: $(dmsetup ls)"
[ "$(dmsetup ls | grep -vc 'No devices found' || true)" -eq 32 ] || fail "unexpected mappings: $(dmsetup ls)"
[ "$(ls "$RUN/volumes" | wc -l)" -eq 32 ] || fail "attach records: $(ls "$RUN/volumes")"
[ "$(ls "$W/state/formatted" | wc -l)" -eq 32 ] || fail "formatted markers: $(ls "$W/state/formatted")"
[ ! -d "$W/state/formatting" ] || [ -z "$(ls -A "$W/state/formatting")" ] || fail "format records left"
pass "32 parallel first-use attaches (16 LUKS1, 16 LUKS2) in $((t1 - t0)) ms: 32 mappings, each on its own device, 32 links"

# Each volume holds its own data, written at once through all mappings.
for i in $VOLS; do
    (yes "volume $i" | head -c 262144 | dd of="/dev/mapper/crypt-os-brick+conc-$i" bs=64k iflag=fullblock oflag=direct status=none) &
done
wait
for i in $VOLS; do
    yes "volume $i" | head -c 262144 | cmp -s -n 262144 - "/dev/mapper/crypt-os-brick+conc-$i" || fail "volume $i data"
done
pass "32 mappings written in parallel, each reads back its own data"

# --- 8 racing attach/detach calls for one volume, several rounds ------------
R=race
truncate -s 20M "$W/$R.img"
RDEV=$(losetup --find --show "$W/$R.img")
RLINK=/dev/disk/by-id/os-brick+$R
RMAP=crypt-os-brick+$R
ln -sfn "$RDEV" "$RLINK"
RKEY=$($A keys create)
echo "{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$RKEY\"}" >"$W/enc-$R"
rop() { $A "$1" --volume-id "vol-$R" --device "$RLINK" --encryption-file "$W/enc-$R" --json; }
consistent() { # context -> STATE
    if dmsetup info "$RMAP" >/dev/null 2>&1; then
        STATE=attached
        [ "$(dmsetup ls | grep -c "^$RMAP[[:space:]]")" -eq 1 ] || fail "$1: not one mapping"
        dmsetup info "$RMAP" | grep -q "Tables present:.*LIVE" || fail "$1: mapping without a live table"
        [ -b "/dev/mapper/$RMAP" ] || fail "$1: no node"
        [ "$(readlink "$RLINK")" = "/dev/mapper/$RMAP" ] || fail "$1: attached but link -> $(readlink "$RLINK")"
        [ -e "$RUN/volumes/vol-$R.json" ] || fail "$1: attached without a record"
    else
        STATE=detached
        [ ! -e "/dev/mapper/$RMAP" ] || fail "$1: node without mapping"
        [ "$(readlink "$RLINK")" = "$RDEV" ] || fail "$1: detached but link -> $(readlink "$RLINK")"
        [ ! -e "$RUN/volumes/vol-$R.json" ] || fail "$1: detached with a record"
    fi
    [ -z "$(ls -A /dev/disk/by-id | grep luks-agent-tmp || true)" ] || fail "$1: temporary link left"
}
OUTCOMES=""
t0=$(ms)
for round in 1 2 3 4; do
    # Alternate which kind starts first; the first round formats.
    if [ $((round % 2)) -eq 1 ]; then ORDER="attach detach attach detach attach detach attach detach"
    else ORDER="detach attach detach attach detach attach detach attach"; fi
    k=0
    for o in $ORDER; do
        k=$((k + 1))
        rop "$o" >"$W/race$k" 2>&1 &
        echo $! >"$W/rpid$k"
    done
    for k in 1 2 3 4 5 6 7 8; do
        wait "$(cat "$W/rpid$k")" || fail "round $round call $k: $(cat "$W/race$k")"
    done
    [ "$(cat "$W"/race* | grep -c '"formatted":true' || true)" -le 1 ] || fail "round $round formatted more than once"
    consistent "round $round"
    OUTCOMES="$OUTCOMES $STATE"
    if [ "$STATE" = attached ]; then
        dd if=/dev/urandom of="$W/race-data" bs=64k count=4 status=none
        dd if="$W/race-data" of="/dev/mapper/$RMAP" bs=64k oflag=direct status=none
    fi
done
t1=$(ms)
[ "$(ls "$W/state/formatted" | wc -l)" -eq 33 ] || fail "the raced volume was not formatted exactly once"
pass "4 rounds of 8 racing attach/detach calls for one volume in $((t1 - t0)) ms: all succeed, consistent each time (ended:$OUTCOMES)"
# Whatever the last round left, the data written while attached is there.
rop attach >/dev/null
cmp -s -n 262144 "$W/race-data" "/dev/mapper/$RMAP" || fail "raced volume lost its data"
rop detach >/dev/null
consistent "after the race"
pass "the raced volume keeps its data"

# --- 32 parallel detaches, then nothing left --------------------------------
t0=$(ms)
for i in $VOLS; do
    op detach "$i" >"$W/out$i" 2>&1 &
    echo $! >"$W/pid$i"
done
for i in $VOLS; do
    wait "$(cat "$W/pid$i")" || fail "detach $i: $(cat "$W/out$i")"
    grep -q '"action":"removed"' "$W/out$i" || fail "detach $i: $(cat "$W/out$i")"
done
t1=$(ms)
[ "$(dmsetup ls | grep -vc 'No devices found' || true)" -eq 0 ] || fail "mappings left: $(dmsetup ls)"
[ -z "$(ls -A /dev/mapper | grep -vx control || true)" ] || fail "nodes left: $(ls /dev/mapper)"
for i in $VOLS; do
    [ "$(readlink "/dev/disk/by-id/os-brick+conc-$i")" = "$(cat "$W/dev$i")" ] || fail "link $i not restored"
done
[ -z "$(ls -A /dev/disk/by-id | grep luks-agent-tmp || true)" ] || fail "temporary links left"
for l in /dev/disk/by-id/*; do [ -e "$l" ] || fail "dangling link $l"; done
[ -z "$(ls -A "$RUN/volumes")" ] || fail "attach records left: $(ls -A "$RUN/volumes")"
i=0
while [ "$(our_keys)" != 0 ]; do
    i=$((i + 1))
    [ $i -lt 40 ] || fail "keys left: $(grep luks-agent: /proc/keys)"
    sleep 0.05
done
keys_now >"$W/keys-after"
cmp -s "$W/keys-before" "$W/keys-after" || fail "the keyrings changed: $(diff "$W/keys-before" "$W/keys-after")"
pass "32 parallel detaches in $((t1 - t0)) ms; then no mapping, node, keyring entry (/proc/keys as before), stale link or attach record"
for i in $VOLS; do losetup -d "$(cat "$W/dev$i")"; done
losetup -d "$RDEV"
echo "VM concurrency: all checks passed in $(($(ms) - T0)) ms"
