#!/bin/sh
# VM tier: SIGKILL the agent at many points of a first-use format and of a
# normal attach, then attach again. Every run must end with an attachable
# volume, a format that completed is never redone (LUKS UUID unchanged),
# data written survives, and after the detach nothing is left: no mapping,
# no /dev/mapper node, no `luks-agent:` key in the kernel keyring, no
# attach record, the device path pointing at the device again.
#
# Kill points, two kinds:
# - exact: strace (the host's, seen through the shared root) delivers
#   SIGKILL on entry to the Nth call of one system call
#   (`-e inject=SYSCALL:signal=KILL:when=N`), for every call that changes
#   state (writes, syncs, ioctls, keyring calls, nodes, links) in a traced
#   run, but repeats that cannot change what the next attach finds; the
#   call itself never executes. Timing does not matter, so the points are
#   the same under KVM and TCG.
# - timed: the agent started in the background and SIGKILLed after
#   increasing delays, which can also land inside a call (a write torn
#   between pages).
# Where each kill landed is read from the state it left, not assumed:
#   before  - nothing written to the device yet (record or not)
#   during  - format writes under way: device not blank, no valid header
#   after   - a valid LUKS header, no mapping yet
#   mapping - a mapping exists (complete or not)
#   done    - (timed only) the attach finished before the signal
# A few "during" kills are repeated with the local format record removed
# before the re-attach, as another host would find them (section 1b).
# Runs as root in the guest (vm/run.sh); exits non-zero on any failure.
. tests/vm/lib.sh
command -v strace >/dev/null || fail "strace missing on the host"
RUN=/run/luks-agent

