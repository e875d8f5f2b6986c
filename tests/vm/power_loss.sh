#!/bin/sh
# VM tier: power loss at any write of a first-use format and of a keyslot
# change. Each operation runs on a dm-log-writes device, which logs every
# write the device completes, in completion order, and every flush; the
# key-manager writes (the local key store's intent and marker, the local
# format record) are put into the same log as marks at the moment they
# happen: strace stops the agent after each rename or unlink it makes
# (`inject=...:signal=STOP`), the script adds a mark `km-N` to the log and
# copies the state directory as it is then, and lets the agent go on.
#
# dm-log-replay (tools/dm-log-replay) then lists the crash states: after
# every logged request with all of them on disk; and at the end of each
# stretch between two flushes or marks, only what flushes and FUA made
# durable, everything but one of the rest (for each of them), and random
# subsets of the rest with some writes torn at a sector boundary (what a
# disk may hold after a power cut). Every state is
# written onto a copy of the device as it was before the operation, the
# key-manager state of its last mark is put back, /run is emptied (a
# power cut clears it), and then:
# - first-use format (LUKS1 and LUKS2 in dm mode, LUKS1 in libvirt mode
#   with a libvirtd of the guest's own): the next attach succeeds
#   (a redo keeps the intent's LUKS UUID), a header that opened before it
#   is kept as it was, and the marker is set; for the states where the
#   format's writes were under way, also as another host, without the
#   local format record: refused while the intent is young with a message
#   that says when to attach again, and formatted once it is old enough
#   (the safety age set to 0);
# - add-key, change-key, remove-key: the old or the new passphrase opens,
#   each that opens yields the volume key of before, the one the operation
#   keeps (the old for add-key and remove-key) always opens, and the data
#   area is unchanged;
# - extend: the log holds no write at all.
# Runs as root in the guest (vm/run.sh); exits non-zero on any failure.
. tests/vm/lib.sh
REPLAY=${REPLAY:-target/release/dm-log-replay}
[ -x "$REPLAY" ] || fail "$REPLAY missing (cargo build --release --manifest-path tools/dm-log-replay/Cargo.toml --target-dir target)"
command -v strace >/dev/null || fail "strace missing on the host"
dmsetup targets | grep -q '^log-writes' || fail "the guest kernel has no log-writes target"
SUBSETS=${POWER_LOSS_SUBSETS:-6}
# Every prefix of the writes is a crash state. POWER_LOSS_RUN_POINTS=N
# samples long runs of adjacent writes instead (N points inside a run), for
# quicker manual runs only.
RUN_POINTS=${POWER_LOSS_RUN_POINTS:-}
RUN=/run/luks-agent
SIZE=$((20 * 1024 * 1024))
KM_CALLS=rename,renameat,renameat2,unlink,unlinkat

# A device logged by dm-log-writes: $LW (the logged device), $LOGDEV,
# $BASE (its image, zeros to start with unless given).
N=0
new_logged() { # [initial image]
    N=$((N + 1))
    rm -f "$W/base.img" "$W/log.img"
    if [ -n "${1:-}" ]; then cp --sparse=always "$1" "$W/base.img"; else truncate -s $SIZE "$W/base.img"; fi
    cp --sparse=always "$W/base.img" "$W/init.img"
    truncate -s 256M "$W/log.img"
    BASEDEV=$(losetup --find --show "$W/base.img")
    LOGDEV=$(losetup --find --show "$W/log.img")
    LWNAME=lw-$N
    dmsetup create "$LWNAME" --table "0 $((SIZE / 512)) log-writes $BASEDEV $LOGDEV"
    dmsetup mknodes "$LWNAME"
    LW=/dev/mapper/$LWNAME
    [ -b "$LW" ] || fail "no node $LW"
}
# Ends logging (the target writes its last super block on removal) and
# keeps the log as $W/log-$N.
end_logged() {
    dmsetup remove "$LWNAME"
    losetup -d "$BASEDEV" "$LOGDEV"
    mv "$W/log.img" "$W/log-$N"
    LOG=$W/log-$N
    [ -z "${VM_RESULTS:-}" ] || "$REPLAY" list "$LOG" >"$VM_RESULTS/power-loss-log-$N.txt"
}

