#!/usr/bin/env bash
# Runs one command as root inside a throw-away QEMU guest that has
# device-mapper, dm-crypt and loop devices, and exits with its exit code.
#
#   vm/run.sh [OPTIONS] -- COMMAND [ARG...]
#
# The guest boots the Debian kernel from /boot with the initramfs of
# vm/build-initramfs.sh (built or refreshed first), sees the host's root file
# system read-only (9p) and runs COMMAND chrooted into it, so host binaries
# (cargo test binaries, cryptsetup, ...) run unchanged. /tmp, /run, /dev/shm
# are empty tmpfs in the guest: the host's /tmp is not visible there, except
# a checkout that lives under it, which is shared at the same path.
#
# Options:
#   --timeout S     kill the guest after S seconds (default 900)
#   --mem M         guest memory in MiB (default 1024)
#   --smp N         guest CPUs (default 1)
#   --env K=V       set K=V for COMMAND (repeatable; never pass secrets: the
#                   value is written to a job file under target/vm/)
#   --results DIR   share host DIR read-write; COMMAND finds it at
#                   $VM_RESULTS (/run/vm-results in the guest)
#   --cwd DIR       working directory of COMMAND (default: the repo root)
#   --console FILE  where the whole serial console is saved
#                   (default target/vm/console.log)
#   --accel A       kvm, tcg or auto (default auto, or $VM_ACCEL): auto probes
#                   KVM once per host boot with a short boot and uses TCG
#                   when KVM does not work (nested virtualisation often hangs)
#   --verbose       also print the boot messages (to stderr)
#
# VM_KERNEL_ARGS adds kernel parameters, e.g. 'loglevel=7' to see the
# kernel's boot messages (the guest boots with "quiet").
#
# COMMAND's stdout and stderr arrive merged on run.sh's standard output, as
# they are written (a file on a 9p share that run.sh follows, so not a
# terminal: C programs buffer their stdout). Its stdin is /dev/null.
# COMMAND sees a clean environment: PATH, HOME=/root, LANG=C.UTF-8, VM_GUEST=1,
# VM_RESULTS when --results is given, and the --env variables.
#
# Exit status: COMMAND's own; 124 if the guest timed out; 125 if the guest
# failed to boot or to start COMMAND. Harness messages start with "vm/run:"
# and go to stderr, with the tail of the console on failure.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
vmdir=$repo/target/vm

die() { echo "vm/run: error: $*" >&2; exit 125; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 125; }

timeout_s=900
mem=1024
smp=1
envs=()
results=
cwd=$repo
console=$vmdir/console.log
accel=${VM_ACCEL:-auto}
verbose=0
while [ $# -gt 0 ]; do
    case "$1" in
        --timeout) timeout_s=${2:?--timeout needs a value}; shift 2 ;;
        --mem) mem=${2:?--mem needs a value}; shift 2 ;;
        --smp) smp=${2:?--smp needs a value}; shift 2 ;;
        --env) envs+=("${2:?--env needs K=V}"); shift 2 ;;
        --results) results=${2:?--results needs a directory}; shift 2 ;;
        --cwd) cwd=${2:?--cwd needs a directory}; shift 2 ;;
        --console) console=${2:?--console needs a file}; shift 2 ;;
        --accel) accel=${2:?--accel needs kvm, tcg or auto}; shift 2 ;;
        --verbose) verbose=1; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        *) echo "vm/run: unknown option $1 (COMMAND goes after --)" >&2; usage ;;
    esac
done
[ $# -gt 0 ] || usage
case "$timeout_s$mem$smp" in *[!0-9]*) die "--timeout, --mem and --smp take integers" ;; esac
case "$accel" in kvm|tcg|auto) ;; *) die "--accel must be kvm, tcg or auto" ;; esac
for kv in ${envs[@]+"${envs[@]}"}; do
    case "$kv" in
        [A-Za-z_]*=*) k=${kv%%=*}; case "$k" in *[!A-Za-z0-9_]*) die "bad --env name: $k" ;; esac ;;
        *) die "--env takes K=V, got: $kv" ;;
    esac
