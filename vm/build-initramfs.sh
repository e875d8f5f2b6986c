#!/usr/bin/env bash
# Builds the guest initramfs for vm/run.sh:
#   vm/build-initramfs.sh [--force] [OUT]     (OUT: target/vm/initramfs.cpio.gz)
#
# The image holds only a static busybox, the kernel modules listed below
# (with their dependencies, resolved from the kernel's modules.dep) and /init.
# /init loads the modules, mounts the host's root file system read-only over
# 9p and runs the job that vm/run.sh prepared inside a chroot of it.
#
# Rebuilds only when the kernel version or this script changed (recorded in
# OUT.stamp); --force rebuilds anyway. VM_KERNEL=<version> picks a kernel
# other than the newest one in /boot. The kernel image to boot (see below)
# is recorded in OUT.stamp as boot=PATH, where vm/run.sh takes it from.
set -euo pipefail
cd "$(dirname "$0")/.."

# Modules the guest needs, in load order (dependencies are added from
# modules.dep). Missing or built-in ones are reported and skipped.
MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    netfs fscache 9pnet 9pnet_virtio 9p
    virtio_rng
    loop
    dm-mod dm-crypt dm-log-writes
    cryptd crypto_simd aesni-intel ecb xts
    af_alg algif_skcipher algif_hash
    # The other block ciphers, modes, IV generators and hashes LUKS headers
    # may name (tests/vm/cipher_interop.sh).
    serpent_generic twofish_generic camellia_generic cast5_generic cast6_generic
    des_generic blowfish_generic sm4_generic aria_generic essiv lrw ctr
    sha3_generic blake2b_generic rmd160 wp512 streebog_generic sm3_generic
)

log() { echo "vm/build-initramfs: $*" >&2; }
die() { echo "vm/build-initramfs: error: $*" >&2; exit 1; }

force=0
if [ "${1:-}" = --force ]; then force=1; shift; fi
out=${1:-target/vm/initramfs.cpio.gz}

kver=${VM_KERNEL:-}
if [ -z "$kver" ]; then
    for k in $(find /boot -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's|^vmlinuz-||' | sort -rV); do
        if [ -f "/lib/modules/$k/modules.dep" ]; then kver=$k; break; fi
    done
fi
[ -n "$kver" ] || die "no kernel with modules in /boot (run vm/install.sh)"
[ -f "/boot/vmlinuz-$kver" ] || die "/boot/vmlinuz-$kver missing"
[ -f "/lib/modules/$kver/modules.dep" ] || die "/lib/modules/$kver/modules.dep missing"
# The static busybox that vm/install.sh unpacks (never the system's
# /bin/busybox, which may be the dynamic one of package busybox).
busybox=${VM_BUSYBOX_DIR:-/var/cache/luks-agent-tests/busybox-static}/bin/busybox
[ -x "$busybox" ] || die "$busybox missing (run vm/install.sh)"
! readelf -l "$busybox" 2>/dev/null | grep -q INTERP \
    || die "$busybox is not static (run vm/install.sh)"

script_sum=$(sha256sum "$0" | cut -d' ' -f1)
stamp="kernel=$kver
script=$script_sum
busybox=$(sha256sum "$busybox" | cut -d' ' -f1)"
if [ "$force" = 0 ] && [ -f "$out" ] && [ -f "$out.stamp" ] \
    && [ "$(head -n3 "$out.stamp")" = "$stamp" ]; then
    boot=$(sed -n 's/^boot=//p' "$out.stamp")
    if [ -n "$boot" ] && [ -f "$boot" ]; then exit 0; fi
fi

log "building $out for kernel $kver"
mkdir -p "$(dirname "$out")"
stage=$(mktemp -d "$(dirname "$out")/initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,mnt,job,tmp,lib/modules}
cp "$busybox" "$stage/bin/busybox"
mknod -m 600 "$stage/dev/console" c 5 1
mknod -m 666 "$stage/dev/null" c 1 3

# Resolve the load order with modprobe's view of modules.dep; copy each
# module once, decompressed, as lib/modules/NAME.ko.
declare -A seen=()
order=()
for m in "${MODULES[@]}"; do
    if ! deps=$(modprobe -S "$kver" --show-depends "$m" 2>/dev/null); then
        log "module $m: not found in $kver, skipped"
        continue
    fi
    while read -r kind path _; do
        case "$kind" in
            builtin) [ -n "${seen[b:$path]:-}" ] || log "module $path: built in"; seen[b:$path]=1; continue ;;
            insmod) ;;
            *) continue ;;
        esac
        name=$(basename "$path"); name=${name%%.ko*}
        [ -z "${seen[$name]:-}" ] || continue
        seen[$name]=1
        case "$path" in
            *.ko) cp "$path" "$stage/lib/modules/$name.ko" ;;
            *.ko.xz) xz -dc "$path" >"$stage/lib/modules/$name.ko" ;;
            *.ko.zst) zstd -qdc "$path" >"$stage/lib/modules/$name.ko" ;;
            *.ko.gz) gzip -dc "$path" >"$stage/lib/modules/$name.ko" ;;
            *) die "module $name: unknown format $path" ;;
        esac
        order+=("$name")
    done <<<"$deps"
done
printf '%s\n' "${order[@]}" >"$stage/modules.order"

cat >"$stage/init" <<'INIT'
#!/bin/busybox sh
# Guest init: load modules, mount the host root (read-only 9p) and the job
# directory (read-write 9p), run /job/job.sh in a chroot of the host root
# with its output in /job/output, record its exit code in /job/exit-code
# and power off. Console lines starting with "vm-init:" are ours;
# VMRUN:<nonce>:START / VMRUN:<nonce>:EXIT:<code> mark the command's start
# and end for the host.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1
t_init=$(cut -d' ' -f1 /proc/uptime)

