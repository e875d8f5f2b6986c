#!/bin/sh
# VM tier: the data-loss reproduction in dm mode, with real dm-crypt.
# A first attach of a volume fails before anything reaches its device (the
# device is too small; or it is a FIFO, a character device or a
# directory); then the same volume id and key are attached on a loop
# device holding ext4 (or random data). The second device must be refused
# (exit 5 / HTTP 422 format_refused naming what it holds) and stay
# byte-identical, nothing may stay recorded, and a blank device must then
# format at once. Through the CLI acting directly (--local) and through
# the agent's API.
# Runs as root in the guest (vm/run.sh); exits non-zero on any failure.
. tests/vm/lib.sh
command -v python3 >/dev/null || fail "python3 missing"
command -v mkfs.ext4 >/dev/null || fail "mkfs.ext4 missing"

cat >"$W/agent.toml" <<CONF
state_dir = "$W/state"
run_dir = "$W/run"
[key_manager.local]
dir = "$W/keys"
[server]
socket = "$W/agent.sock"
CONF
chmod 600 "$W/agent.toml"

cat >"$W/api.py" <<'PY'
import http.client, json, os, socket, sys

class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.environ["SOCK"])

vid, dev, enc = sys.argv[1], sys.argv[2], sys.argv[3]
c = Conn("luks-agent", timeout=120)
c.request("POST", "/v1/volumes/%s/attach" % vid,
          body=json.dumps({"device": dev, "encryption": json.loads(enc)}),
          headers={"Content-Type": "application/json"})
r = c.getresponse()
body = r.read().decode()
code = json.loads(body).get("error", {}).get("code", "ok") if r.status != 200 else "ok"
print(r.status, code, body)
PY

recorded() { # -> this volume's format record and this key's intent, if any
    for f in "$W/state/formatting/$VID" "$W/state/format-intents/$KEY"; do
        [ ! -e "$f" ] || echo "$f"
    done
}

N=0
new_key() {
    KEY=$($A keys create)
    ENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"cipher\": \"aes-xts-plain64\", \"key_size\": 256, \"encryption_key_id\": \"$KEY\"}"
}
loop_of() { # size name -> DEV
    truncate -s "$1" "$W/$2.img"
    DEV=$(losetup --find --show "$W/$2.img")
}
attach() { # via vid device -> RC OUT (CLI: exit code; API: HTTP status + code)
    if [ "$1" = cli ]; then
        set +e
        OUT=$($A attach --local --volume-id "$2" --device "$3" --encryption "$ENC" 2>&1)
        RC=$?
        set -e
    else
        OUT=$(SOCK="$W/agent.sock" python3 "$W/api.py" "$2" "$3" "$ENC")
        RC=$(echo "$OUT" | cut -d' ' -f1-2)
    fi
}

$BIN --config "$W/agent.toml" serve 2>"$W/agent.log" &
AGENT=$!
i=0
until [ -S "$W/agent.sock" ]; do
    i=$((i + 1)); [ $i -lt 200 ] || fail "agent did not start: $(cat "$W/agent.log")"; sleep 0.05
done
trap 'kill $AGENT 2>/dev/null || true' EXIT

mkfifo "$W/fifo"
mkdir "$W/dir"
for via in cli api; do
    for first in small fifo chardev directory; do
        for content in ext4 random; do
            N=$((N + 1))
            new_key
            VID=vol-$N
            case $first in
                small) loop_of 1M small-$N; FIRST=$DEV ;;
                fifo) FIRST=$W/fifo ;;
                chardev) FIRST=/dev/zero ;;
                directory) FIRST=$W/dir ;;
            esac
            attach "$via" "$VID" "$FIRST"
            case "$via:$RC" in
                cli:4|api:"422 device_unusable") ;;
                *) fail "$via/$first: first attach gave $RC: $OUT" ;;
            esac
            LEFT=$(recorded)
            loop_of 32M victim-$N
            VICTIM=$DEV
            if [ "$content" = ext4 ]; then
                mkfs.ext4 -q -F "$VICTIM"
            else
                dd if=/dev/urandom of="$VICTIM" bs=1M count=32 status=none
            fi
            sync
            BEFORE=$(sha256sum "$VICTIM" | cut -d' ' -f1)
            attach "$via" "$VID" "$VICTIM"
            AFTER=$(sha256sum "$VICTIM" | cut -d' ' -f1)
            [ "$BEFORE" = "$AFTER" ] || fail "$via/$first/$content: THE DEVICE HOLDING DATA WAS WRITTEN ($RC: $OUT)"
            [ -z "$LEFT" ] || fail "$via/$first: the failed attempt left records: $LEFT"
            case "$via:$RC" in
                cli:5|api:"422 format_refused") ;;
                *) fail "$via/$first/$content: attach on the victim gave $RC: $OUT" ;;
            esac
            if [ "$content" = ext4 ]; then WHAT=ext4; else WHAT="not all zero"; fi
            echo "$OUT" | grep -q "$WHAT" || fail "$via/$first/$content: refusal does not name $WHAT: $OUT"
            ! dmsetup info "crypt-$(basename "$VICTIM")" >/dev/null 2>&1 || fail "$via/$first/$content: mapped"
            # A blank device is then formatted at once: nothing of the
            # failed attempt holds it off.
            loop_of 32M blank-$N
            attach "$via" "$VID" "$DEV"
            case "$via:$RC" in
                cli:0|api:"200 ok") ;;
                *) fail "$via/$first/$content: blank device after the failure: $RC: $OUT" ;;
            esac
            $A detach --volume-id "$VID" --device "$DEV" --encryption "$ENC" >/dev/null 2>&1 \
                || fail "$via/$first/$content: detach"
            losetup -d "$VICTIM" "$DEV"
            # The guest's /tmp is memory: drop this round's images.
            [ "$first" != small ] || losetup -d "$FIRST"
            rm -f "$W/victim-$N.img" "$W/blank-$N.img" "$W/small-$N.img"
            pass "$via: first attach on $first failed, then $content on $VICTIM refused and unchanged; a blank device formats"
        done
    done
done
kill "$AGENT"
wait "$AGENT" || true
trap - EXIT
pass "format guard in dm mode: $N reproductions in $(($(ms) - T0)) ms"
