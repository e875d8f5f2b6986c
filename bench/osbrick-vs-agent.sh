#!/bin/sh
# luks-agent vs os-brick's LuksEncryptor/Luks2Encryptor, side by side in one
# VM guest run (real dm-crypt); luks-agent as the CLI, as a running daemon
# (`luks-agent serve`) called over its socket, and through the os-brick
# plug-in called in-process as nova calls it. See bench/README.md
# ("luks-agent vs os-brick").
#
#   bench/osbrick-vs-agent.sh [--reps N] [--smp N] [--mem MiB]
#                             [--concurrency N] [--size-mib N]
#                             [--providers luks,luks2] [--out DIR]
#
# Builds target/release/luks-agent (a no-op when up to date), checks the
# os-brick venv (tests/harness/osbrick.sh install makes it), boots the guest
# with vm/run.sh and runs bench/osbrick-vs-agent.py there. The output ends
# with a BENCH_JSON line; the same document is written to
# DIR/osbrick-vs-agent.json (default target/bench-osbrick).
set -eu
cd "$(dirname "$0")/.."
REPS=5 SMP=1 MEM=2048 CONC=32 SIZE=64 PROVIDERS=luks,luks2 OUT=target/bench-osbrick
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --reps) REPS=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --concurrency) CONC=$2; shift 2 ;;
        --size-mib) SIZE=$2; shift 2 ;;
        --providers) PROVIDERS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "osbrick-vs-agent.sh: unknown argument $1" >&2; usage ;;
    esac
done
tests/harness/osbrick.sh check
VENV=$(tests/harness/osbrick.sh path)
cargo build --release --locked --quiet
[ "$(id -u)" -eq 0 ] || { echo "osbrick-vs-agent.sh: run as root (QEMU shares the host root)" >&2; exit 2; }
mkdir -p "$OUT"
# Other work on the host slows the guest unevenly (process starts most).
echo "host load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
rc=0
vm/run.sh --timeout 1800 --smp "$SMP" --mem "$MEM" --results "$OUT" -- \
    /bin/sh -c "PYTHONPATH=$PWD/integrations/os_brick exec $VENV/bin/python bench/osbrick-vs-agent.py --reps $REPS --concurrency $CONC \
        --size-mib $SIZE --providers $PROVIDERS --json-out \$VM_RESULTS/osbrick-vs-agent.json" || rc=$?
echo "host load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$rc"