nonce=none
results=0
repo=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vm.nonce=*) nonce=${arg#vm.nonce=} ;;
        vm.results=1) results=1 ;;
        vm.repo=*) repo=${arg#vm.repo=} ;;
    esac
done

fail() {
    echo "vm-init: FATAL: $*"
    echo "VMRUN:$nonce:FAIL"
    sync
    poweroff -f
    sleep 10
}

missing=""
while read -r m; do
    if ! err=$(insmod "/lib/modules/$m.ko" 2>&1); then
        case "$err" in
            *"File exists"*) ;;
            *) echo "vm-init: insmod $m failed: $err"; missing="$missing $m" ;;
        esac
    fi
done </modules.order
echo "vm-init: kernel $(uname -r); init at ${t_init} s, modules loaded at $(cut -d' ' -f1 /proc/uptime) s; failed:${missing:- none}"

p9="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$p9,ro,cache=loose" hostroot /mnt || fail "cannot mount host root (hostroot)"
mount -t 9p -o "$p9" vmjob /job || fail "cannot mount job directory (vmjob)"
mount -t devtmpfs devtmpfs /mnt/dev || fail "cannot mount /mnt/dev"
mkdir -p /mnt/dev/pts /mnt/dev/shm
# What udev or systemd would otherwise provide (bash's <(...) needs /dev/fd).
ln -sfn /proc/self/fd /mnt/dev/fd
ln -sfn /proc/self/fd/0 /mnt/dev/stdin
ln -sfn /proc/self/fd/1 /mnt/dev/stdout
ln -sfn /proc/self/fd/2 /mnt/dev/stderr
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /mnt/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /mnt/dev/shm
mount -t proc proc /mnt/proc || fail "cannot mount /mnt/proc"
mount -t sysfs sysfs /mnt/sys || fail "cannot mount /mnt/sys"
mount -t tmpfs -o mode=1777 tmpfs /mnt/tmp || fail "cannot mount /mnt/tmp"
mount -t tmpfs -o mode=755 tmpfs /mnt/run || fail "cannot mount /mnt/run"
mkdir -p /mnt/run/lock /mnt/run/vm
# A checkout under the host's /tmp (hidden by the guest's tmpfs) comes as
# its own read-only share, mounted at the same path.
if [ -n "$repo" ]; then
    mkdir -p "/mnt$repo"
    mount -t 9p -o "$p9,ro,cache=loose" repo "/mnt$repo" || fail "cannot mount the checkout (repo)"
fi
if [ "$results" = 1 ]; then
    mkdir -p /mnt/run/vm-results
    mount -t 9p -o "$p9" results /mnt/run/vm-results || fail "cannot mount results directory"
fi
cp /job/job.sh /mnt/run/vm/job.sh || fail "no job script"
hostname vm

echo "vm-init: command starts at $(cut -d' ' -f1 /proc/uptime) s"
echo "VMRUN:$nonce:START"
# The command's output goes to a file on the job share, which the host
# follows: far faster than the emulated serial port, and binary-safe.
out=/job/output
: >"$out" 2>/dev/null || out=/dev/console
chroot /mnt /bin/sh /run/vm/job.sh </dev/null >>"$out" 2>&1
rc=$?
sync
echo "$rc" >/job/exit-code
sync
echo "VMRUN:$nonce:EXIT:$rc"
poweroff -f
sleep 10
INIT
chmod 755 "$stage/init"

# The kernel to boot. Debian's bzImage is XZ-compressed, and decompressing
# it takes about 4 s under TCG at every boot: when the kernel supports PVH
# entry (CONFIG_PVH), boot the decompressed ELF vmlinux instead, which QEMU
# starts directly. Otherwise fall back to /boot/vmlinuz-VERSION.
boot=/boot/vmlinuz-$kver
if grep -q '^CONFIG_PVH=y' "/boot/config-$kver" 2>/dev/null; then
    vmlinux=$(dirname "$out")/vmlinux-$kver
    tmp_k=$(mktemp "$vmlinux.XXXXXX")
    for fmt in xz zstd gzip; do
        case $fmt in
            xz) magic=$'\xfd7zXZ'; dec=(xz -dc --single-stream) ;;
            zstd) magic=$'\x28\xb5\x2f\xfd'; dec=(zstd -qdc) ;;
            gzip) magic=$'\x1f\x8b\x08'; dec=(gzip -dc) ;;
        esac
        for pos in $(LC_ALL=C grep -abo "$magic" "/boot/vmlinuz-$kver" | cut -d: -f1 | head -n 3); do
            tail -c "+$((pos + 1))" "/boot/vmlinuz-$kver" | "${dec[@]}" >"$tmp_k" 2>/dev/null || true
            if [ "$(head -c 4 "$tmp_k" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                chmod 644 "$tmp_k"
                mv -f "$tmp_k" "$vmlinux"
                boot=$vmlinux
                break 2
            fi
        done
    done
    rm -f "$tmp_k"
    [ "$boot" != "/boot/vmlinuz-$kver" ] || log "cannot extract vmlinux; booting the compressed kernel"
fi

tmp_out=$(mktemp "$out.XXXXXX")
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 >"$tmp_out"
chmod 644 "$tmp_out"
mv -f "$tmp_out" "$out"
printf '%s\nboot=%s\n' "$stamp" "$(realpath "$boot")" >"$out.stamp"
log "done: $(du -h "$out" | cut -f1), boots $boot; ${#order[@]} modules: ${order[*]}"
