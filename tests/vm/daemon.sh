#!/bin/sh
# VM tier: the agent (luks-agent serve) attaching for real, inside a guest
# with device-mapper. Volumes are loop devices behind os-brick-style
# symlinks; the CLI talks to the agent over its socket (checked through the
# agent's metrics); a small Python client sends raw API requests. Checks:
# attach/detach in dm mode through the API, typed errors and exit codes
# through the agent, SIGTERM during a burst of 16 attaches leaving every
# volume fully attached or fully detached, and no key material in the logs.
# Every check exits non-zero on failure.
set -eu
BIN=${BIN:-target/release/luks-agent}
W=$(mktemp -d /tmp/vmdaemon.XXXXXX)
fail() {
    echo "FAIL: $*" >&2
    [ -f "$W/agent.log" ] && tail -n 30 "$W/agent.log" >&2
    exit 1
}
pass() { echo "ok - $*"; }
ms() { echo $(($(date +%s%N) / 1000000)); }
[ -x "$BIN" ] || fail "$BIN missing: cargo build --release first"
command -v python3 >/dev/null || fail "python3 missing"

cat >"$W/agent.toml" <<CONF
state_dir = "$W/state"
run_dir = "$W/run"
[key_manager.local]
dir = "$W/keys"
[server]
socket = "$W/agent.sock"
shutdown_timeout_ms = 20000
kdf_memory_budget_kib = 65536
log_format = "json"
CONF
chmod 600 "$W/agent.toml"
A="$BIN --config $W/agent.toml"
mkdir -p /dev/disk/by-id

# Raw API client: api.py METHOD PATH [BODY] prints "STATUS BODY"; burst
# mode sends many attaches at once and signals the agent mid-way.
cat >"$W/api.py" <<'PY'
import http.client, json, os, signal, socket, sys, threading, time

SOCK = os.environ["SOCK"]

class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(SOCK)

def call(method, path, body=None):
    c = Conn("luks-agent", timeout=120)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    return r.status, r.read().decode()

if sys.argv[1] == "burst":
    # burst PID SPECS LATE: one attach per line "volume_id device encryption_json",
    # SIGTERM once the first answers, then the LATE ones
    pid, specs = int(sys.argv[2]), open(sys.argv[3]).read().splitlines()
    results, first = {}, threading.Event()
    def one(line):
        vid, dev, enc = line.split(" ", 2)
        body = json.dumps({"device": dev, "encryption": json.loads(enc)})
        try:
            st, text = call("POST", "/v1/volumes/%s/attach" % vid, body)
        except Exception as e:
            st, text = 0, repr(e)
        results[vid] = (st, text)
        first.set()
    threads = [threading.Thread(target=one, args=(l,)) for l in specs]
    for t in threads:
        t.start()
    first.wait(60)
    os.kill(pid, signal.SIGTERM)
    # Late callers, after the signal: never attached by this agent.
    late = [threading.Thread(target=one, args=(l,)) for l in open(sys.argv[4]).read().splitlines()]
    time.sleep(0.2)
    for t in late:
        t.start()
    for t in threads + late:
        t.join()
    for vid, (st, text) in sorted(results.items()):
        code = json.loads(text)["error"]["code"] if st >= 400 else ""
        print(vid, st, code)
