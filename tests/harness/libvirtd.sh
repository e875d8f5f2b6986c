#!/usr/bin/env bash
# A real libvirtd (and the virtlogd that starting domains needs) for the
# libvirt-mode tests, from Debian's packages, without systemd.
#
#   libvirtd.sh prepare                             user, group, directories only
#   libvirtd.sh start [--state DIR] [--owner PID]   start both (idempotent)
#   libvirtd.sh restart [--state DIR]               restart libvirtd only
#   libvirtd.sh stop [--state DIR]                  stop what start started
#   libvirtd.sh status [--state DIR]                exit 0 when it answers
#   libvirtd.sh watch [--state DIR]                 (internal: the watcher)
#
# The daemons run with their system paths (qemu:///system, /etc/libvirt,
# /run/libvirt), because that is what nova uses and what the tests check;
# the state directory (default target/test-libvirtd) only records which
# processes this script started, so `stop` never touches a libvirtd that
# was running before. With --owner, a watcher stops the daemons once that
# process (the test binary) exits, however it exits. Owners are recorded
# (STATE/owners), and the watcher stops the daemons only when none of them
# is alive, checked under the same lock that `start` takes: a test binary
# that starts right after the previous one exited keeps the daemons, instead
# of losing them to the previous binary's watcher.
set -euo pipefail
cd "$(dirname "$0")/../.."

cmd=${1:-}
shift || true
state=target/test-libvirtd
owner=
while [ $# -gt 0 ]; do
    case $1 in
    --state) state=$2; shift 2 ;;
    --owner) owner=$2; shift 2 ;;
    *) echo "libvirtd.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$state"
state=$(cd "$state" && pwd)
URI=qemu:///system

answers() { timeout 10 virsh -q -c "$URI" secret-list >/dev/null 2>&1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

owners_alive() {
    [ -f "$state/owners" ] || return 1
    local pid
    while read -r pid; do
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && return 0
    done <"$state/owners"
    return 1
}

stop_all() {
    stop_pid "$state/libvirtd.pid"
    stop_pid "$state/virtlogd.pid"
    rm -f "$state/watcher.pid" "$state/external" "$state/owners"
}

wait_answers() {
    for _ in $(seq 1 150); do
        answers && return 0
        sleep 0.2
    done
    echo "libvirtd.sh: libvirtd did not answer on $URI within 30 s; log: $state/libvirtd.log" >&2
    tail -n 20 "$state/libvirtd.log" >&2 || true
    return 1
}

prepare() {
    # Debian's QEMU driver refuses to start without this user and group.
    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    mkdir -p /var/log/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt
}

start_libvirtd() {
    prepare
    if ! alive "$state/virtlogd.pid" && [ ! -S /run/libvirt/virtlogd-sock ]; then
        virtlogd -d -p "$state/virtlogd.pid" 9>&-
    fi
    # /dev/kvm exists on these machines but nested virtualisation does not
    # work: QEMU's KVM probe hangs until libvirt gives up, and libvirt
    # probes again (about 30 s) on every domain definition. In a private
    # mount namespace /dev/kvm is /dev/null for libvirtd and its QEMUs, so
    # they probe TCG once. Everything else (/dev, /etc/libvirt) is shared.
    if [ -c /dev/kvm ] && [ "${LIBVIRTD_KEEP_KVM:-}" != 1 ]; then
        LIBVIRT_LOG_OUTPUTS="3:file:$state/libvirtd.log" unshare --mount --propagation slave \
            sh -c 'mount --bind /dev/null /dev/kvm && exec libvirtd -d -p "$1"' sh "$state/libvirtd.pid" 9>&-
    else
        LIBVIRT_LOG_OUTPUTS="3:file:$state/libvirtd.log" libvirtd -d -p "$state/libvirtd.pid" 9>&-
    fi
    wait_answers
}

stop_pid() {
    local f=$1
    alive "$f" || { rm -f "$f"; return 0; }
    local pid
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
}

case $cmd in
prepare)
    # The user, group and directories only: what a guest whose root is
    # this host's, read-only, needs to run its own libvirtd
    # (tests/vm/power_loss.sh).
    prepare
    ;;
start)
    exec 9>"$state/lock"
    flock 9
    if alive "$state/libvirtd.pid"; then
        wait_answers
    elif answers; then
        echo "libvirtd.sh: using the libvirtd already running on $URI (not ours: it will be left running)" >&2
        touch "$state/external"
    else
        rm -f "$state/external"
        start_libvirtd
    fi
    if [ -n "$owner" ] && [ ! -f "$state/external" ]; then
        echo "$owner" >>"$state/owners"
        if ! alive "$state/watcher.pid"; then
            # The watcher outlives this script; it stops the daemons when
            # the last owner exits, whether the tests passed, failed or
            # were killed.
            setsid "$PWD/tests/harness/libvirtd.sh" watch --state "$state" \
                </dev/null >/dev/null 2>&1 9>&- &
            echo $! >"$state/watcher.pid"
        fi
    fi
    ;;
restart)
    exec 9>"$state/lock"
    flock 9
    if [ -f "$state/external" ] || ! alive "$state/libvirtd.pid"; then
        echo "libvirtd.sh: no libvirtd started by this script to restart" >&2
        exit 1
    fi
    stop_pid "$state/libvirtd.pid"
    start_libvirtd
    ;;
stop)
    exec 9>"$state/lock"
    flock 9
    stop_all
    ;;
watch)
    while :; do
        while owners_alive; do sleep 0.5; done
        exec 9>"$state/lock"
        flock 9
        # A new owner may have come between the check and the lock.
        if owners_alive; then
            exec 9>&-
            continue
        fi
        stop_all
        exit 0
    done
    ;;
status)
    answers
    ;;
*)
    echo "usage: libvirtd.sh start|restart|stop|status|watch [--state DIR] [--owner PID]" >&2
    exit 2
    ;;
esac
