#!/usr/bin/env bash
# The full test suite: installs what it needs, then runs every tier.
#   unit   - cargo test --lib (no root, no tools)
#   host   - tests/ against real cryptsetup and qemu-img/qemu-io on files,
#            and real Keystone + Barbican on 127.0.0.1 (tests/harness)
#   vm     - attach/detach against real dm-crypt in a QEMU guest (vm/), the
#            host kernel having no device-mapper, and drop-in both ways with
#            os-brick's LUKS encryptors (PyPI) in that guest
#   fuzz   - a short bounded cargo-fuzz run of every target
# A tier that cannot run fails the suite; nothing is skipped silently.
# FUZZ_SECONDS (default 30) sets the fuzzing time per target.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# The key manager tests start a shared Keystone + Barbican here; make sure
# it is fresh now and gone when the suite ends, however it ends.
cloud=target/test-cloud
stop_cloud() { python3 tests/harness/openstack.py stop --state "$cloud" >/dev/null 2>&1 || true; }
stop_cloud
trap stop_cloud EXIT

echo "== lint"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

echo "== unit and host tiers"
cargo test --locked --all-targets

echo "== vm tier (real dm-crypt in a guest)"
cargo build --release --locked
vm/run.sh --timeout 600 -- /bin/sh tests/vm/attach_detach.sh
vm/run.sh --timeout 300 -- /bin/sh tests/vm/daemon.sh
# Drop-in both ways with the real os-brick (PyPI, pinned; installed above).
vm/run.sh --timeout 600 -- /bin/sh tests/vm/osbrick_dropin.sh
# SIGKILL at every state-changing call of an attach, concurrency, rollback
# of a failed attach, dm-crypt options.
for t in kill_format concurrency rollback crypt_options; do
    vm/run.sh --timeout 900 --console "target/vm/console-$t.log" -- /bin/sh "tests/vm/$t.sh"
done

echo "== package tier (.deb built, installed, started from its units)"
tests/packaging/deb_install.sh

echo "== fuzz (${FUZZ_SECONDS:-30} s per target)"
scripts/fuzz.sh "${FUZZ_SECONDS:-30}"

echo "== all tiers passed"
