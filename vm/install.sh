#!/usr/bin/env bash
# Installs what the VM test tier needs on Debian 12, idempotently and only
# what is missing:
#   linux-image-amd64  - the guest kernel and its modules (dm-crypt, 9p, ...)
#   qemu-system-x86    - the emulator that boots it
#   busybox-static     - the guest's init and tools inside the initramfs:
#                        its .deb is downloaded and unpacked into
#                        /var/cache/luks-agent-tests/busybox-static, never
#                        installed, so a dynamic busybox that the system
#                        may carry (package busybox, which conflicts with
#                        busybox-static) cannot take its place
# then checks that qemu-img and qemu-io (used by the host tier) still work.
#
# qemu-system-x86 must come from the same QEMU release as an installed
# qemu-utils: Debian's packages forbid mixing them, and apt would otherwise
# remove qemu-utils. When qemu-utils came from bookworm-backports, the
# matching qemu-system-x86 is installed from there too, through a temporary
# apt configuration that leaves the system's sources untouched; apt runs
# with --no-remove, so it fails rather than remove anything.
set -euo pipefail

log() { echo "vm/install: $*"; }
die() { echo "vm/install: error: $*" >&2; exit 1; }

installed() { # PKG -> success when the package is installed
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}
version_of() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

need=()
installed linux-image-amd64 || need+=(linux-image-amd64)
busybox_dir=${VM_BUSYBOX_DIR:-/var/cache/luks-agent-tests/busybox-static}
busybox=$busybox_dir/bin/busybox
is_static() { # FILE -> success when FILE is an ELF executable without an interpreter
    [ -x "$1" ] && readelf -h "$1" >/dev/null 2>&1 && ! readelf -l "$1" 2>/dev/null | grep -q INTERP
}
need_busybox=0
is_static "$busybox" || need_busybox=1
need_qemu=0
installed qemu-system-x86 || need_qemu=1

if [ ${#need[@]} -gt 0 ] || [ "$need_qemu" = 1 ] || [ "$need_busybox" = 1 ]; then
    [ "$(id -u)" -eq 0 ] || die "need root to install: ${need[*]} $([ "$need_qemu" = 1 ] && echo qemu-system-x86) $([ "$need_busybox" = 1 ] && echo busybox-static)"
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    apt-get -o DPkg::Lock::Timeout=600 update -qq

    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends --no-remove "${need[@]}" >/dev/null
    fi

    if [ "$need_busybox" = 1 ]; then
        log "unpacking busybox-static into $busybox_dir"
        dl=$(mktemp -d)
        (cd "$dl" && apt-get -o APT::Sandbox::User=root download -qq busybox-static) \
            || die "apt-get download busybox-static failed"
        rm -rf "$busybox_dir.new"
        mkdir -p "$busybox_dir.new"
        dpkg-deb -x "$dl"/busybox-static_*.deb "$busybox_dir.new/root"
        mkdir -p "$busybox_dir.new/bin"
        found=
        for c in bin/busybox usr/bin/busybox; do
            if [ -f "$busybox_dir.new/root/$c" ]; then found=$busybox_dir.new/root/$c; break; fi
        done
        [ -n "$found" ] || die "busybox-static's .deb holds no bin/busybox"
        mv "$found" "$busybox_dir.new/bin/busybox"
        rm -rf "$busybox_dir.new/root" "$dl"
        rm -rf "$busybox_dir"
        mv "$busybox_dir.new" "$busybox_dir"
    fi

    if [ "$need_qemu" = 1 ]; then
        utils_ver=
        if installed qemu-utils; then utils_ver=$(version_of qemu-utils); fi
        cand=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        if [ -z "$utils_ver" ] || [ "$utils_ver" = "$cand" ]; then
            log "installing qemu-system-x86 $cand"
            apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends --no-remove qemu-system-x86 >/dev/null
        else
            # qemu-utils is another release (e.g. from backports): install
            # the very same version of the emulator from the backports suite.
            # shellcheck disable=SC1091
            . /etc/os-release
            suite="${VERSION_CODENAME:?}-backports"
            case "$utils_ver" in
                *bpo*) ;;
                *) die "qemu-utils $utils_ver is not from $suite and qemu-system-x86 candidate is $cand; install a matching qemu-system-x86 by hand" ;;
            esac
            tmp=$(mktemp -d)
            trap 'rm -rf "$tmp"' EXIT
            mkdir -p "$tmp/lists/partial" "$tmp/archives/partial"
            {
                echo "deb http://deb.debian.org/debian $VERSION_CODENAME main"
                echo "deb http://deb.debian.org/debian $VERSION_CODENAME-updates main"
                echo "deb http://deb.debian.org/debian-security $VERSION_CODENAME-security main"
                echo "deb http://deb.debian.org/debian $suite main"
            } >"$tmp/sources.list"
            apt_tmp=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o Dir::Etc::sourceparts=-
                -o "Dir::State::lists=$tmp/lists" -o "Dir::Cache::archives=$tmp/archives"
                -o APT::Sandbox::User=root)
            log "qemu-utils is $utils_ver: installing the same qemu-system-x86 from $suite"
            apt-get "${apt_tmp[@]}" update -qq
            apt-get -o DPkg::Lock::Timeout=600 "${apt_tmp[@]}" install -y -qq --no-install-recommends --no-remove \
                -t "$suite" "qemu-system-x86=$utils_ver" "qemu-system-common=$utils_ver" \
                "qemu-system-data=$utils_ver" >/dev/null
        fi
    fi
fi

# Checks: everything the harness and the host tier use must work now.
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found"
qemu-system-x86_64 --version >/dev/null || die "qemu-system-x86_64 does not run"
command -v qemu-img >/dev/null || die "qemu-img not found (reinstall qemu-utils)"
command -v qemu-io >/dev/null || die "qemu-io not found (reinstall qemu-utils)"
qemu-img --version >/dev/null || die "qemu-img does not run"
qemu-io --version >/dev/null || die "qemu-io does not run"
is_static "$busybox" || die "$busybox is not a static executable"
kver=$(find /boot -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's|^vmlinuz-||' | sort -V | tail -n1)
[ -n "$kver" ] || die "no kernel in /boot"
[ -d "/lib/modules/$kver/kernel" ] || die "no modules for kernel $kver"

log "ok: kernel $kver; $(qemu-system-x86_64 --version | head -n1); $(qemu-img --version | head -n1)"
