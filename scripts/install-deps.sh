#!/usr/bin/env bash
# Installs what the demo and the test suite need on Debian 12, idempotently:
# the Debian packages listed below (each with the reason it is here), then
# cargo-fuzz, a venv with Keystone and Barbican, venvs with os-brick, with
# nova and with cursive, and the VM tier's kernel, QEMU and busybox (vm/install.sh).
# Safe to run again; installs only what is missing.
#
# A package counts as present only when dpkg-query reports it installed:
# files or commands that look like a package's are not asked about, since a
# look-alike (libclang-cpp14's libclang-cpp.so.14 is not libclang.so) once
# hid a missing package on every fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# name            reason
PACKAGES="
gcc               C compiler and linker driver for cargo and the -sys crates
g++               C++ compiler (cc crate users among the dependencies)
libc6-dev         C library headers and start files the linker needs
binutils          readelf: vm/install.sh checks that busybox is static
pkg-config        how devicemapper-sys and virt find their C libraries
libdevmapper-dev  devicemapper-sys runs bindgen over libdevmapper's headers
libclang-dev      bindgen loads libclang.so (libclang-cpp is not enough)
libvirt-dev       the virt crate builds against libvirt; libvirt.so.0 at run time
python3           test harness, benchmark, os-brick and the nova plug-in tests
python3-venv      venvs for Keystone, Barbican, os-brick, nova and cursive
python3-dev       headers to build libvirt-python in the nova venv
ca-certificates   TLS to the package registries (pip, cargo)
cryptsetup-bin    the reference LUKS implementation, oracle of the interop tests
qemu-utils        qemu-img and qemu-io, QEMU's LUKS driver as a second oracle
mount             losetup for the loop devices of the host tier
util-linux        wipefs, blkid, blkdiscard, flock, setsid
openssl           test certificates (TLS tests), signed images (image signature tests)
e2fsprogs         mkfs.ext4: a signature the format guard must refuse
xfsprogs          mkfs.xfs: a signature the format guard must refuse
btrfs-progs       mkfs.btrfs: a signature the format guard must refuse
dosfstools        mkfs.vfat: a signature the format guard must refuse
fdisk             sfdisk: partition tables the format guard must refuse
mdadm             MD superblocks the format guard must refuse
lvm2              LVM physical volumes the format guard must refuse
strace            the VM tier kills the agent at exact system calls
dmsetup           the VM tier compares our tables with what the kernel holds
kmod              modprobe resolves the guest's module dependencies
cpio              packs the guest's initramfs
gzip              compresses the guest's initramfs
xz-utils          decompresses the kernel and xz modules for the guest
zstd              decompresses zstd modules for the guest
procps            ps and pkill in the test scripts
dpkg-dev          the package tier builds the .deb (dpkg-shlibdeps)
rpm               the package tier checks the RPM spec (rpmspec)
curl              the package tier asks the installed agent over its socket
systemd           systemd-analyze and systemd-socket-activate for the units
libvirt-daemon    a real libvirtd for the libvirt-mode tests
libvirt-daemon-driver-qemu  libvirtd's QEMU driver (secrets, domains)
libvirt-clients   virsh, to check libvirt's view in the tests
mmdebstrap        the clean-root tier builds a fresh Debian 12 root
mariadb-server    the test Keystone and Barbican run on MariaDB, as production does
"

installed() { # PKG -> success when dpkg reports the package installed
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

missing=()
while read -r pkg _; do
    [ -n "$pkg" ] || continue
    installed "$pkg" || missing+=("$pkg")
done <<<"$PACKAGES"

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: need root to install: ${missing[*]}" >&2
        exit 1
    fi
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    # --no-remove: fail rather than replace something already installed
    # (qemu-utils may come from bookworm-backports).
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends --no-remove \
        "${missing[@]}" >/dev/null
    still=()
    for pkg in "${missing[@]}"; do installed "$pkg" || still+=("$pkg"); done
    if [ ${#still[@]} -gt 0 ]; then
        echo "install-deps: apt-get finished but these are not installed: ${still[*]}" >&2
        exit 1
    fi
fi

if ! cargo fuzz --help >/dev/null 2>&1; then
    echo "install-deps: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

# Keystone and Barbican (pinned) for the key manager tests; idempotent.
python3 tests/harness/openstack.py install

# os-brick (pinned), the system we replace, driven in the VM tier and the
# benchmark; nova (pinned), whose libvirt driver drives the os-brick
# plug-in in its tests; cursive (pinned), nova's image signature verifier,
# the reference of the image signature tests and benchmark. Idempotent, no
# network when already installed.
tests/harness/pyvenv.sh osbrick install
tests/harness/pyvenv.sh nova install
tests/harness/pyvenv.sh cursive install

# The guest kernel, QEMU and busybox for the VM tier (real dm-crypt).
vm/install.sh

echo "install-deps: cryptsetup $(cryptsetup --version | awk '{print $2}'), $(qemu-img --version | head -n1)"
