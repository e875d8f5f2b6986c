#!/usr/bin/env bash
# Package tier: build the .deb from this checkout, install it with dpkg on
# this machine, start the installed daemon exactly as its unit file says
# (ExecStart, both with its own socket and socket-activated as the socket
# unit defines), check /healthz answers, then purge the package again.
# Needs root; uses the real paths (/usr/bin, /etc/luks-agent, /run/luks-agent).
set -euo pipefail
cd "$(dirname "$0")/../.."

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok - $*"; }
[ "$(id -u)" -eq 0 ] || fail "the package tier needs root (dpkg -i)"

sock=/run/luks-agent/agent.sock
daemon_pid=
cleanup() {
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    dpkg --purge luks-agent >/dev/null 2>&1 || true
}
trap cleanup EXIT

deb=$(packaging/deb/build.sh --no-build | tail -n1)
[ -f "$deb" ] || fail "no package built"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
contents=$(dpkg-deb --contents "$deb" | awk '{print $6}')
for f in ./usr/bin/luks-agent ./lib/systemd/system/luks-agent.service \
    ./lib/systemd/system/luks-agent.socket ./lib/udev/rules.d/61-luks-agent.rules \
    ./etc/luks-agent/agent.toml ./usr/share/man/man1/luks-agent.1.gz \
    ./usr/share/man/man1/luks-agent-attach.1.gz \
    ./usr/share/bash-completion/completions/luks-agent ./usr/share/doc/luks-agent/copyright \
    ./usr/lib/python3/dist-packages/luks_agent_os_brick/encryptors.py \
    ./usr/lib/python3/dist-packages/luks_agent_os_brick/client.py ./etc/luks-agent/os-brick.conf; do
    grep -qx -- "$f" <<<"$contents" || fail "package lacks $f"
done
dpkg-deb --field "$deb" Depends | grep -q libc6 || fail "Depends lacks libc6: $(dpkg-deb --field "$deb" Depends)"
# libvirt is loaded at run time by the libvirt mode only: a dm-only host
# must not need it.
! dpkg-deb --field "$deb" Depends | grep -q libvirt || fail "Depends names libvirt: $(dpkg-deb --field "$deb" Depends)"
dpkg-deb --field "$deb" Suggests | grep -q libvirt0 || fail "Suggests lacks libvirt0"
pass "built $(basename "$deb"): binary, units, udev rules, config, man pages, completions"

spec=packaging/rpm/luks-agent.spec
[ "$(rpmspec -q --srpm --qf '%{version}' "$spec")" = "$version" ] || fail "$spec does not parse or its Version is not $version"
for f in luks-agent.service luks-agent.socket 61-luks-agent.rules agent.toml; do
    grep -q "$f" "$spec" || fail "$spec does not install $f"
done
pass "RPM spec parses (rpmspec), version $version, installs the same units, rules and config"

dpkg --purge luks-agent >/dev/null 2>&1 || true
dpkg -i "$deb" >/dev/null || fail "dpkg -i failed"
[ "$(/usr/bin/luks-agent --version)" = "luks-agent $version" ] || fail "installed binary: $(/usr/bin/luks-agent --version)"
getent group luks-agent >/dev/null || fail "postinst did not create the luks-agent group"
[ "$(stat -c %a /etc/luks-agent/agent.toml)" = 600 ] || fail "agent.toml is not 0600"
zcat /usr/share/man/man1/luks-agent-attach.1.gz | grep -qF -- '\-\-volume\-id' || fail "man page lacks attach options"
# The plug-in's client and settings import with Debian's python3 alone.
/usr/bin/python3 -c 'import luks_agent_os_brick.client, luks_agent_os_brick.settings as s; assert s.load("/etc/luks-agent/os-brick.conf").mode == "dm"' \
    || fail "the installed os-brick plug-in does not import with /usr/bin/python3"
pass "dpkg -i installed luks-agent $version (group, 0600 config, man pages, os-brick plug-in)"

if systemd-analyze verify --man=no /lib/systemd/system/luks-agent.service /lib/systemd/system/luks-agent.socket 2>&1 |
    grep -v -e 'Failed to connect' -e 'System has not been booted' | grep .; then
    fail "systemd-analyze verify complains about the units"
fi
pass "systemd-analyze verify accepts both units"

exec_start=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/luks-agent.service)
[ -n "$exec_start" ] || fail "no ExecStart in the unit"
listen=$(sed -n 's/^ListenStream=//p' /lib/systemd/system/luks-agent.socket)
[ "$listen" = "$sock" ] || fail "socket unit listens on $listen, not $sock"

wait_healthy() { # -> 0 when /healthz answers 200 within 10 s
    for _ in $(seq 100); do
        if curl -sf --max-time 2 --unix-socket "$sock" http://localhost/healthz >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    return 1
}
stop_daemon() {
    kill -TERM "$daemon_pid"
    local rc=0
    wait "$daemon_pid" || rc=$?
    daemon_pid=
    [ "$rc" -eq 0 ] || fail "daemon exited $rc on SIGTERM"
}

# As the service starts without socket activation: the daemon makes the socket.
mkdir -p /run/luks-agent   # RuntimeDirectory=
rm -f "$sock"
# shellcheck disable=SC2086 # ExecStart is a command line, split as systemd does
$exec_start >target/debian/daemon.log 2>&1 &
daemon_pid=$!
wait_healthy || { cat target/debian/daemon.log >&2; fail "installed daemon did not answer /healthz"; }
[ "$(stat -c %a "$sock")" = 660 ] || fail "socket mode $(stat -c %a "$sock"), want 660"
stop_daemon
pass "ExecStart from the unit starts the installed daemon; /healthz answers; SIGTERM exits 0"

# As systemd starts it from the socket unit: the socket is inherited (LISTEN_FDS).
rm -f "$sock"
# shellcheck disable=SC2086
systemd-socket-activate -l "$sock" $exec_start >target/debian/daemon-activated.log 2>&1 &
daemon_pid=$!
wait_healthy || { cat target/debian/daemon-activated.log >&2; fail "socket-activated daemon did not answer /healthz"; }
stop_daemon
pass "socket-activated (LISTEN_FDS) daemon answers /healthz"

dpkg --purge luks-agent >/dev/null || fail "dpkg --purge failed"
[ ! -e /usr/bin/luks-agent ] || fail "purge left /usr/bin/luks-agent"
[ ! -e /etc/luks-agent ] || fail "purge left /etc/luks-agent"
pass "dpkg --purge removes the package (keys under /var/lib/luks-agent are kept)"
