#!/bin/sh
# VM tier: dm-crypt options. The `[crypt]` options of the configuration
# appear in the table when set and not when unset (and discards reach the
# device only with allow_discards); the encryption sector size comes from
# the LUKS2 header: a volume cryptsetup formatted with 4096-byte sectors
# maps as cryptsetup maps it: sector_size:4096, and no iv_large_sectors
# (LUKS2 IVs count 512-byte sectors; with it each side reads the other's
# data as noise).
# Runs as root in the guest (vm/run.sh); exits non-zero on any failure.
set -eu
BIN=${BIN:-target/release/luks-agent}
W=$(mktemp -d /tmp/vmopt.XXXXXX)
fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok - $*"; }
ms() { echo $(($(date +%s%N) / 1000000)); }
T0=$(ms)
mkdir -p /dev/disk/by-id

config() { # name, then [crypt] lines
    f="$W/$1.toml"
    shift
    printf 'state_dir = "%s/state"\n[key_manager.local]\ndir = "%s/keys"\n[crypt]\n' "$W" "$W" >"$f"
    for l in "$@"; do echo "$l" >>"$f"; done
    chmod 600 "$f"
}
config none
config all "allow_discards = true" "no_read_workqueue = true" "no_write_workqueue = true"
config discards "allow_discards = true"
config workqueues "no_read_workqueue = true" "no_write_workqueue = true"
A="$BIN --config $W/none.toml"

new_volume() { # name provider [losetup options] -> VID DEV LINK MAP KEY ENC
    VID=vol-$1
    truncate -s 24M "$W/$1.img"
    DEV=$(losetup --find --show $3 "$W/$1.img")
    LINK=/dev/disk/by-id/os-brick+$1
    ln -sfn "$DEV" "$LINK"
    MAP=crypt-os-brick+$1
    KEY=$($A keys create)
    ENC="{\"provider\": \"$2\", \"control_location\": \"front-end\", \"cipher\": \"aes-xts-plain64\", \"key_size\": 512, \"encryption_key_id\": \"$KEY\"}"
}
with() { # config command...
    c=$1
    shift
    $BIN --config "$W/$c.toml" "$1" --volume-id "$VID" --device "$LINK" --encryption "$ENC"
}
options_of() { dmsetup table "$MAP" | awk '{ for (i = 10; i <= NF; i++) printf "%s ", $i }' | sed 's/ $//'; }
discard_max() { cat "/sys/block/$(dmsetup info -c --noheadings -o blkdevname "$MAP")/queue/discard_max_bytes"; }

# Each configuration on a LUKS2 and a plain volume: the options field of
# the table (after the count) is exactly what the configuration asks for.
for provider in luks2 plain; do
    new_volume "opt-$provider" $provider ""
    for c in none all discards workqueues; do
        case $c in
        none) want="" ;;
        all) want="allow_discards no_read_workqueue no_write_workqueue" ;;
        discards) want="allow_discards" ;;
        workqueues) want="no_read_workqueue no_write_workqueue" ;;
        esac
        with $c attach >/dev/null 2>"$W/err" || fail "$provider/$c: attach failed: $(cat "$W/err")"
        got=$(options_of)
        [ "$got" = "$want" ] || fail "$provider/$c: table options '$got', expected '$want': $(dmsetup table "$MAP")"
        if [ -n "$want" ]; then
            dmsetup table "$MAP" | grep -q " $(echo "$want" | wc -w) $want\$" || fail "$provider/$c: option count: $(dmsetup table "$MAP")"
        fi
        case $c in
        all | discards)
            [ "$(discard_max)" -gt 0 ] || fail "$provider/$c: discards not passed through"
            blkdiscard "/dev/mapper/$MAP" || fail "$provider/$c: blkdiscard refused"
            ;;
        *) [ "$(discard_max)" -eq 0 ] || fail "$provider/$c: discards passed through without allow_discards" ;;
        esac
        with $c detach 2>/dev/null
        echo "  $provider, [crypt] $c: '$got'"
    done
    losetup -d "$DEV"