elif sys.argv[1] == "healthz":
    # healthz N: latency of N sequential requests (one connection each)
    ts = []
    for _ in range(int(sys.argv[2])):
        t = time.monotonic()
        st, _ = call("GET", "/healthz")
        ts.append((time.monotonic() - t) * 1000)
        assert st == 200
    ts.sort()
    print("p50 %.2f ms, p99 %.2f ms" % (ts[len(ts) // 2], ts[int(len(ts) * 0.99)]))
elif sys.argv[1] == "cycle":
    # cycle VID BODY N: N attach/detach pairs; latencies from request to answer
    vid, body, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
    at, dt = [], []
    for _ in range(n):
        t = time.monotonic()
        st, text = call("POST", "/v1/volumes/%s/attach" % vid, body)
        at.append((time.monotonic() - t) * 1000)
        assert st == 200 and '"action":"created"' in text, text
        t = time.monotonic()
        st, text = call("POST", "/v1/volumes/%s/detach" % vid, body)
        dt.append((time.monotonic() - t) * 1000)
        assert st == 200 and '"action":"removed"' in text, text
    at.sort(); dt.sort()
    print("attach p50 %.1f ms max %.1f ms, detach p50 %.1f ms max %.1f ms (%d each)"
          % (at[n // 2], at[-1], dt[n // 2], dt[-1], n))
elif sys.argv[1] == "queue":
    # queue PID N SPEC: N attaches of one volume; SIGTERM while the first
    # runs and the others wait for the volume's lock
    pid, n, line = int(sys.argv[2]), int(sys.argv[3]), open(sys.argv[4]).read().strip()
    vid, dev, enc = line.split(" ", 2)
    body = json.dumps({"device": dev, "encryption": json.loads(enc)})
    results = []
    def one():
        st, text = call("POST", "/v1/volumes/%s/attach" % vid, body)
        v = json.loads(text)
        results.append("%d %s" % (st, v["error"]["code"] if st >= 400 else v["action"]))
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st, text = call("GET", "/metrics")
        if "luks_agent_operations_in_flight 1" in text and "luks_agent_requests_in_flight %d" % (n + 1) in text:
            break
        time.sleep(0.005)
    else:
        print("the operations never queued")
        sys.exit(1)
    os.kill(pid, signal.SIGTERM)
    for t in threads:
        t.join()
    print(", ".join(sorted(results)))
elif sys.argv[1] in ("kdf", "same"):
    # kdf BUDGET SPECS: concurrent attaches while sampling the KDF budget;
    # same N SPEC: N concurrent attaches of one volume
    if sys.argv[1] == "kdf":
        budget, specs = int(sys.argv[2]), open(sys.argv[3]).read().splitlines()
    else:
        budget, specs = 0, open(sys.argv[3]).read().splitlines() * int(sys.argv[2])
    results, stop, peak = [], threading.Event(), {"in_use": 0, "waiting": 0}
    def sample():
        while not stop.is_set():
            st, text = call("GET", "/metrics")
            for l in text.splitlines():
                for k in peak:
                    if l.startswith("luks_agent_kdf_%s " % ("memory_in_use_kib" if k == "in_use" else k)):
                        peak[k] = max(peak[k], int(l.split()[1]))
            time.sleep(0.01)
    def one(line):
        vid, dev, enc = line.split(" ", 2)
        st, text = call("POST", "/v1/volumes/%s/attach" % vid,
                        json.dumps({"device": dev, "encryption": json.loads(enc)}))
        results.append((st, json.loads(text).get("action")))
    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(l,)) for l in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = (time.monotonic() - t0) * 1000
    stop.set()
    sampler.join()
    if any(st != 200 for st, _ in results):
        print("failed:", results)
        sys.exit(1)
    if sys.argv[1] == "same":
        actions = sorted(a for _, a in results)
        print(" ".join(actions))
        sys.exit(0 if actions.count("created") == 1 else 1)
    print("%d attaches in %.0f ms; peak KDF memory %d KiB of %d, peak waiting %d"
          % (len(results), took, peak["in_use"], budget, peak["waiting"]))
    sys.exit(0 if peak["in_use"] <= budget and peak["in_use"] > 0 and peak["waiting"] > 0 else 1)
elif sys.argv[1] == "scan":
    # scan LOG HEX...: fails when any key, in hex, base64 or raw, is in LOG
    import base64
    log = open(sys.argv[2], "rb").read()
    for h in sys.argv[3:]:
        raw = bytes.fromhex(h)
        for what, needle in (("hex", h.encode()), ("HEX", h.upper().encode()),
                             ("base64", base64.b64encode(raw)), ("raw", raw)):
            if needle in log:
                print("key material (%s) in the log" % what)
                sys.exit(1)
    print("clean: %d keys, %d bytes of log" % (len(sys.argv) - 3, len(log)))
else:
    st, text = call(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    print(st, text)
PY
export SOCK="$W/agent.sock"
api() { python3 "$W/api.py" "$@"; }

start_agent() {
    $BIN --config "$W/agent.toml" serve >>"$W/agent.log" 2>&1 &
    AGENT_PID=$!
    i=0
    until api GET /healthz 2>/dev/null | grep -q '^200 '; do
        i=$((i + 1))
        [ $i -lt 200 ] || fail "agent did not answer /healthz"
        kill -0 $AGENT_PID 2>/dev/null || fail "agent exited at start"
        sleep 0.05
    done
}
attaches() { api GET /metrics | grep -o 'route="/v1/volumes/{id}/attach",outcome="[a-z_]*"} [0-9]*' | awk '{s += $2} END {print s + 0}'; }

new_volume() { # name size -> sets DEV (loop) and LINK (symlink like os-brick's)
    truncate -s "$2" "$W/$1.img"
    DEV=$(losetup --find --show "$W/$1.img")
    LINK=/dev/disk/by-id/os-brick+$1
    ln -sfn "$DEV" "$LINK"
}

start_agent
pass "agent answers /healthz: $(api healthz 200) over 200 requests"

# --- dm mode through the API, via the CLI client -------------------------
KEY=$($A keys create)
KEYS="$KEY"
ENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"cipher\": \"aes-xts-plain64\", \"key_size\": 256, \"encryption_key_id\": \"$KEY\"}"
new_volume api1 64M
MAP=crypt-os-brick+api1
N0=$(attaches)
t0=$(ms)
OUT=$($A attach --volume-id vol-api1 --device "$LINK" --encryption "$ENC" --json)
t1=$(ms)
[ "$(attaches)" -eq $((N0 + 1)) ] || fail "the CLI did not go through the agent"
echo "$OUT" | grep -q '"formatted":true' || fail "first attach did not format: $OUT"
echo "$OUT" | grep -q '"action":"created"' || fail "first attach: $OUT"
[ -b "/dev/mapper/$MAP" ] || fail "/dev/mapper/$MAP missing"
[ "$(readlink "$LINK")" = "/dev/mapper/$MAP" ] || fail "symlink not repointed"
[ -f "$W/run/volumes/vol-api1.json" ] || fail "no attach record"
dmsetup table --showkeys "$MAP" | grep -q ":32:logon:luks-agent:" || fail "table has no keyring reference"
pass "attach through the agent (dm mode): format, mapping, symlink, record in $((t1 - t0)) ms (CLI process included; agent: $(echo "$OUT" | sed 's/.*"duration_ms":\([0-9.]*\).*/\1/') ms)"

api GET /v1/volumes/vol-api1 | grep -q "\"name\":\"$MAP\"" || fail "GET /v1/volumes/{id}: $(api GET /v1/volumes/vol-api1)"
$A status | grep -q "^$MAP$(printf '\t')" || fail "status through the agent lacks $MAP"
pass "GET /v1/volumes/{id} and status show the kernel's mapping"

dd if=/dev/urandom of="$W/pattern" bs=64k count=16 status=none
dd if="$W/pattern" of="/dev/mapper/$MAP" bs=64k oflag=direct status=none
$A detach --volume-id vol-api1 --device "$LINK" --encryption "$ENC"
[ ! -e "/dev/mapper/$MAP" ] || fail "mapping still there after detach"
[ "$(readlink "$LINK")" = "$DEV" ] || fail "symlink not restored"
[ ! -e "$W/run/volumes/vol-api1.json" ] || fail "record left after detach"
CYCLE=$(api cycle vol-api1 "{\"device\": \"$LINK\", \"encryption\": $ENC, \"mode\": \"dm\"}" 10) || fail "attach/detach cycles"
pass "through the API, formatted volume: $CYCLE"
$A attach --volume-id vol-api1 --device "$LINK" --encryption "$ENC" >/dev/null
cmp -n 1048576 "$W/pattern" "/dev/mapper/$MAP" || fail "data differs after re-attach"
$A detach --volume-id vol-api1 --device "$LINK" --encryption "$ENC"
pass "detach through the agent removes mapping, record and restores the symlink; data survives"

# --- errors through the agent: codes and exit codes -----------------------
OTHER=$($A keys create)
KEYS="$KEYS $OTHER"
BEFORE=$(sha256sum "$DEV" | cut -d' ' -f1)
set +e
$A attach --volume-id vol-api1 --device "$LINK" --encryption "$(echo "$ENC" | sed "s/$KEY/$OTHER/")" 2>"$W/err"
rc=$?
set -e
[ "$rc" -eq 2 ] || fail "wrong key through the agent: exit $rc: $(cat "$W/err")"
[ "$(sha256sum "$DEV" | cut -d' ' -f1)" = "$BEFORE" ] || fail "wrong key changed the device"
api POST /v1/volumes/vol-api1/attach "{\"device\": \"$LINK\", \"encryption\": $(echo "$ENC" | sed "s/$KEY/$OTHER/")}" | grep -q '^422 .*"code":"wrong_key"' || fail "wrong key: not 422 wrong_key"
pass "a wrong key through the agent: 422 wrong_key, exit 2, device untouched"

FSKEY=$($A keys create)
KEYS="$KEYS $FSKEY"
new_volume fs 64M
mkfs.ext4 -q "$DEV"
BEFORE=$(sha256sum "$DEV" | cut -d' ' -f1)
FSENC="{\"provider\": \"luks\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$FSKEY\"}"
set +e
$A attach --volume-id vol-fs --device "$LINK" --encryption "$FSENC" 2>"$W/err"
rc=$?
set -e
[ "$rc" -eq 5 ] || fail "ext4 through the agent: exit $rc: $(cat "$W/err")"
api POST /v1/volumes/vol-fs/attach "{\"device\": \"$LINK\", \"encryption\": $FSENC}" | grep -q '^422 .*"code":"format_refused"' || fail "ext4: not 422 format_refused"
[ "$(sha256sum "$DEV" | cut -d' ' -f1)" = "$BEFORE" ] || fail "ext4 device changed"
losetup -d "$DEV"
pass "a device holding ext4: 422 format_refused, exit 5, nothing written"

api POST /v1/volumes/vol-x/extend "{\"device\": \"$LINK\", \"encryption\": $ENC}" | grep -q '^409 .*"code":"not_attached"' || fail "extend of a detached volume not 409"
api POST /v1/volumes/vol-x/attach "{\"device\": \"/dev/disk/by-id/none\", \"encryption\": $ENC}" | grep -q '^422 .*"code":"device_not_found"' || fail "missing device not 422"
pass "extend of a detached volume: 409 not_attached; missing device: 422 device_not_found"

# --- per-volume serialisation and the KDF memory budget -------------------
K=$($A keys create)
KEYS="$KEYS $K"
new_volume same 32M
echo "vol-same $LINK {\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$K\"}" >"$W/same"
OUT=$(api same 6 "$W/same") || fail "6 concurrent attaches of one volume: $OUT"
[ "$(dmsetup ls | grep -c 'crypt-os-brick+same')" -eq 1 ] || fail "not exactly one mapping"
pass "6 concurrent attaches of one volume through the API: $OUT"

# Headers with a memory-hard KDF (argon2id, 32 MiB each, as cryptsetup
# writes them); the agent's budget is 64 MiB: never more than two at once.
: >"$W/kdf"
for i in 1 2 3 4; do
    K=$($A keys create)
    KEYS="$KEYS $K"
    new_volume "kdf$i" 32M
    $A keys fetch --key-id "$K" --reveal --check 2>/dev/null | sed -n 's/^passphrase: //p' | tr -d '\n' >"$W/pass-kdf"
    cryptsetup luksFormat -q --type luks2 --pbkdf argon2id --pbkdf-memory 32768 --pbkdf-parallel 1 \
        --pbkdf-force-iterations 4 --key-file "$W/pass-kdf" "$DEV"
    echo "vol-kdf$i $LINK {\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$K\"}" >>"$W/kdf"
done
OUT=$(api kdf 65536 "$W/kdf") || fail "KDF budget: $OUT"
pass "KDF budget: $OUT"

# --- SIGTERM during a burst of 16 attaches --------------------------------
: >"$W/burst"
: >"$W/late"
for i in $(seq 1 20); do
    K=$($A keys create)
    KEYS="$KEYS $K"
    new_volume "b$i" 16M
    E="{\"provider\": \"luks\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$K\"}"
    if [ "$i" -le 16 ]; then
        echo "vol-b$i $LINK $E" >>"$W/burst"
    else
        echo "vol-b$i $LINK $E" >>"$W/late"
    fi
    echo "$DEV" >"$W/dev-b$i"
done
t0=$(ms)
api burst "$AGENT_PID" "$W/burst" "$W/late" >"$W/burst.out" || fail "burst client failed"
wait $AGENT_PID || fail "agent exited non-zero after SIGTERM"
t1=$(ms)
[ ! -e "$W/agent.sock" ] || fail "socket left behind"
OKS=$(grep -c ' 200 $' "$W/burst.out" || true)
REFUSED=$(grep -c ' 503 shutting_down$' "$W/burst.out" || true)
DROPPED=$(grep -c ' 0 $' "$W/burst.out" || true)
[ $((OKS + REFUSED + DROPPED)) -eq 20 ] || fail "unexpected answers: $(cat "$W/burst.out")"
for i in 17 18 19 20; do
    grep -q "^vol-b$i 200 " "$W/burst.out" && fail "vol-b$i attached after SIGTERM"
done
FULL=0
NONE=0
for i in $(seq 1 20); do
    MAP=crypt-os-brick+b$i
    LINK=/dev/disk/by-id/os-brick+b$i
    HAS_MAP=0; HAS_REC=0; POINTS=0
    [ -b "/dev/mapper/$MAP" ] && HAS_MAP=1
    [ -f "$W/run/volumes/vol-b$i.json" ] && HAS_REC=1
    [ "$(readlink "$LINK")" = "/dev/mapper/$MAP" ] && POINTS=1
    if [ "$HAS_MAP$HAS_REC$POINTS" = 111 ]; then
        FULL=$((FULL + 1))
    elif [ "$HAS_MAP$HAS_REC$POINTS" = 000 ] && [ "$(readlink "$LINK")" = "$(cat "$W/dev-b$i")" ]; then
        NONE=$((NONE + 1))
    else
        fail "vol-b$i half attached: mapping=$HAS_MAP record=$HAS_REC symlink=$(readlink "$LINK")"
    fi
    if grep -q "^vol-b$i 200 " "$W/burst.out" && [ "$HAS_MAP" = 0 ]; then
        fail "vol-b$i answered 200 but is not attached"
    fi
done
[ "$OKS" -ge 1 ] || fail "no attach finished before the agent stopped"
[ "$FULL" -ge "$OKS" ] || fail "$OKS answered 200 but only $FULL attached"
pass "SIGTERM during 16 attaches (+4 after it): $FULL fully attached, $NONE fully detached, none half-made ($OKS answered 200, $REFUSED 503 shutting_down, $DROPPED refused at connect; burst to exit $((t1 - t0)) ms)"
INFLIGHT=$(grep '"SIGTERM"' "$W/agent.log" | sed -n 's/.*"operations_in_flight":\([0-9]*\).*/\1/p' | head -n 1)
[ -n "$INFLIGHT" ] || fail "no SIGTERM log line"
echo "   ($INFLIGHT operations were running when SIGTERM arrived)"
grep -q '"message":"stopped"' "$W/agent.log" || fail "no stopped log line"

# Clean up the burst volumes directly (no agent runs now: the CLI acts).
cat "$W/burst" "$W/late" | while read -r vid link enc; do
    $A detach --volume-id "$vid" --device "$link" --encryption "$enc" 2>/dev/null || fail "detach $vid"
done
! dmsetup ls | grep -q 'crypt-os-brick+b' || fail "mappings left: $(dmsetup ls)"
pass "without an agent the CLI acts directly: every burst volume detached"

# --- SIGTERM while callers wait for a volume --------------------------------
# A slow unlock (argon2id) holds the volume; three more callers queue for
# it. SIGTERM: the running attach completes, the queued ones get 503.
start_agent
K=$($A keys create)
KEYS="$KEYS $K"
new_volume slow 32M
$A keys fetch --key-id "$K" --reveal --check 2>/dev/null | sed -n 's/^passphrase: //p' | tr -d '\n' >"$W/pass-slow"
cryptsetup luksFormat -q --type luks2 --pbkdf argon2id --pbkdf-memory 32768 --pbkdf-parallel 1 \
    --pbkdf-force-iterations 16 --key-file "$W/pass-slow" "$DEV"
echo "vol-slow $LINK {\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"$K\"}" >"$W/slow"
OUT=$(api queue "$AGENT_PID" 4 "$W/slow") || fail "queued attaches: $OUT"
wait $AGENT_PID || fail "agent exit status after SIGTERM"
[ "$OUT" = "200 created, 503 shutting_down, 503 shutting_down, 503 shutting_down" ] || fail "queued attaches: $OUT"
[ -b /dev/mapper/crypt-os-brick+slow ] || fail "the running attach left no mapping"
[ -f "$W/run/volumes/vol-slow.json" ] || fail "the running attach left no record"
[ "$(readlink "$LINK")" = /dev/mapper/crypt-os-brick+slow ] || fail "the running attach did not repoint the symlink"
$A detach --volume-id vol-slow --device "$LINK" --encryption "$(cut -d' ' -f3- "$W/slow")" 2>/dev/null
pass "SIGTERM with callers queued on a volume: the running attach completes, the waiting ones get 503 ($OUT)"

# --- key manager down ------------------------------------------------------
cat >"$W/down.toml" <<CONF
state_dir = "$W/state"
run_dir = "$W/run"
[key_manager]
backend = "barbican"
[key_manager.barbican]
endpoint = "http://127.0.0.1:9"
[key_manager.http]
connect_timeout_ms = 200
request_timeout_ms = 500
max_attempts = 2
backoff_base_ms = 50
backoff_max_ms = 100
deadline_ms = 2000
[server]
socket = "$W/down.sock"
log_format = "json"
CONF
chmod 600 "$W/down.toml"
$BIN --config "$W/down.toml" serve >>"$W/agent.log" 2>&1 &
DOWN_PID=$!
export SOCK="$W/down.sock"
i=0
until api GET /healthz 2>/dev/null | grep -q '^200 '; do
    i=$((i + 1)); [ $i -lt 200 ] || fail "second agent did not start"; sleep 0.05
done
new_volume down 16M
DENC="{\"provider\": \"luks2\", \"control_location\": \"front-end\", \"encryption_key_id\": \"6f1c1f1e-0000-4000-8000-000000000001\"}"
OUT=$(api POST /v1/volumes/vol-down/attach "{\"device\": \"$LINK\", \"encryption\": $DENC, \"auth\": {\"token\": \"gAAAAAB-user-token-SECRET\"}}")
case "$OUT" in 502*'"code":"key_manager_unavailable"'* | 504*'"code":"key_manager_timeout"'*) ;; *) fail "key manager down: $OUT" ;; esac
set +e
printf 'gAAAAAB-user-token-SECRET\n' >"$W/token"
$BIN --config "$W/down.toml" attach --volume-id vol-down --device "$LINK" --encryption "$DENC" --token-file "$W/token" 2>"$W/err"
rc=$?
set -e
[ "$rc" -eq 8 ] || fail "key manager down: exit $rc: $(cat "$W/err")"
[ ! -e /dev/mapper/crypt-os-brick+down ] || fail "mapping made without a key"
kill -TERM $DOWN_PID
wait $DOWN_PID || fail "second agent exit status"
losetup -d "$DEV"
pass "key manager down: ${OUT%% *} $(echo "$OUT" | sed 's/.*"code":"\([a-z_]*\)".*/\1/'), exit 8, nothing mapped"

# --- no key material in any log --------------------------------------------
HEXES=""
for k in $KEYS; do
    HEXES="$HEXES $($A keys fetch --key-id "$k" --reveal --check 2>/dev/null | sed -n 's/^passphrase: //p')"
done
grep -q "gAAAAAB-user-token-SECRET" "$W/agent.log" && fail "a caller's token is in the log"
# shellcheck disable=SC2086
python3 "$W/api.py" scan "$W/agent.log" $HEXES || fail "key material in the agent's log"
[ "$(grep -c '"message":"volume operation"' "$W/agent.log")" -ge 20 ] || fail "too few operation log lines"
pass "logs: one JSON line per operation, no key (hex, base64, raw) nor token of this run"

for i in $(seq 1 20); do losetup -d "$(cat "$W/dev-b$i")" 2>/dev/null || true; done
echo "VM daemon: all checks passed"
