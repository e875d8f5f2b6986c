#!/usr/bin/env bash
# Regenerates the seed corpora in fuzz/corpus/:
#
#   header_parse/  the first 64 KiB of real LUKS1/LUKS2 devices formatted
#                  by `luks-agent luks format` and, when installed, by
#                  `cryptsetup luksFormat` (pbkdf2 with 1000 iterations, or
#                  a tiny Argon2id, so that this runs in seconds);
#   unlock/        one-byte inputs selecting each reference image of the
#                  unlock target, with and without LUKS2 checksum repair;
#   probe/         the head and tail of devices holding the signatures the
#                  first-use guard knows (file systems, swap, partition
#                  tables, LVM, LUKS), made by the tools that write them,
#                  as far as they are installed;
#   image_certificate/
#                  openssl-made certificates (RSA, RSA signed with PSS,
#                  P-256/384/521, DSA of FIPS and other sizes), each with an
#                  image signature over the target's message by SHA-256,
#                  and a leaf certificate followed by its CA's.
#
# Usage: fuzz/gen_corpus.sh   (from anywhere inside the repository)
# Keys and salts are random, so every run produces different bytes; commit
# the result only when the seeds need to change. The corpus stays well under
# 1 MiB for header_parse (at most 8 files of 64 KiB); probe seeds keep only
# the non-zero span of a device's first 68 KiB and last 128 KiB.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=fuzz/corpus/header_parse
unlock_out=fuzz/corpus/unlock
probe_out=fuzz/corpus/probe
cert_out=fuzz/corpus/image_certificate
head_bytes=65536

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
key=$work/passphrase
printf '%s' 'fuzz-passphrase' >"$key"