# Runs the command with a mark in the log after each of its renames and
# unlinks, and the state directory at that moment in $W/snap/km-K.
run_marked() { # command...
    rm -rf "$W/snap"
    mkdir -p "$W/snap" "$W/state"
    cp -a "$W/state" "$W/snap/km-0"
    dmsetup message "$LWNAME" 0 mark km-0
    strace -f -qq -o /dev/null -e trace=$KM_CALLS -e inject=$KM_CALLS:signal=STOP \
        "$@" >"$W/out" 2>"$W/err" &
    spid=$!
    k=0
    apid=
    while kill -0 "$spid" 2>/dev/null; do
        [ -n "$apid" ] || apid=$(pgrep -P "$spid" || true)
        if [ -n "$apid" ] && all_stopped "$apid"; then
            k=$((k + 1))
            dmsetup message "$LWNAME" 0 mark "km-$k"
            cp -a "$W/state" "$W/snap/km-$k"
            kill -CONT "$apid"
        fi
    done
    wait "$spid" || fail "run $N: $* failed: $(cat "$W/err")"
    MARKS=$k
}
# Every thread of the process is stopped (a group stop: the injected
# SIGSTOP), seen twice: a thread in a syscall stop of strace is one thread
# for a moment.
all_stopped() { # pid
    for _ in 1 2; do
        for t in /proc/"$1"/task/*/stat; do
            read -r line 2>/dev/null <"$t" || return 1
            line=${line##*) }
            case $line in t* | T*) ;; *) return 1 ;; esac
        done
        sleep 0.02
    done
}

states() {
    "$REPLAY" states "$LOG" --subsets "$SUBSETS" --seed "$N" --mark-prefix km- ${RUN_POINTS:+--run-points "$RUN_POINTS"} >"$W/states"
    [ -z "${VM_RESULTS:-}" ] || cp "$W/states" "$VM_RESULTS/power-loss-states-$N.txt"
    wc -l <"$W/states"
}
# $W/crash.img: the device as crash state SPEC leaves it.
crash_image() { # spec
    rm -f "$W/crash.img"
    cp --sparse=always "$W/init.img" "$W/crash.img"
    "$REPLAY" replay "$LOG" "$W/crash.img" "$1"
}
header_uuid() { $BIN luks dump --json "$1" 2>/dev/null | sed -n 's/^{"version":[0-9]*,"uuid":"\([^"]*\)".*/\1/p'; }

# --- first-use format --------------------------------------------------------
# What an attach leaves: a dm-crypt mapping, or in libvirt mode the
# volume's secret in libvirtd (and no mapping).
attached_check() { # context
    if [ "$MODE" = dm ]; then
        [ -b "/dev/mapper/$MAP" ] || fail "$1: no mapping"
    else
        [ "$(virsh -q -c qemu:///system secret-list | grep -c .)" = 1 ] || fail "$1: no secret: $(virsh -c qemu:///system secret-list)"
        [ ! -e "/dev/mapper/$MAP" ] || fail "$1: a mapping in libvirt mode"
    fi
}

# A libvirtd of the guest's own (libvirt mode): its state on tmpfs, the
# host's configuration copied (the root is the host's, read-only).
start_libvirtd() {
    for d in /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
        [ -d "$d" ] || fail "$d missing on the host (tests/harness/libvirtd.sh prepare)"
        mount -t tmpfs tmpfs "$d"
    done
    mkdir -p "$W/etc-libvirt"
    cp -a /etc/libvirt/. "$W/etc-libvirt/"
    mount --bind "$W/etc-libvirt" /etc/libvirt
    LIBVIRT_LOG_OUTPUTS="3:file:$W/libvirtd.log" libvirtd -d
    i=0
    until virsh -q -c qemu:///system secret-list >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -lt 100 ] || fail "libvirtd does not answer: $(tail -5 "$W/libvirtd.log")"
        sleep 0.2
    done
}
format_case() { # provider mode
    PROV=$1 MODE=$2
    VID=pl-$PROV-$MODE
    KEY=$($A keys create)
    ENC="{\"provider\": \"$PROV\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
    LINK=/dev/disk/by-id/os-brick+$VID
    MAP=crypt-os-brick+$VID
    new_logged
    ln -sfn "$LW" "$LINK"
    run_marked $A attach --mode "$MODE" --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json
    grep -q '"formatted":true' "$W/out" || fail "$PROV $MODE: the logged attach did not format: $(cat "$W/out")"
    $A detach --mode "$MODE" --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1
    end_logged
    cp -a "$W/state" "$W/state-after"
    ENTRIES=$("$REPLAY" list "$LOG" | grep -vc '^#')
    WRITES=$("$REPLAY" list "$LOG" | awk -F'\t' '!/^#/ && $2 !~ /MARK|DISCARD/ && $4 > 0' | wc -l)
    FLUSHES=$("$REPLAY" list "$LOG" | awk -F'\t' '$2 ~ /FLUSH/' | wc -l)
    [ "$WRITES" -gt 0 ] && [ "$FLUSHES" -gt 0 ] || fail "$PROV $MODE: the log has $WRITES writes and $FLUSHES flushes"
    [ "$MARKS" -ge 3 ] || fail "$PROV $MODE: only $MARKS key-manager writes were marked"
    TOTAL=$(states)
    ATTACHED=0 REDONE=0 KEPT=0 OTHER_REFUSED=0 OTHER_FORMATTED=0
    t0=$(ms)
    while IFS="$(printf '\t')" read -r name kind after mark spec; do
        [ "$mark" != - ] || mark=km-0
        crash_image "$spec"
        rm -rf "$W/state" "$RUN"
        cp -a "$W/snap/$mark" "$W/state"
        DEV=$(losetup --find --show "$W/crash.img")
        ln -sfn "$DEV" "$LINK"
        BEFORE=$(header_uuid "$DEV")
        INTENT=$(cut -d, -f1 "$W/state/format-intents/$KEY" 2>/dev/null || true)
        ctx="$PROV $MODE $name ($kind, $mark, writes $spec)"
        OUT=$($A attach --mode "$MODE" --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json 2>"$W/err") \
            || fail "$ctx: the next attach failed: $(cat "$W/err")"
        ATTACHED=$((ATTACHED + 1))
        NOW=$(header_uuid "$DEV")
        if [ -n "$BEFORE" ]; then
            # A valid header is written only after its keyslot is durable,
            # so it opens, and it is never formatted over.
            echo "$OUT" | grep -q '"formatted":false' || fail "$ctx: formatted over the valid header $BEFORE: $OUT"
            [ "$NOW" = "$BEFORE" ] || fail "$ctx: UUID $BEFORE became $NOW"
            KEPT=$((KEPT + 1))
        else
            echo "$OUT" | grep -q '"formatted":true' || fail "$ctx: no header, yet not formatted: $OUT"
            [ -z "$INTENT" ] || [ "$NOW" = "$INTENT" ] || fail "$ctx: redone with UUID $NOW, the intent names $INTENT"
            REDONE=$((REDONE + 1))
        fi
        [ -e "$W/state/formatted/$KEY" ] || fail "$ctx: no marker after the attach"
        attached_check "$ctx"
        $A detach --mode "$MODE" --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>"$W/err" || fail "$ctx: detach failed: $(cat "$W/err")"
        losetup -d "$DEV"
        # As another host, where a format was under way (an intent, no
        # marker, no valid header): without this host's format record.
        if [ -n "$INTENT" ] && [ ! -e "$W/snap/$mark/formatted/$KEY" ] && [ -z "$BEFORE" ]; then
            crash_image "$spec"
            rm -rf "$W/state" "$RUN"
            cp -a "$W/snap/$mark" "$W/state"
            rm -rf "$W/state/formatting"
            DEV=$(losetup --find --show "$W/crash.img")
            ln -sfn "$DEV" "$LINK"
            SUM=$(sha256sum <"$DEV")
            if $BIN --config "$W/young.toml" attach --mode "$MODE" --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json >"$W/o2" 2>"$W/err"; then
                fail "$ctx, other host: attached under a young intent: $(cat "$W/o2")"
            fi
            grep -q "attach again after" "$W/err" || fail "$ctx, other host: refused without saying when to retry: $(cat "$W/err")"
            [ "$(sha256sum <"$DEV")" = "$SUM" ] || fail "$ctx, other host: the refusal wrote to the device"
            OTHER_REFUSED=$((OTHER_REFUSED + 1))
            $BIN --config "$W/aged.toml" attach --mode "$MODE" --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json >"$W/o2" 2>"$W/err" \
                || fail "$ctx, other host, intent old enough: attach failed: $(cat "$W/err")"
            grep -q '"formatted":true' "$W/o2" && [ "$(header_uuid "$DEV")" = "$INTENT" ] \
                || fail "$ctx, other host: not formatted with the intent's UUID $INTENT: $(cat "$W/o2")"
            $BIN --config "$W/aged.toml" detach --mode "$MODE" --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>"$W/err" || fail "$ctx: detach failed: $(cat "$W/err")"
            OTHER_FORMATTED=$((OTHER_FORMATTED + 1))
            losetup -d "$DEV"
        fi
    done <"$W/states"
    t1=$(ms)
    rm -rf "$W/state"
    mv "$W/state-after" "$W/state"
    ln -sfn /dev/null "$LINK"
    echo "format $PROV ($MODE mode): $ENTRIES log entries ($WRITES writes, $FLUSHES flushes, $MARKS key-manager writes), $TOTAL crash states in $((t1 - t0)) ms: attached $ATTACHED (header kept $KEPT, format redone $REDONE); as another host $OTHER_REFUSED refused while young, $OTHER_FORMATTED formatted once old"
    pass "power loss at any write of a first-use $PROV format in $MODE mode: all $TOTAL states attach again, none formatted over a header that opens"
}

# --- keyslot changes --------------------------------------------------------
printf 'old passphrase of the volume' >"$W/old"
printf 'new passphrase, after the change' >"$W/new"
KDF="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
opens() { $BIN luks test-passphrase --key-file "$1" "$2" >/dev/null 2>&1; }
volume_key() { $BIN luks dump --json --dump-volume-key --key-file "$1" "$2" | grep -o '"volume_key":"[0-9a-f]*"'; }
data_sum() { dd if="$1" bs=1M skip=16 status=none | sha256sum; }

keyslot_case() { # luks1|luks2 add-key|change-key|remove-key
    TYPE=$1 OP=$2
    truncate -s $SIZE "$W/vol.img"
    $BIN luks format --type "$TYPE" $KDF --key-file "$W/old" "$W/vol.img" >/dev/null
    dd if=/dev/urandom of="$W/vol.img" bs=1M seek=16 count=4 conv=notrunc status=none
    KEEP=$W/old
    case $OP in
        add-key) ;;
        change-key) ;;
        remove-key) $BIN luks add-key $KDF --key-file "$W/old" --new-key-file "$W/new" "$W/vol.img" >/dev/null ;;
    esac
    VK=$(volume_key "$W/old" "$W/vol.img")
    SUM=$(data_sum "$W/vol.img")
    new_logged "$W/vol.img"
    rm -f "$W/vol.img"
    case $OP in
        add-key) $BIN luks add-key $KDF --key-file "$W/old" --new-key-file "$W/new" "$LW" >/dev/null ;;
        change-key) $BIN luks change-key $KDF --key-file "$W/old" --new-key-file "$W/new" "$LW" >/dev/null; KEEP= ;;
        remove-key) $BIN luks remove-key --key-file "$W/new" "$LW" >/dev/null ;;
    esac
    end_logged
    TOTAL=$(states)
    OLD_ONLY=0 NEW_ONLY=0 BOTH=0
    while IFS="$(printf '\t')" read -r name kind after mark spec; do
        crash_image "$spec"
        ctx="$TYPE $OP $name ($kind, writes $spec)"
        o=0 n=0
        if opens "$W/old" "$W/crash.img"; then o=1; [ "$(volume_key "$W/old" "$W/crash.img")" = "$VK" ] || fail "$ctx: the old passphrase opens another volume key"; fi
        if opens "$W/new" "$W/crash.img"; then n=1; [ "$(volume_key "$W/new" "$W/crash.img")" = "$VK" ] || fail "$ctx: the new passphrase opens another volume key"; fi
        [ $o = 1 ] || [ $n = 1 ] || fail "$ctx: neither passphrase opens: the volume is lost"
        [ -z "$KEEP" ] || [ $o = 1 ] || fail "$ctx: the old passphrase no longer opens"
        [ "$(data_sum "$W/crash.img")" = "$SUM" ] || fail "$ctx: the data area changed"
        case $o$n in 10) OLD_ONLY=$((OLD_ONLY + 1)) ;; 01) NEW_ONLY=$((NEW_ONLY + 1)) ;; 11) BOTH=$((BOTH + 1)) ;; esac
    done <"$W/states"
    WRITES=$("$REPLAY" list "$LOG" | awk -F'\t' '!/^#/ && $2 !~ /MARK|DISCARD/ && $4 > 0' | wc -l)
    echo "$TYPE $OP: $WRITES writes, $TOTAL crash states: old passphrase only $OLD_ONLY, new only $NEW_ONLY, both $BOTH"
    pass "power loss at any write of $TYPE $OP: one passphrase always opens the volume key of before, data untouched"
}

