#!/usr/bin/env bash
# A private systemd-journald for one command, without systemd, for the
# journald log test: the command runs in a new mount namespace whose
# /run/systemd, /run/log and /var/log/journal are fresh tmpfs, so the
# journal's sockets and files are this run's alone and a journald of the
# host, if any, is neither seen nor touched.
#
#   journald.sh OUT -- COMMAND [ARGS...]
#
# SIGTERM and SIGINT are passed on to COMMAND. When it has exited, the
# entries its process logged are written to OUT in journald's export
# format (`journalctl -o export`, binary fields raw) and to OUT.json
# (`-o json`, one object per line). Exits with COMMAND's status.
set -euo pipefail
if [ "${LUKS_AGENT_JOURNALD_NS:-}" != 1 ]; then
    [ "$(id -u)" = 0 ] || { echo "journald.sh: needs root (a mount namespace)" >&2; exit 2; }
    exec env LUKS_AGENT_JOURNALD_NS=1 unshare --mount --propagation private -- "$0" "$@"
fi
out=${1:?usage: journald.sh OUT -- COMMAND...}
shift
[ "${1:-}" = -- ] && shift
[ $# -gt 0 ] || { echo "journald.sh: no command" >&2; exit 2; }
journald=
for j in /lib/systemd/systemd-journald /usr/lib/systemd/systemd-journald; do
    [ -x "$j" ] && journald=$j && break
done
[ -n "$journald" ] || { echo "journald.sh: systemd-journald not found (apt install systemd)" >&2; exit 2; }

# Creating /var/log/journal would make the host's journald persistent on
# its next start: cover it only where it exists (journald then writes
# there; otherwise to /run/log/journal).
for d in /run/systemd /run/log /var/log/journal; do
    if [ "$d" != /var/log/journal ]; then mkdir -p "$d"; fi
    if [ -d "$d" ]; then mount -t tmpfs -o mode=0755 tmpfs "$d"; fi
done
mkdir -p /run/systemd/journal
"$journald" &
jpid=$!
for _ in $(seq 200); do
    [ -S /run/systemd/journal/socket ] && break
    kill -0 "$jpid" 2>/dev/null || { echo "journald.sh: systemd-journald exited" >&2; exit 2; }
    sleep 0.05
done
[ -S /run/systemd/journal/socket ] || { echo "journald.sh: no journal socket after 10 s" >&2; exit 2; }

"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
# `wait` returns early (128+n) when a trapped signal arrives: wait until
# the command has really exited, then take the status bash kept for it.
while kill -0 "$child" 2>/dev/null; do
    wait "$child" || true
done
rc=0
wait "$child" || rc=$?
trap - TERM INT
journalctl --sync 2>/dev/null || sleep 0.5
journalctl --no-pager -o export "_PID=$child" >"$out"
journalctl --no-pager -o json "_PID=$child" >"$out.json"
kill "$jpid" 2>/dev/null || true
wait "$jpid" 2>/dev/null || true
exit "$rc"