done
pass "[crypt] allow_discards, no_read_workqueue, no_write_workqueue reach the LUKS2 and plain tables when set, never when unset"

# A misspelt option is refused (exit 1), nothing attached.
config bad "allow_discard = true"
new_volume bad luks2 ""
set +e
with bad attach >/dev/null 2>"$W/err"
rc=$?
set -e
[ "$rc" -eq 1 ] && grep -q "allow_discard" "$W/err" || fail "misspelt option: exit $rc: $(cat "$W/err")"
! dmsetup info "$MAP" >/dev/null 2>&1 || fail "misspelt option: mapped anyway"
losetup -d "$DEV"
pass "a misspelt [crypt] option is refused (exit 1) before anything happens"

# Sector size from the header: cryptsetup formats with 4096 and 512; our
# table equals cryptsetup's own (but for the key reference), and each
# reads what the other wrote.
for ss in 4096 512; do
    new_volume "ss$ss" luks2 ""
    $A keys fetch --key-id "$KEY" --reveal --check 2>/dev/null | sed -n 's/^passphrase: //p' | tr -d '\n' >"$W/pass"
    cryptsetup luksFormat -q --type luks2 --sector-size "$ss" --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
        --key-file "$W/pass" "$DEV"
    OUT=$(with none attach 2>/dev/null)
    OURS=$(dmsetup table "$MAP")
    if [ "$ss" = 4096 ]; then
        echo "$OURS" | grep -q " 1 sector_size:4096\$" || fail "4096: table $OURS"
    else
        [ -z "$(options_of)" ] || fail "512: options in $OURS"
    fi
    dd if=/dev/urandom of="$W/data" bs=64k count=8 status=none
    dd if="$W/data" of="/dev/mapper/$MAP" bs=64k oflag=direct status=none
    with none detach 2>/dev/null
    cryptsetup open --key-file "$W/pass" "$DEV" "cs-ss$ss"
    THEIRS=$(dmsetup table "cs-ss$ss")
    [ "$(echo "$OURS" | awk '{ $5 = ""; print }')" = "$(echo "$THEIRS" | awk '{ $5 = ""; print }')" ] \
        || fail "$ss: ours '$OURS', cryptsetup's '$THEIRS'"
    cmp -s -n 524288 "$W/data" "/dev/mapper/cs-ss$ss" || fail "$ss: cryptsetup reads different data"
    cryptsetup close "cs-ss$ss"
    losetup -d "$DEV"
    pass "cryptsetup LUKS2 with $ss-byte sectors: our table is cryptsetup's (options: $(echo "$OURS" | cut -d' ' -f9- | grep . || echo none)) but for the key, and the data matches"
done

# Our own first-use format on a device with 4096-byte sectors picks 4096,
# as cryptsetup would, and maps with it.
new_volume own4k luks2 "--sector-size 4096"
with none attach >/dev/null 2>&1
cryptsetup luksDump "$DEV" | grep -q "sector: 4096" || fail "own format: $(cryptsetup luksDump "$DEV" | grep sector)"
dmsetup table "$MAP" | grep -q " 1 sector_size:4096\$" || fail "own format: table $(dmsetup table "$MAP")"
dd if=/dev/urandom of="$W/data" bs=64k count=8 status=none
dd if="$W/data" of="/dev/mapper/$MAP" bs=64k oflag=direct status=none
with none detach 2>/dev/null
$A keys fetch --key-id "$KEY" --reveal --check 2>/dev/null | sed -n 's/^passphrase: //p' | tr -d '\n' >"$W/pass"
cryptsetup open --key-file "$W/pass" "$DEV" cs-own4k
cmp -s -n 524288 "$W/data" /dev/mapper/cs-own4k || fail "own format: cryptsetup reads different data"
cryptsetup close cs-own4k
losetup -d "$DEV"
pass "our first-use format on a 4096-byte-sector device writes and maps 4096-byte sectors; cryptsetup reads our data"
echo "VM crypt options: all checks passed in $(($(ms) - T0)) ms"