done
case "$cwd" in /*) ;; *) cwd=$(cd "$cwd" && pwd) ;; esac
# The guest's /tmp is its own tmpfs; a checkout under the host's /tmp is
# shared separately and mounted at the same path (vm.repo).
share_repo=0
case "$repo/" in /tmp/*) share_repo=1 ;; esac
case "$repo" in *[[:space:]]*) [ "$share_repo" = 0 ] || die "a checkout under /tmp must have a path without spaces" ;; esac
inside_repo() { case "$1/" in "$repo"/*) return 0 ;; esac; return 1; }
case "$cwd/" in /tmp/*) inside_repo "$cwd" || die "--cwd $cwd is under /tmp, which the guest does not see" ;; esac
case "$1" in /tmp/*) inside_repo "$1" || die "$1 is under /tmp, which the guest does not see; build it under target/" ;; esac
if [ -n "$results" ]; then
    mkdir -p "$results"
    results=$(cd "$results" && pwd)
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run vm/install.sh"

mkdir -p "$vmdir" "$(dirname "$console")"
"$repo/vm/build-initramfs.sh" || die "cannot build the initramfs"
initrd=$vmdir/initramfs.cpio.gz
kver=$(sed -n 's/^kernel=//p' "$initrd.stamp")
kernel=$(sed -n 's/^boot=//p' "$initrd.stamp")
if [ -z "$kver" ] || [ ! -r "$kernel" ]; then
    die "kernel image '$kernel' missing (vm/build-initramfs.sh --force)"
fi

# One directory per run: job/ is shared with the guest (the job script in,
# the exit code out); the rest stays on the host.
mkdir -p "$vmdir/runs"
run=$(mktemp -d "$vmdir/runs/run.XXXXXX")
mkdir "$run/job"
qemu_pid=
filter_pid=
tail_pid=
cleanup() {
    if [ -n "$qemu_pid" ]; then kill "$qemu_pid" 2>/dev/null || true; fi
    if [ -n "$filter_pid" ]; then wait "$filter_pid" 2>/dev/null || true; fi
    if [ -n "$tail_pid" ]; then kill "$tail_pid" 2>/dev/null || true; fi
    rm -rf "$run"
}
trap cleanup EXIT
trap 'echo "vm/run: interrupted" >&2; exit 130' INT
trap 'echo "vm/run: terminated" >&2; exit 143' TERM

q() { # quote for POSIX sh
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
}
{
    echo "# job for vm/run.sh"
    echo "cd $(q "$cwd") || exit 125"
    printf 'exec env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb VM_GUEST=1'
    [ -z "$results" ] || printf ' VM_RESULTS=/run/vm-results'
    for kv in ${envs[@]+"${envs[@]}"}; do printf ' %s' "$(q "$kv")"; done
    for a in "$@"; do printf ' %s' "$(q "$a")"; done
    echo
} >"$run/job/job.sh"

nonce=$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')

qemu_base() { # ACCEL -> the qemu command line, without the job-specific parts
    local cpu=max
    [ "$1" = kvm ] && cpu=host
    printf '%s\n' qemu-system-x86_64 -accel "$1" -cpu "$cpu" -m "$mem" -smp "$smp" \
        -nodefaults -no-user-config -display none -no-reboot -serial stdio \
        -device virtio-rng-pci -kernel "$kernel" -initrd "$initrd" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
}

# KVM under nested virtualisation may hang or abort: probe it with a short
# boot once per host boot and remember the answer.
if [ "$accel" = auto ]; then
    accel=tcg
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        boot_id=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown)
        cache=$vmdir/accel
        key="$boot_id $kver $(qemu-system-x86_64 --version | head -n1)"
        if [ -f "$cache" ] && [ "$(sed -n 1p "$cache")" = "$key" ]; then
            accel=$(sed -n 2p "$cache")
        else
            echo "vm/run: probing KVM (once per host boot, up to 20 s)" >&2
            probe=$(mktemp -d "$vmdir/runs/probe.XXXXXX")
            printf 'exit 0\n' >"$probe/job.sh"
            mapfile -t cmd < <(qemu_base kvm)
            { timeout -k 2 20 "${cmd[@]}" -virtfs "local,path=$probe,mount_tag=vmjob,security_model=none" \
                -append "console=ttyS0 quiet panic=-1 vm.nonce=probe" </dev/null >/dev/null 2>&1; } 2>/dev/null || true
            if [ "$(cat "$probe/exit-code" 2>/dev/null)" = 0 ]; then
                accel=kvm
            fi
            rm -rf "$probe"
            printf '%s\n%s\n' "$key" "$accel" >"$cache"
            echo "vm/run: using $accel" >&2
        fi
    fi
fi

mapfile -t cmd < <(qemu_base "$accel")
cmd+=(-virtfs "local,path=$run/job,mount_tag=vmjob,security_model=none")
append="console=ttyS0 quiet panic=-1 ${VM_KERNEL_ARGS:-} vm.nonce=$nonce"
if [ -n "$results" ]; then
    cmd+=(-virtfs "local,path=$results,mount_tag=results,security_model=none")
    append+=" vm.results=1"
fi
if [ "$share_repo" = 1 ]; then
    cmd+=(-virtfs "local,path=$repo,mount_tag=repo,security_model=none,readonly=on,multidevs=remap")
    append+=" vm.repo=$repo"
fi
cmd+=(-append "$append")

# Console filter: everything goes to $console. Between the START and EXIT
# markers the console should be silent (the kernel only prints emergencies
# then): whatever appears there goes to stderr.
filter() {
    local line state=boot
    : >"$console"
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        printf '%s\n' "$line" >>"$console"
        case "$state:$line" in
            boot:"VMRUN:$nonce:START")
                state=cmd
                echo "$EPOCHREALTIME" >"$run/t-start" ;;
            cmd:"VMRUN:$nonce:EXIT:"*)
                state=finished
                echo "$EPOCHREALTIME" >"$run/t-end" ;;
            cmd:*) printf 'vm/console: %s\n' "$line" >&2 ;;
            *) [ "$verbose" = 0 ] || printf '%s\n' "$line" >&2 ;;
        esac
    done
}

# qemu and the filter run in the background, joined by a fifo, so that an
# interrupted run.sh can stop qemu (timeout(1) runs it in its own process
# group, out of reach of the terminal's Ctrl-C). COMMAND's output arrives in
# job/output over 9p; tail follows it until qemu is gone.
mkfifo "$run/console.fifo"
: >"$run/job/output"
filter <"$run/console.fifo" &
filter_pid=$!
t0=$EPOCHREALTIME
timeout -k 5 "$timeout_s" "${cmd[@]}" </dev/null >"$run/console.fifo" 2>"$run/qemu.err" &
qemu_pid=$!
tail -n +1 -s 0.2 -f --pid="$qemu_pid" "$run/job/output" &
tail_pid=$!
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=
wait "$filter_pid" || true
filter_pid=
wait "$tail_pid" || true
tail_pid=
t1=$EPOCHREALTIME

tail_console() {
    if [ -s "$console" ]; then
        echo "vm/run: --- last lines of $console ---" >&2
        tail -n 40 "$console" >&2
    else
        echo "vm/run: the console is empty; VM_KERNEL_ARGS='loglevel=7 earlyprintk=ttyS0' shows the kernel's messages" >&2
    fi
    if [ -s "$run/qemu.err" ]; then
        echo "vm/run: --- qemu stderr ---" >&2
        tail -n 20 "$run/qemu.err" >&2
    fi
}
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
    echo "vm/run: error: timed out after $timeout_s s (accel $accel)" >&2
    tail_console
    exit 124
fi
if [ ! -f "$run/job/exit-code" ]; then
    if [ -f "$run/t-start" ]; then
        echo "vm/run: error: the guest stopped before COMMAND finished (qemu exit $qemu_rc)" >&2
    else
        echo "vm/run: error: the guest failed to boot or to start COMMAND (qemu exit $qemu_rc)" >&2
    fi
    tail_console
    exit 125
fi
rc=$(cat "$run/job/exit-code")
case "$rc" in ''|*[!0-9]*) echo "vm/run: error: bad exit code record: $rc" >&2; tail_console; exit 125 ;; esac
if [ -f "$run/t-start" ] && [ -f "$run/t-end" ]; then
    echo "vm/run: exit $rc (accel $accel; boot $(secs "$t0" "$(cat "$run/t-start")") s, command $(secs "$(cat "$run/t-start")" "$(cat "$run/t-end")") s, total $(secs "$t0" "$t1") s)" >&2
else
    echo "vm/run: exit $rc (accel $accel; total $(secs "$t0" "$t1") s)" >&2
fi
exit "$rc"
