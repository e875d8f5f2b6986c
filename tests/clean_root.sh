#!/usr/bin/env bash
# The clean-root tier: proves the README's commands on a brand-new Debian 12
# root, as a new user would run them. It builds a minimal Debian 12 root
# with mmdebstrap, copies the checkout in (tracked and untracked files, not
# ignored ones: no build outputs), and runs inside it, in a chroot:
#
#   scripts/install-deps.sh     (every Debian package, venv and tool)
#   scripts/demo.sh             (the main job end to end, guest included)
#
# Carried into the root is what every machine of this kind has from the
# start, and nothing that could hide a missing install step:
#   - the Rust toolchain: ~/.rustup read-only, and a fresh CARGO_HOME with
#     only rustup's proxies (cargo, rustc, ...), no installed tools;
#   - Cargo's download cache (~/.cargo/registry), shared;
#   - the CA certificates the machine added to the system trust store
#     (/usr/local/share/ca-certificates), pip's global configuration
#     (/etc/pip.conf) and the SSL/PIP/CA environment variables, without
#     which the package registries cannot be reached from inside;
#   - /etc/resolv.conf, and /dev, /proc, /sys (for loop devices, KVM/TCG).
# Never carried: build outputs, venvs, apt state, installed packages.
#
#   tests/clean_root.sh [--keep]      (--keep leaves the root for a look)
#
# Output: every step's output as it runs, and a log in
# target/clean-root/run.log. Exit status: that of the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

keep=0
[ "${1:-}" = --keep ] && keep=1

log() { echo "clean-root: $*"; }
die() { echo "clean-root: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it builds a root file system and chroots into it)"
command -v mmdebstrap >/dev/null || die "mmdebstrap missing (scripts/install-deps.sh installs it)"
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
[ -d "$rustup_home/toolchains" ] || die "no Rust toolchain in $rustup_home"
rustup_bin=$(command -v rustup || true)
[ -n "$rustup_bin" ] || rustup_bin=$cargo_home/bin/rustup
[ -x "$rustup_bin" ] || die "rustup not found"

out=$repo/target/clean-root
mkdir -p "$out"
: >"$out/run.log"
exec > >(tee -a "$out/run.log") 2>&1

root=$(mktemp -d /var/tmp/luks-agent-clean-root.XXXXXX)
mounts=()
cleanup() {
    local rc=$?
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        umount -R -l "${mounts[$i]}" 2>/dev/null || true
    done
    # Loop devices the demo may have left on files inside the root.
    losetup -j "$root" 2>/dev/null | cut -d: -f1 | xargs -r -n1 losetup -d 2>/dev/null || true
    if [ "$keep" = 1 ]; then
        log "root kept at $root"
    else
        rm -rf --one-file-system "$root"
    fi
    exit "$rc"
}
trap cleanup EXIT

t0=$(date +%s)
log "building a minimal Debian 12 root in $root"
mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm "$root" \
    http://deb.debian.org/debian ||
    die "mmdebstrap failed"
log "root ready in $(($(date +%s) - t0)) s"

# What every machine of this kind has from the start (see the header).
cp /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
fi
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"

bind() { # SRC DST [ro]
    mkdir -p "$2"
    mount --rbind "$1" "$2"
    mount --make-rslave "$2"
    mounts+=("$2")
    if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}
bind /proc "$root/proc"
bind /sys "$root/sys"
bind /dev "$root/dev"
bind "$rustup_home" "$root/root/.rustup" ro
mkdir -p "$cargo_home/registry"
bind "$cargo_home/registry" "$root/root/.cargo/registry"
mkdir -p "$root/root/.cargo/bin"
cp "$rustup_bin" "$root/root/.cargo/bin/rustup"
for p in cargo rustc rustdoc cargo-clippy clippy-driver rustfmt cargo-fmt; do
    ln -s rustup "$root/root/.cargo/bin/$p"
done

# The checkout: tracked and untracked files, nothing git ignores.
dest=$root/root/luks-agent
mkdir -p "$dest"
git -C "$repo" ls-files -z --cached --others --exclude-standard |
    (cd "$repo" && tar --null -T - -cf - 2>/dev/null) | tar -xf - -C "$dest"
# Files deleted in the work tree but still tracked are simply absent.
log "checkout copied ($(du -sh "$dest" | cut -f1))"

# The environment a new user's shell has: a PATH, HOME, and the machine's
# package-client and CA settings.
envs=(HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    LANG=C.UTF-8 TERM=dumb RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo
    RUSTUP_AUTO_INSTALL=0)
while IFS='=' read -r k v; do
    case "$k" in
        PIP_*|SSL_CERT_*|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE) envs+=("$k=$v") ;;
    esac
done < <(env)

step() { # NAME COMMAND...
    local name=$1 t rc
    shift
    t=$(date +%s)
    log "=== $name"
    set +e
    chroot "$root" env -i "${envs[@]}" bash -c "cd /root/luks-agent && $*"
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        log "FAILED: $name (exit $rc after $(($(date +%s) - t)) s); its output is above and in $out/run.log"
        exit "$rc"
    fi
    log "$name: ok in $(($(date +%s) - t)) s"
}
step "scripts/install-deps.sh" scripts/install-deps.sh
step "scripts/demo.sh" scripts/demo.sh
log "passed: a fresh Debian 12 root ran install-deps and the demo in $(($(date +%s) - t0)) s"
