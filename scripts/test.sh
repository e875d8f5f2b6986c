#!/usr/bin/env bash
# The full test suite: installs what it needs, then runs every tier.
#   unit   - cargo test --lib (no root, no tools)
#   host   - tests/ against real cryptsetup and qemu-img/qemu-io on files,
#            and real Keystone + Barbican on 127.0.0.1 (tests/harness)
#   image  - image signature verdicts against cursive 0.3.1 (its own venv)
#            with certificates in the real Barbican (tests/image_signatures)
#   vm     - attach/detach against real dm-crypt in a QEMU guest (vm/), the
#            host kernel having no device-mapper, and drop-in both ways with
#            os-brick's LUKS encryptors (PyPI) in that guest
#   fuzz   - a short bounded cargo-fuzz run of every target
#   clean-root - a fresh minimal Debian 12 root (mmdebstrap) runs
#            scripts/install-deps.sh and scripts/demo.sh as a new user
#            would (tests/clean_root.sh): proves every install step
# A tier that cannot run fails the suite, with or without CI=true;
# nothing is skipped.
# FUZZ_SECONDS (default 30) sets the fuzzing time per target.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each tier's wall time, printed when the suite ends (passed or not).
tiers=()
tier_name=
tier_start=$SECONDS
tier() { # NAME: ends the running tier and starts NAME
    [ -z "$tier_name" ] || tiers+=("$(printf '%5d s  %s' $((SECONDS - tier_start)) "$tier_name")")
    tier_name=$1
    tier_start=$SECONDS
    echo "== $1"
}
report() {
    tier ""
    echo "== time per tier (total $SECONDS s)"
    printf '%s\n' "${tiers[@]}"
}

tier "install-deps"
scripts/install-deps.sh

# Tests that need a service or a device say so and fail instead of
# skipping (see tests/common/harness.rs).
export LUKS_AGENT_TESTS_STRICT=1

# The key manager tests start a shared Keystone + Barbican here; make sure
# it is fresh now and gone when the suite ends, however it ends.
cloud=target/test-cloud
stop_cloud() { python3 tests/harness/openstack.py stop --state "$cloud" >/dev/null 2>&1 || true; }
stop_cloud
trap 'stop_cloud; report' EXIT

tier "lint"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
replay_tool=(--manifest-path tools/dm-log-replay/Cargo.toml --target-dir target --locked)
cargo fmt --manifest-path tools/dm-log-replay/Cargo.toml -- --check
cargo clippy "${replay_tool[@]}" --all-targets -- -D warnings

tier "unit and host tiers"
cargo test --locked --all-targets
cargo test "${replay_tool[@]}"

tier "image signatures: luks-agent against cursive 0.3.1 (real Barbican)"
python3 tests/image_signatures/compat.py --bin target/debug/luks-agent

tier "os-brick plug-in with nova's and os-brick's own code (libvirt mode, real libvirtd)"
cargo build --release --locked
integrations/os_brick/tests/run.sh libvirt

tier "vm tier (real dm-crypt in a guest)"
vm/run.sh --timeout 600 -- /bin/sh tests/vm/attach_detach.sh
vm/run.sh --timeout 300 -- /bin/sh tests/vm/daemon.sh
# Drop-in both ways with the real os-brick (PyPI, pinned; installed above).
vm/run.sh --timeout 600 -- /bin/sh tests/vm/osbrick_dropin.sh
# The os-brick plug-in in dm mode, driven by os-brick's and nova's code,
# and drop-in both ways with os-brick's own encryptor.
vm/run.sh --timeout 900 --console target/vm/console-plugin.log -- /bin/sh integrations/os_brick/tests/run.sh dm
# SIGKILL at every state-changing call of an attach, power loss at every
# write of a format or keyslot change (dm-log-writes, replayed by
# tools/dm-log-replay), concurrency, rollback of a failed attach, dm-crypt
# options.
cargo build --release "${replay_tool[@]}"
# power_loss.sh runs a libvirtd of its own in the guest: the user, group
# and directories must exist on the (shared, read-only) root.
tests/harness/libvirtd.sh prepare
for t in format_guard cipher_interop kill_format power_loss concurrency rollback crypt_options; do
    vm/run.sh --timeout 900 --console "target/vm/console-$t.log" -- /bin/sh "tests/vm/$t.sh"
done

tier "package tier (.deb built, installed, started from its units)"
tests/packaging/deb_install.sh

tier "fuzz (${FUZZ_SECONDS:-30} s per target)"
scripts/fuzz.sh "${FUZZ_SECONDS:-30}"

tier "clean-root tier (fresh Debian 12 root: install-deps, then the demo)"
tests/clean_root.sh

echo "== all tiers passed"
