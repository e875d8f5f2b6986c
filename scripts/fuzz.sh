#!/usr/bin/env bash
# Builds and runs the cargo-fuzz targets in fuzz/ for a fixed time each and
# prints one summary line per target:
#
#   fuzz header_parse: 123456 executions, 0 crashes
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#   SECONDS  time per target (libFuzzer -max_total_time), default 60
#   TARGET   targets to run, default all (`cargo fuzz list`)
#
# Environment:
#   FUZZ_SANITIZER  cargo-fuzz sanitizer, default `none`. The crate's only
#                   unsafe code is a few libc calls; panics, aborts,
#                   timeouts and out-of-memory are caught without a
#                   sanitizer, and throughput is about five times that of
#                   `address`. Set to `address` for an ASan run.
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a
#                   crash (a hang), default 10
#   FUZZ_ARGS       extra libFuzzer arguments, e.g. `-jobs=4` or `-seed=1`
#
# Works with a stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc accept
# the -Z flags cargo-fuzz passes. Needs a C++ compiler (libFuzzer is built
# from source by libfuzzer-sys). Installs cargo-fuzz when missing.
#
# Seeds are read from fuzz/corpus/<target>/ and never written to; inputs the
# fuzzer finds go to fuzz/run/corpus/<target>/ (kept between runs, ignored
# by git), logs to fuzz/run/logs/<target>.log, and crashing inputs to
# fuzz/artifacts/<target>/. Exits 1 when a target produced a crash, timeout
# or out-of-memory artifact or failed otherwise, 2 when the build failed.
set -uo pipefail

seconds=${1:-60}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2

export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-none}
timeout=${FUZZ_TIMEOUT:-10}
# shellcheck disable=SC2206 # FUZZ_ARGS is a list of words on purpose
extra=(${FUZZ_ARGS:-})
# -a: debug assertions and overflow checks, so that arithmetic that would
# silently wrap in a release build is reported.
build_flags=(-a -s "$sanitizer")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked || exit 2
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi
if [ ${#targets[@]} -eq 0 ]; then
    echo "no fuzz targets found" >&2
    exit 2
fi

echo "building fuzz targets (sanitizer: $sanitizer)"
if ! cargo fuzz build "${build_flags[@]}"; then
    echo "fuzz build failed" >&2
    exit 2
fi

# Artifact files that mean a failure (libFuzzer also writes slow-unit-*
# files, which are only a warning).
list_artifacts() {
    local dir=fuzz/artifacts/$1
    [ -d "$dir" ] || return 0
    find "$dir" -maxdepth 1 -type f \
        \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) |
        sort
}

status=0
summary=()
for t in "${targets[@]}"; do
    work=fuzz/run/corpus/$t
    log=fuzz/run/logs/$t.log
    mkdir -p "$work" "$(dirname "$log")" "fuzz/corpus/$t"
    before=$(list_artifacts "$t")
    echo "fuzzing $t for ${seconds}s (log: $log)"
    cargo fuzz run "${build_flags[@]}" "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout="$timeout" \
        "${extra[@]}" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
    new=$(comm -13 <(printf '%s\n' "$before") <(list_artifacts "$t") | sed '/^$/d')
    crashes=0
    [ -n "$new" ] && crashes=$(printf '%s\n' "$new" | wc -l)
    line="fuzz $t: ${execs:-?} executions, $crashes crashes"
    if [ "$crashes" -gt 0 ]; then
        status=1
        echo "$line" >&2
        printf '  artifact: %s\n' $new >&2
        grep -m 3 -E "panicked at|ERROR: libFuzzer|==ERROR" "$log" | sed 's/^/  /' >&2
        printf '  reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run %s %s <artifact>\n' \
            "${build_flags[*]}" "$t" >&2
    elif [ "$rc" -ne 0 ]; then
        status=1
        line="$line (exit status $rc, see $log)"
        tail -n 20 "$log" >&2
    fi
    echo "$line"
    summary+=("$line")
done

echo
printf '%s\n' "${summary[@]}"
exit "$status"
