#!/usr/bin/env bash
# End-to-end demo of what luks-agent does today, on a real loop device:
# format LUKS2 from a key manager style key (hex of 32 random bytes), show
# the header, prove cryptsetup opens it, rotate the passphrase, clean up.
# Attach/detach (dm-crypt mapping, libvirt secrets) is not implemented yet;
# this demo says so at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run as root (it creates a loop device)" >&2
    exit 1
fi
scripts/install-deps.sh >/dev/null
cargo build --release --locked --quiet
bin=target/release/luks-agent

work=$(mktemp -d /run/luks-agent-demo.XXXXXX)
chmod 700 "$work"
loop=""
cleanup() {
    [ -n "$loop" ] && losetup -d "$loop" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 64M "$work/volume.img"
loop=$(losetup --find --show "$work/volume.img")
echo "demo: volume on $loop"

# A key manager hands out random keys; os-brick's passphrase is their hex.
umask 077
head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$work/key.hex"
head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n' >"$work/new-key.hex"

start=$(date +%s%N)
"$bin" luks format --type luks2 --kdf-policy high-entropy \
    --key-id 6f1c1f1e-0000-4000-8000-000000000001 --key-file "$work/key.hex" "$loop"
"$bin" luks test-passphrase --key-file "$work/key.hex" "$loop"
end=$(date +%s%N)
echo "demo: format + unlock took $(((end - start) / 1000000)) ms (two processes)"

"$bin" luks dump "$loop" | sed -n '1,25p'

echo "demo: cryptsetup (the reference implementation) opens our header:"
cryptsetup open --test-passphrase --key-file "$work/key.hex" "$loop" && echo "  cryptsetup: passphrase accepted"

echo "demo: rotating the passphrase (add new keyslot, verify, remove old)"
"$bin" luks change-key --key-file "$work/key.hex" --new-key-file "$work/new-key.hex" \
    --kdf-policy high-entropy "$loop"
if "$bin" luks test-passphrase --key-file "$work/key.hex" "$loop" 2>/dev/null; then
    echo "demo: old passphrase still works after rotation" >&2
    exit 1
fi
cryptsetup open --test-passphrase --key-file "$work/new-key.hex" "$loop" && echo "  cryptsetup: new passphrase accepted, old one refused"

echo "demo: done. Not yet implemented: attach/detach with dm-crypt and libvirt secrets."