mkdir -p "$out" "$unlock_out" "$probe_out" "$cert_out"
rm -f "$out"/* "$unlock_out"/* "$probe_out"/* "$cert_out"/*

# Creates a zeroed image of $2 MiB at $1.
image() {
    rm -f "$1"
    truncate -s "$2M" "$1"
}

# Saves the first 64 KiB of image $1 as seed $2.
save() {
    head -c "$head_bytes" "$1" >"$out/$2"
    echo "seed $out/$2"
}

echo "building luks-agent"
cargo build --quiet --bin luks-agent
agent=target/debug/luks-agent

img=$work/img
image "$img" 3
"$agent" luks format --type luks1 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file "$key" "$img"
save "$img" agent-luks1-pbkdf2

image "$img" 2
"$agent" luks format --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --luks2-metadata-size 16384 --luks2-keyslots-size 262144 \
    --key-file "$key" "$img"
save "$img" agent-luks2-pbkdf2

image "$img" 2
"$agent" luks format --type luks2 --pbkdf argon2id --pbkdf-force-iterations 4 \
    --pbkdf-memory 64 --pbkdf-parallel 1 --key-size 512 --sector-size 4096 \
    --luks2-metadata-size 16384 --luks2-keyslots-size 524288 \
    --key-id 0f4e2c1a-fuzz-key-id --key-file "$key" "$img"
save "$img" agent-luks2-argon2id-token

# Other ciphers, IV generators and hashes than AES-XTS with SHA-256.
image "$img" 3
"$agent" luks format --type luks1 --cipher serpent-cbc-essiv:sha256 --key-size 256 \
    --hash whirlpool --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "$key" "$img"
save "$img" agent-luks1-serpent-cbc-essiv-whirlpool

image "$img" 2
"$agent" luks format --type luks2 --cipher twofish-xts-benbi --key-size 256 \
    --hash sha3-256 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --luks2-metadata-size 16384 --luks2-keyslots-size 262144 --key-file "$key" "$img"
save "$img" agent-luks2-twofish-xts-benbi-sha3

if command -v cryptsetup >/dev/null 2>&1; then
    cs=(cryptsetup --batch-mode --disable-locks)
    image "$img" 3
    "${cs[@]}" luksFormat --type luks1 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
        --key-file "$key" "$img"
    save "$img" cryptsetup-luks1-pbkdf2

    image "$img" 2
    "${cs[@]}" luksFormat --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
        --luks2-metadata-size 16k --luks2-keyslots-size 512k \
        --label fuzz-label --subsystem fuzz-subsystem \
        --key-file "$key" "$img"
    # A second keyslot with Argon2i at cryptsetup's minimum cost.
    "${cs[@]}" luksAddKey --pbkdf argon2i --pbkdf-force-iterations 4 \
        --pbkdf-memory 32 --pbkdf-parallel 1 --key-file "$key" "$img" "$key"
    save "$img" cryptsetup-luks2-pbkdf2-argon2i

    image "$img" 2
    "${cs[@]}" luksFormat --type luks2 --pbkdf argon2id --pbkdf-force-iterations 4 \
        --pbkdf-memory 32 --pbkdf-parallel 1 --key-size 512 --sector-size 4096 \
        --luks2-metadata-size 16k --luks2-keyslots-size 512k \
        --key-file "$key" "$img"
    save "$img" cryptsetup-luks2-argon2id-4k
else
    echo "cryptsetup not found: only luks-agent seeds were written" >&2
fi

# unlock: flags byte only (image = flags % 4, bit 2 = repair checksums).
for flags in 00 01 02 03 06 07; do
    printf "\\x$flags" >"$unlock_out/image-$flags"
done

# probe: one input per device, in the target's encoding: size mode 2, the
# device size (40 bits), the head length (24 bits), the head (the first
# 68 KiB without trailing zeros), the tail (the last 128 KiB without
# leading zeros; zeros between them are implied).
probe_seed() { # IMAGE NAME
    python3 - "$1" "$probe_out/$2" <<'PY'
import os, sys
img, out = sys.argv[1:]
size = os.path.getsize(img)
with open(img, 'rb') as f:
    head = f.read(68 * 1024).rstrip(b'\0')
    at = max(size - 128 * 1024, len(head))
    f.seek(at)
    tail = f.read().lstrip(b'\0')
with open(out, 'wb') as f:
    f.write(bytes([2]) + size.to_bytes(5, 'little') + len(head).to_bytes(3, 'little') + head + tail)
PY
    echo "seed $probe_out/$2"
}

# Runs a tool that writes a signature onto image $1 of $2 MiB; skips the
# seed when the tool is missing or fails.
probe_tool() { # IMAGE MIB NAME COMMAND...
    local img=$1 mib=$2 name=$3
    shift 3
    command -v "$1" >/dev/null 2>&1 || { echo "$1 not found: no $name seed" >&2; return 0; }
    image "$img" "$mib"
    if "$@" >/dev/null 2>&1; then
        probe_seed "$img" "$name"
    else
        echo "$* failed: no $name seed" >&2
    fi
}

probe_tool "$img" 8 ext4 mkfs.ext4 -q -F "$img"
probe_tool "$img" 300 xfs mkfs.xfs -q -f "$img"
probe_tool "$img" 128 btrfs mkfs.btrfs -q -f "$img"
probe_tool "$img" 8 vfat-mbr mkfs.vfat --mbr=y "$img"
probe_tool "$img" 8 swap mkswap "$img"
probe_tool "$img" 8 gpt sgdisk -n 1:0:0 "$img"
probe_tool "$img" 8 dos sh -c "echo 'start=2048, type=83' | sfdisk -q '$img'"
# A GPT on a device that grew by 64 KiB: the backup header is not at the
# end, but still inside the seed's tail.
probe_tool "$img" 8 gpt-grown sh -c "sgdisk -n 1:0:0 '$img' && truncate -s 8256K '$img'"
# LVM needs a block device.
if command -v pvcreate >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    image "$img" 8
    if loop=$(losetup --find --show "$img" 2>/dev/null); then
        pvcreate -q -ff -y --devices "$loop" "$loop" >/dev/null 2>&1 &&
            probe_seed "$img" lvm2 || echo "pvcreate failed: no lvm2 seed" >&2
        losetup -d "$loop"
    fi
fi
image "$img" 3
"$agent" luks format --type luks1 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file "$key" "$img"
probe_seed "$img" luks1
image "$img" 2
"$agent" luks format --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --luks2-metadata-size 16384 --luks2-keyslots-size 262144 --key-file "$key" "$img"
probe_seed "$img" luks2

# image_certificate: 16-bit little-endian length, certificate DER, then a
# signature (or a second certificate).
cert_seed() { # NAME FIRST_DER REST
    python3 - "$cert_out/$1" "$2" "$3" <<'PY'
import sys
der = open(sys.argv[2], 'rb').read()
rest = open(sys.argv[3], 'rb').read()
open(sys.argv[1], 'wb').write(len(der).to_bytes(2, 'little') + der + rest)
PY
    echo "seed $cert_out/$1"
}
msg=$work/message
# The target's MESSAGE.
printf 'luks-agent image_certificate fuzz seed\n' >"$msg"
signed_cert() { # NAME KEY [req options...]
    local name=$1 k=$2
    shift 2
    # A CA allowed to sign certificates, so that it can be its own
    # anchor and the chain checks reach its signature.
    openssl req -new -x509 -key "$k" -days 3650 -subj "/CN=$name" \
        -addext 'keyUsage=critical,keyCertSign,digitalSignature' "$@" \
        -outform DER -out "$work/$name.der"
    local pss=()
    case $name in rsa*) pss=(-sigopt rsa_padding_mode:pss) ;; esac
    openssl dgst -sha256 -sign "$k" "${pss[@]}" -out "$work/$name.sig" "$msg"
    cert_seed "$name" "$work/$name.der" "$work/$name.sig"
}
openssl genrsa -out "$work/rsa.key" 2048 2>/dev/null
signed_cert rsa2048 "$work/rsa.key"
signed_cert rsa2048-pss-signed "$work/rsa.key" -sigopt rsa_padding_mode:pss
for c in prime256v1 secp384r1 secp521r1; do
    openssl ecparam -name "$c" -genkey -noout -out "$work/$c.key"
    signed_cert "ec-$c" "$work/$c.key"
done
for b in 2048 1536; do
    openssl dsaparam -out "$work/dsa$b.param" "$b" 2>/dev/null
    openssl gendsa -out "$work/dsa$b.key" "$work/dsa$b.param" 2>/dev/null
    signed_cert "dsa$b" "$work/dsa$b.key"
done
# A leaf and the CA that issued it.
printf '[leaf]\nkeyUsage=digitalSignature\n' >"$work/ext.cnf"
openssl req -new -x509 -key "$work/secp384r1.key" -days 3650 -subj /CN=ca \
    -addext 'basicConstraints=critical,CA:true,pathlen:1' \
    -addext 'keyUsage=critical,keyCertSign' -out "$work/ca.pem"
openssl req -new -key "$work/rsa.key" -subj /CN=leaf -out "$work/leaf.csr"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/secp384r1.key" \
    -CAcreateserial -days 3650 -extfile "$work/ext.cnf" -extensions leaf \
    -outform DER -out "$work/leaf.der" 2>/dev/null
openssl x509 -in "$work/ca.pem" -outform DER -out "$work/ca.der"
cert_seed chain-leaf-ca "$work/leaf.der" "$work/ca.der"

du -sh fuzz/corpus
