#!/usr/bin/env bash
# Regenerates the seed corpora in fuzz/corpus/:
#
#   header_parse/  the first 64 KiB of real LUKS1/LUKS2 devices formatted
#                  by `luks-agent luks format` and, when installed, by
#                  `cryptsetup luksFormat` (pbkdf2 with 1000 iterations, or
#                  a tiny Argon2id, so that this runs in seconds);
#   unlock/        one-byte inputs selecting each reference image of the
#                  unlock target, with and without LUKS2 checksum repair.
#
# Usage: fuzz/gen_corpus.sh   (from anywhere inside the repository)
# Keys and salts are random, so every run produces different bytes; commit
# the result only when the seeds need to change. The corpus stays well under
# 1 MiB (at most 8 files of 64 KiB).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
out=fuzz/corpus/header_parse
unlock_out=fuzz/corpus/unlock
head_bytes=65536

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
key=$work/passphrase
printf '%s' 'fuzz-passphrase' >"$key"

mkdir -p "$out" "$unlock_out"
rm -f "$out"/* "$unlock_out"/*

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

# unlock: flags byte only (image = flags % 3, bit 2 = repair checksums).
for flags in 00 01 02 05 06; do
    printf "\\x$flags" >"$unlock_out/image-$flags"
done

du -sh fuzz/corpus
