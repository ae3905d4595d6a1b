#!/usr/bin/env bash
# A short run of every fuzz target, for CI: builds them with libFuzzer's coverage
# instrumentation and debug assertions, without a sanitizer (so neither cargo-fuzz nor nightly
# flags are needed), and runs each for SECONDS from its committed seeds. Fails on the first
# crash, whose input is saved under fuzz/artifacts/<target>/ (replay: FUZZING.md). Long runs
# use `cargo fuzz` with AddressSanitizer instead.
#
#   scripts/fuzz_smoke.sh [SECONDS]
set -euo pipefail
seconds=${1:-30}
cd "$(dirname "$0")/.."
host=$(rustc -vV | sed -n 's/^host: //p')
# The flags cargo-fuzz passes, less the sanitizer. An explicit --target keeps them off build
# scripts and proc macros.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
cargo build --release --manifest-path fuzz/Cargo.toml --target "$host" --target-dir target/fuzz
bin=target/fuzz/$host/release
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
for target in parse_callback signature truth; do
    mkdir -p "$corpus/$target" "fuzz/artifacts/$target"
    dict=()
    if [ -f "fuzz/$target.dict" ]; then dict=("-dict=fuzz/$target.dict"); fi
    if ! "$bin/$target" -max_total_time="$seconds" -artifact_prefix="fuzz/artifacts/$target/" \
        "${dict[@]}" "$corpus/$target" "fuzz/seeds/$target" 2>"$corpus/$target.log"; then
        tail -n 60 "$corpus/$target.log"
        echo "fuzz target $target failed; the input is under fuzz/artifacts/$target/" >&2
        exit 1
    fi
    echo "$target: $(grep -E '^Done' "$corpus/$target.log")"
done