N=0
new_volume() { # provider -> VID DEV LINK MAP KEY ENC (a fresh blank volume and key)
    N=$((N + 1))
    VID=kill-$N
    truncate -s 24M "$W/$VID.img"
    DEV=$(losetup --find --show "$W/$VID.img")
    LINK=/dev/disk/by-id/os-brick+$VID
    ln -sfn "$DEV" "$LINK"
    MAP=crypt-os-brick+$VID
    KEY=$($A keys create)
    ENC="{\"provider\": \"$1\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$KEY\"}"
}
drop_volume() { losetup -d "$DEV"; rm -f "$W/$VID.img"; }
attach() { $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" --json "$@"; }
detach() { $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC"; }
header_uuid() { $BIN luks dump --json "$DEV" 2>/dev/null | sed -n 's/^{"version":[0-9]*,"uuid":"\([^"]*\)".*/\1/p'; }
our_keys() { grep -c 'logon .*luks-agent:' /proc/keys || true; }

# Nothing of the volume is left: no mapping, node, key, record, temporary
# link, and the device path leads to the device again.
check_clean() { # context
    ! dmsetup info "$MAP" >/dev/null 2>&1 || fail "$1: mapping $MAP left"
    [ ! -e "/dev/mapper/$MAP" ] || fail "$1: node /dev/mapper/$MAP left"
    [ "$(readlink "$LINK")" = "$DEV" ] || fail "$1: $LINK -> $(readlink "$LINK"), not $DEV"
    [ ! -e "$RUN/volumes/$VID.json" ] && [ ! -e "$RUN/volumes/$VID.json.tmp" ] || fail "$1: attach record left"
    [ -z "$(ls -A /dev/disk/by-id | grep luks-agent-tmp || true)" ] || fail "$1: temporary link left"
    # A revoked key is reaped by the kernel's key GC shortly after.
    i=0
    while [ "$(our_keys)" != 0 ]; do
        i=$((i + 1))
        [ $i -lt 40 ] || fail "$1: keys left in the keyring: $(grep luks-agent: /proc/keys)"
        sleep 0.05
    done
}

# The volume is attached: one mapping, its node, the link pointing at it,
# the table's device is ours and references the keyring.
check_attached() { # context
    [ -b "/dev/mapper/$MAP" ] || fail "$1: no node /dev/mapper/$MAP"
    [ "$(readlink "$LINK")" = "/dev/mapper/$MAP" ] || fail "$1: $LINK -> $(readlink "$LINK")"
    dmsetup table "$MAP" | grep -q " crypt .*:logon:luks-agent:" || fail "$1: table $(dmsetup table "$MAP")"
    [ "$(blockdev --getsize64 "/dev/mapper/$MAP")" -gt 0 ] || fail "$1: mapping has no size"
}

classify() { # -> PHASE, SUB, HDR (header uuid or empty)
    HDR=$(header_uuid)
    if dmsetup info "$MAP" >/dev/null 2>&1; then
        PHASE=mapping
        if dmsetup info "$MAP" 2>/dev/null | grep -q "Tables present:.*LIVE"; then SUB=live; else SUB=no-live-table; fi
    elif [ -n "$HDR" ]; then
        PHASE=after
        if [ -e "$W/state/formatted/$KEY" ]; then SUB=marked; else SUB=unmarked; fi
    elif cmp -s -n $((16 * 1024 * 1024)) "$DEV" /dev/zero; then
        PHASE=before
        if [ -e "$W/state/formatting/$VID" ]; then SUB=recorded; else SUB=no-record; fi
    else
        PHASE=during
        SUB=torn
    fi
}

COUNTS=""
count() { COUNTS="$COUNTS $1"; }
summary() { # label
    printf '%s' "$1:"
    for p in before during after mapping done; do
        printf ' %s=%s' "$p" "$(echo "$COUNTS" | tr ' ' '\n' | grep -c "^$p\$" || true)"
    done
    echo
}

# After a kill during a first-use attach: attach again, check the outcome
# against the phase, write data, detach, check nothing is left.
recover_first_use() { # context
    classify
    count "$PHASE"
    OUT=$(attach 2>"$W/err") || fail "$1 ($PHASE/$SUB): re-attach failed: $(cat "$W/err")"
    check_attached "$1 ($PHASE/$SUB)"
    NOW=$(header_uuid)
    if [ -n "$HDR" ]; then
        # A complete header is never formatted over.
        echo "$OUT" | grep -q '"formatted":false' || fail "$1 ($PHASE/$SUB): formatted again: $OUT"
        [ "$NOW" = "$HDR" ] || fail "$1 ($PHASE/$SUB): LUKS UUID changed from $HDR to $NOW"
    else
        echo "$OUT" | grep -q '"formatted":true' || fail "$1 ($PHASE/$SUB): not formatted: $OUT"
    fi
    [ -e "$W/state/formatted/$KEY" ] || fail "$1: no formatted marker after the attach"
    [ ! -e "$W/state/formatting/$VID" ] || fail "$1: format record left after the attach"
    dd if=/dev/urandom of="$W/data" bs=64k count=1 status=none
    dd if="$W/data" of="/dev/mapper/$MAP" bs=64k oflag=direct status=none
    detach || fail "$1: detach failed"
    check_clean "$1 ($PHASE/$SUB)"
    printf '  %s: %s (%s)%s\n' "$1" "$PHASE" "$SUB" "$([ -n "$HDR" ] && echo ", header $HDR kept")"
}

# The events of a traced, uninterrupted run: one line per state-changing
# call, "SYSCALL N DESCRIPTION", N counting that syscall, up to the first
# write to stdout (the result; nothing is changed after it).
SET=mkdir,flock,ioctl,pwrite64,write,fsync,fdatasync,unlink,mknodat,symlink,rename,add_key,keyctl
events() { # trace file
    awk '{ sub(/^[0-9]+ +/, ""); name = $0; sub(/\(.*/, "", name); n[name]++;
           desc = substr($0, length(name) + 2, 44); gsub(/[ \t]+/, "_", desc);
           print name, n[name], desc; if ($0 ~ /^write\(1,/) exit }' "$1"
}
# The kill points: every event but those that cannot change what the next
# attach finds (to keep the run short): mkdir of existing directories, the
# terminal probe, the newline ending a record, the directory fsync right
# after a file's fsync, the unlink half of the key's revoke+unlink, and the
# removal of a temporary link that is not there.
kill_points() { # trace file
    awk '{ sub(/^[0-9]+ +/, ""); name = $0; sub(/\(.*/, "", name); n[name]++;
           desc = substr($0, length(name) + 2, 44); gsub(/[ \t]+/, "_", desc);
           skip = name == "mkdir" || /TCGETS/ || /luks-agent-tmp.*ENOENT/ || /^write\(2,/ ||
                  /^write\([0-9]+, "\\n", 1\)/ || ((name == "fsync" || name == "keyctl") && prev == name);
           prev = name;
           if (!skip) print name, n[name], desc;
           if ($0 ~ /^write\(1,/) exit }' "$1"
}

# Warm-up: the run and state directories exist, so every traced run makes
# the same calls.
new_volume luks2
attach >/dev/null
detach
drop_volume

# --- 1. first-use format, exact kill points ---------------------------------
new_volume luks2
strace -f -qq -o "$W/trace" -e trace=$SET $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null
detach
drop_volume
kill_points "$W/trace" >"$W/events"
TOTAL=$(wc -l <"$W/events")
[ "$TOTAL" -ge 24 ] || fail "only $TOTAL kill points in a first-use attach: $(cat "$W/events")"
grep -q "^ioctl .*BLKZEROOUT" "$W/events" && grep -q "^pwrite64 " "$W/events" && grep -q "DM_TABLE_LOAD" "$W/events" \
    || fail "the traced attach did not format and map: $(cat "$W/events")"
echo "first-use attach: $(events "$W/trace" | wc -l) state-changing calls, $TOTAL kill points:" $(awk '{ print $1 "#" $2 }' "$W/events")
t0=$(ms)
while read -r sc n desc; do
    new_volume luks2
    set +e
    strace -f -qq -o /dev/null -e trace="$sc" -e inject="$sc:signal=KILL:when=$n" \
        $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1
    rc=$?
    set -e
    [ "$rc" -ne 0 ] || fail "kill at $sc #$n ($desc) not reached: the run finished"
    recover_first_use "kill at $sc #$n $desc"
    # printf, not echo: dash's echo expands the backslash escapes in strace's
    # rendering of written bytes (\012 would split the line).
    [ "$PHASE" != during ] || printf '%s %s %s\n' "$sc" "$n" "$desc" >>"$W/during"
    [ "$PHASE" != before ] || printf '%s %s %s\n' "$sc" "$n" "$desc" >"$W/last-before"
    drop_volume
done <"$W/events"
t1=$(ms)
summary "exact kills in a first-use format ($TOTAL, $((t1 - t0)) ms)"
EXACT=$COUNTS
pass "SIGKILL at each of $TOTAL calls of a first-use attach: every volume attaches again, a complete header is never reformatted, nothing left after detach"

# --- 1b. first-use format killed mid-write, next attach on another host ------
# The local "formatting" record is removed before the re-attach, as on a
# host that never saw the format; only the intent in the key manager (here
# the local key store's, shared like a key manager) is left. With the
# default safety age the young intent is refused and nothing is written;
# with the age at 0 (the config file is the only way to set it) the format
# is redone with the intent's LUKS UUID. A few of the "during" points
# only: the first, the middle and the last; and the last "before" point,
# where the intent is durable and the device still blank, which a second
# host must not format while the first may still be about to.
[ -s "$W/during" ] || fail "no exact kill landed during the format writes"
[ -s "$W/last-before" ] || fail "no exact kill landed before the format writes"
cp "$W/agent.toml" "$W/agent-age0.toml"
printf '[volume]\nformat_intent_min_age_secs = 0\n' >>"$W/agent-age0.toml"
chmod 600 "$W/agent-age0.toml"
A_DEFAULT=$A
XN=$(wc -l <"$W/during")
t0=$(ms)
{
    sed 's/^/before /' "$W/last-before"
    awk -v n="$XN" 'NR == 1 || NR == int((n + 1) / 2) || NR == n { print "during", $0 }' "$W/during"
} >"$W/cross"
while read -r want sc n desc; do
    new_volume luks2
    set +e
    strace -f -qq -o /dev/null -e trace="$sc" -e inject="$sc:signal=KILL:when=$n" \
        $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1
    set -e
    classify
    [ "$PHASE" = "$want" ] || fail "cross-host kill at $sc #$n: phase $PHASE, was $want"
    rm "$W/state/formatting/$VID"
    INTENT=$(cut -d, -f1 "$W/state/format-intents/$KEY")
    [ -n "$INTENT" ] || fail "cross-host kill at $sc #$n: no format intent"
    SUM=$(sha256sum <"$DEV")
    set +e
    attach >/dev/null 2>"$W/err"
    rc=$?
    set -e
    [ "$rc" = 5 ] && grep -q "may still be running" "$W/err" \
        || fail "cross-host kill at $sc #$n: young intent not refused (exit $rc): $(cat "$W/err")"
    [ "$(sha256sum <"$DEV")" = "$SUM" ] || fail "cross-host kill at $sc #$n: a refused attach wrote"
    A="$BIN --config $W/agent-age0.toml"
    recover_first_use "cross-host after kill at $sc #$n $desc"
    A=$A_DEFAULT
    [ "$NOW" = "$INTENT" ] || fail "cross-host kill at $sc #$n: LUKS UUID $NOW, intent $INTENT"
    drop_volume
done <"$W/cross"
t1=$(ms)
pass "SIGKILL before (1) and during the writes ($(($(wc -l <"$W/cross") - 1)) of $XN points) of a first-use format, re-attach without the local record (another host): refused while the intent is young, redone with its LUKS UUID once old enough ($((t1 - t0)) ms)"

# --- 2. first-use format, timed kills (LUKS1 and LUKS2) ---------------------
COUNTS=""
t0=$(ms)
provider=luks2
for d in 0 0.02 0.05 0.08 0.11 0.15; do
    [ $provider = luks2 ] && provider=luks || provider=luks2
    new_volume $provider
    $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1 &
    P=$!
    sleep "$d"
    kill -KILL $P 2>/dev/null || true
    if wait $P; then
        count done
        classify
        check_attached "timed kill $d s ($provider) after the attach finished"
        detach
        check_clean "timed kill $d s ($provider), attach had finished"
        echo "  timed $d s $provider: done"
    else
        recover_first_use "timed kill $d s $provider"
    fi
    drop_volume
done
t1=$(ms)
summary "timed kills in a first-use format (6, $((t1 - t0)) ms)"
TIMED=$COUNTS
[ "$(echo "$TIMED" | tr ' ' '\n' | grep -c '^done$' || true)" -lt 6 ] || fail "no timed kill landed inside an attach"
pass "SIGKILL after increasing delays in LUKS1 and LUKS2 first-use attaches: every volume attaches again, nothing left after detach"

# --- 3. normal attach of a formatted volume holding data --------------------
new_volume luks2
attach >/dev/null
UUID=$(header_uuid)
dd if=/dev/urandom of="$W/data" bs=1M count=2 status=none
dd if="$W/data" of="/dev/mapper/$MAP" bs=1M oflag=direct status=none
detach
strace -f -qq -o "$W/trace2" -e trace=$SET $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null
detach
kill_points "$W/trace2" >"$W/events2"
TOTAL2=$(wc -l <"$W/events2")

reattach_check() { # context
    OUT=$(attach 2>"$W/err") || fail "$1: re-attach failed: $(cat "$W/err")"
    echo "$OUT" | grep -q '"formatted":false' || fail "$1: formatted a volume holding data: $OUT"
    [ "$(header_uuid)" = "$UUID" ] || fail "$1: LUKS UUID changed"
    check_attached "$1"
    cmp -s -n 2097152 "$W/data" "/dev/mapper/$MAP" || fail "$1: data lost"
    detach || fail "$1: detach failed"
    check_clean "$1"
}
COUNTS=""
t0=$(ms)
while read -r sc n desc; do
    set +e
    strace -f -qq -o /dev/null -e trace="$sc" -e inject="$sc:signal=KILL:when=$n" \
        $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1
    rc=$?
    set -e
    [ "$rc" -ne 0 ] || fail "re-attach kill at $sc #$n ($desc) not reached"
    classify
    count "$PHASE"
    reattach_check "re-attach killed at $sc #$n $desc ($PHASE/$SUB)"
    printf '  re-attach kill at %s #%s %s: %s (%s)\n' "$sc" "$n" "$desc" "$PHASE" "$SUB"
done <"$W/events2"
for d in 0 0.05; do
    $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1 &
    P=$!
    sleep "$d"
    kill -KILL $P 2>/dev/null || true
    if wait $P; then PHASE=done; else classify; fi
    count "$PHASE"
    reattach_check "re-attach killed after $d s ($PHASE)"
    echo "  re-attach timed $d s: $PHASE"
done
t1=$(ms)
summary "kills in a normal attach ($TOTAL2 exact + 2 timed, $((t1 - t0)) ms)"
NORMAL=$COUNTS
drop_volume
pass "SIGKILL at each of $TOTAL2 calls of a normal attach and after 2 delays: the volume holding data attaches again, same LUKS UUID, data intact"

# --- 4. the keyring check sees keys: pause at the table load and look ------
new_volume luks2
attach >/dev/null
detach
LOAD=$(events "$W/trace2" | awk '/DM_TABLE_LOAD/ { print $2; exit }')
[ -n "$LOAD" ] || fail "no table load in the trace"
strace -f -qq -o /dev/null -e trace=ioctl -e inject="ioctl:delay_enter=20000000:when=$LOAD" \
    $A attach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1 &
S=$!
i=0
while [ "$(our_keys)" = 0 ]; do
    i=$((i + 1))
    [ $i -lt 200 ] || fail "no luks-agent key visible in /proc/keys while the table loads"
    sleep 0.05
done
AGENT=$(cat "/proc/$S/task/$S/children")
kill -KILL $AGENT
wait $S || true
check_attached_or_recover() { attach >/dev/null && check_attached "$1" && detach && check_clean "$1"; }
check_attached_or_recover "killed while its key was in the keyring"
drop_volume
pass "the key is visible in /proc/keys while a table loads, and gone once the agent is killed there"

# --- 5. kills during detach -------------------------------------------------
# At each state-changing call of a detach. The hard case: killed after the
# remove ioctl, the link still leads to /dev/mapper/NAME and, without udev,
# that node stays. A device created meanwhile ("squatter", a mapping with
# no table) takes the freed device number, so the stale node now leads to
# it. The next attach must finish the detach, attach the volume and hand
# out a node of its own mapping; its data must be intact.
new_volume luks2
attach >/dev/null
dd if=/dev/urandom of="$W/data" bs=64k count=4 status=none
dd if="$W/data" of="/dev/mapper/$MAP" bs=64k oflag=direct status=none
strace -f -qq -o "$W/trace3" -e trace=$SET $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC" 2>/dev/null
kill_points "$W/trace3" >"$W/events3"
attach >/dev/null
COUNTS=""
while read -r sc n desc; do
    set +e
    strace -f -qq -o /dev/null -e trace="$sc" -e inject="$sc:signal=KILL:when=$n" \
        $A detach --volume-id "$VID" --device "$LINK" --encryption "$ENC" >/dev/null 2>&1
    rc=$?
    set -e
    [ "$rc" -ne 0 ] || fail "detach kill at $sc #$n ($desc) not reached"
    if dmsetup info "$MAP" >/dev/null 2>&1; then PHASE=mapping; else PHASE=removed; fi
    count "$PHASE"
    dmsetup create --notable squatter
    attach >/dev/null 2>"$W/err" || fail "attach after a detach killed at $sc #$n: $(cat "$W/err")"
    check_attached "attach after a detach killed at $sc #$n"
    DEVNO=$(dmsetup info -c --noheadings -o major,minor "$MAP" | tr -d ' ')
    [ "$(stat -L -c '%t:%T' "/dev/mapper/$MAP")" = "$(printf '%x:%x' "${DEVNO%:*}" "${DEVNO#*:}")" ] \
        || fail "detach killed at $sc #$n: /dev/mapper/$MAP is not the node of $DEVNO"
    cmp -s -n 262144 "$W/data" "/dev/mapper/$MAP" || fail "detach killed at $sc #$n: data"
    printf '  detach kill at %s #%s %s: %s\n' "$sc" "$n" "$desc" "$PHASE"
    detach
    dmsetup remove squatter
    check_clean "detach killed at $sc #$n, attached again and detached"
    attach >/dev/null
done <"$W/events3"
detach
check_clean "after the detach kills"
drop_volume
DETACH=$COUNTS
pass "SIGKILL at each of $(wc -l <"$W/events3") calls of a detach: the next attach finishes it (link back, stale node gone even when its number went to another device), data intact"

echo "kill points by phase:"
COUNTS=$EXACT; summary "  first-use, exact"
COUNTS=$TIMED; summary "  first-use, timed"
COUNTS=$NORMAL; summary "  normal attach (after = header intact, no mapping yet)"
echo "  detach: $(echo "$DETACH" | tr ' ' '\n' | grep -c '^mapping$' || true) with the mapping still there, $(echo "$DETACH" | tr ' ' '\n' | grep -c '^removed$' || true) after its removal"
echo "VM kill during format: all checks passed in $(($(ms) - T0)) ms"
