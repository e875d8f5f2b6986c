#!/usr/bin/env bash
# Installs what the test suite needs on Debian 12, idempotently: the
# reference tools the tests compare against (cryptsetup, QEMU's LUKS
# driver), filesystem and volume tools whose signatures the format guard
# must see, a venv with Keystone and Barbican, a venv with os-brick, the
# guest kernel and QEMU for the VM tier, libvirt (daemon, QEMU driver,
# clients, headers) for the libvirt-mode tests, the packaging tools, and
# cargo-fuzz. Safe to run again; installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cryptsetup >/dev/null 2>&1 || need_apt+=(cryptsetup-bin)
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v losetup >/dev/null 2>&1 || need_apt+=(mount)
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# Build dependencies of the devicemapper crate (bindgen over libdevmapper's
# headers); the binary does not link libdevmapper.
pkg-config --exists 'devmapper >= 1.02.151' 2>/dev/null || need_apt+=(libdevmapper-dev pkg-config)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
# Tools that make the signatures the first-use format guard must detect.
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v mkfs.xfs >/dev/null 2>&1 || need_apt+=(xfsprogs)
command -v mkfs.btrfs >/dev/null 2>&1 || need_apt+=(btrfs-progs)
command -v mkfs.vfat >/dev/null 2>&1 || need_apt+=(dosfstools)
command -v sfdisk >/dev/null 2>&1 || need_apt+=(fdisk)
command -v mdadm >/dev/null 2>&1 || need_apt+=(mdadm)
command -v pvcreate >/dev/null 2>&1 || need_apt+=(lvm2)
command -v wipefs >/dev/null 2>&1 || need_apt+=(util-linux)
# The VM tier kills the agent at exact system calls and injects faults
# with the host's strace (the guest runs host binaries).
command -v strace >/dev/null 2>&1 || need_apt+=(strace)
command -v dmsetup >/dev/null 2>&1 || need_apt+=(dmsetup)
# The package tier: build the .deb, check the units and the RPM spec, and
# start the installed daemon as its units would.
command -v dpkg-shlibdeps >/dev/null 2>&1 || need_apt+=(dpkg-dev)
command -v rpmspec >/dev/null 2>&1 || need_apt+=(rpm)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v systemd-socket-activate >/dev/null 2>&1 || need_apt+=(systemd)
# libvirt mode: the agent loads libvirt.so.0 at run time; its tests
# inspect libvirt through the virt crate (built against libvirt-dev) and
# run a real libvirtd (with the QEMU driver and virtlogd) and virsh. QEMU
# itself comes from vm/install.sh below.
pkg-config --exists libvirt 2>/dev/null || need_apt+=(libvirt-dev pkg-config)
command -v libvirtd >/dev/null 2>&1 || need_apt+=(libvirt-daemon)
dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1 || need_apt+=(libvirt-daemon-driver-qemu)
command -v virsh >/dev/null 2>&1 || need_apt+=(libvirt-clients)

if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: need root to install: ${need_apt[*]}" >&2
        exit 1
    fi
    echo "install-deps: installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! cargo fuzz --help >/dev/null 2>&1; then
    echo "install-deps: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

# Keystone and Barbican (pinned) for the key manager tests; idempotent.
python3 tests/harness/openstack.py install

# os-brick (pinned), the system we replace, driven in the VM tier and the
# benchmark; idempotent, no network when already installed.
tests/harness/osbrick.sh install

# The guest kernel, QEMU and busybox for the VM tier (real dm-crypt).
vm/install.sh

echo "install-deps: cryptsetup $(cryptsetup --version | awk '{print $2}'), $(qemu-img --version | head -n1)"