# --- extend -----------------------------------------------------------------
extend_case() {
    VID=pl-extend
    KEY=$($A keys create)
    ENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
    LINK=/dev/disk/by-id/os-brick+$VID
    truncate -s $SIZE "$W/ext.img"
    D=$(losetup --find --show "$W/ext.img")
    ln -sfn "$D" "$LINK"
    $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null
    $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1
    losetup -d "$D"
    new_logged "$W/ext.img"
    ln -sfn "$LW" "$LINK"
    $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null
    dmsetup message "$LWNAME" 0 mark extend-start
    $A extend --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null
    dmsetup message "$LWNAME" 0 mark extend-end
    $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1
    end_logged
    IN=$("$REPLAY" list "$LOG" | awk -F'\t' '$5 == "extend-start" { on = 1; next } $5 == "extend-end" { on = 0 } on && $2 !~ /MARK/ && $4 > 0' | wc -l)
    [ "$IN" = 0 ] || fail "extend wrote $IN times to the device: $("$REPLAY" list "$LOG")"
    pass "extend writes nothing to the device (0 logged writes): no crash state to check"
}

dmesg -n 1
# The same agent with the intent's safety age at a day (another host,
# while the intent is young, however long this run takes) and at 0 (that
# host once the intent is old enough).
for age in young:86400 aged:0; do
    sed "s|^state_dir = .*|&\n[volume]\nformat_intent_min_age_secs = ${age#*:}|" "$W/agent.toml" >"$W/${age%:*}.toml"
    chmod 600 "$W/${age%:*}.toml"
done
# POWER_LOSS_CASES picks cases (default all): format-luks2 format-luks
# (dm mode), format-luks-libvirt, luks2-add-key ... luks1-remove-key, extend.
CASES=${POWER_LOSS_CASES:-"format-luks2 format-luks format-luks-libvirt luks2-add-key luks2-change-key luks2-remove-key luks1-add-key luks1-change-key luks1-remove-key extend"}
for c in $CASES; do
    case $c in
        format-*-libvirt)
            virsh -q -c qemu:///system secret-list >/dev/null 2>&1 || start_libvirtd
            p=${c#format-}
            format_case "${p%-libvirt}" libvirt
            ;;
        format-*) format_case "${c#format-}" dm ;;
        luks?-*) keyslot_case "${c%%-*}" "${c#*-}" ;;
        extend) extend_case ;;
        *) fail "unknown case $c" ;;
    esac
done
echo "power_loss: done in $(($(ms) - T0)) ms"
