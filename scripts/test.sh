#!/usr/bin/env bash
# The full test suite: installs what it needs, then runs every tier.
#   unit   - cargo test --lib (no root, no tools)
#   host   - tests/ against real cryptsetup and qemu-img/qemu-io on files
#   fuzz   - a short bounded cargo-fuzz run of every target
# A tier that cannot run fails the suite; nothing is skipped silently.
# FUZZ_SECONDS (default 30) sets the fuzzing time per target.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "== lint"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

echo "== unit and host tiers"
cargo test --locked --all-targets

echo "== fuzz (${FUZZ_SECONDS:-30} s per target)"
scripts/fuzz.sh "${FUZZ_SECONDS:-30}"

echo "== all tiers passed"
