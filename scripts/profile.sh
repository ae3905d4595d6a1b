#!/usr/bin/env bash
# Profiles the release exporter under closed-loop load with perf, per thread.
#
#   scripts/profile.sh [SECONDS] [CONCURRENCY]
#
# Starts the exporter on 127.0.0.1:19877 with a temporary SQLite database (sync normal), runs
# `tencent-css-exporter load` against it, samples the exporter with perf for SECONDS in the
# middle of the run, and prints where its CPU goes: by thread (the ledger thread against the
# tokio workers), the hottest functions, and the ledger's inclusive costs.
# Needs perf (`apt-get install -y linux-perf`); the release binary keeps its symbols.
set -euo pipefail
seconds=${1:-20}
concurrency=${2:-32}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${EXPORTER_BIN:-$root/target/release/tencent-css-exporter}
data=${PERF_DATA:-$root/target/perf.data}
tmp=$(mktemp -d)
export CSS_CALLBACK_KEY=perf-measurement-key
"$bin" --web.listen-address 127.0.0.1:19877 --storage.path "$tmp/exporter.db" --log.level warn &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
until curl -fs http://127.0.0.1:19877/readyz >/dev/null; do sleep 0.05; done
"$bin" load --target http://127.0.0.1:19877/callback --concurrency "$concurrency" \
    --duration "$((seconds + 10))s" --progress 0s &
load=$!
sleep 5
perf record -F 999 -g --call-graph dwarf,16384 -p "$pid" -o "$data" -- sleep "$seconds" 2>/dev/null
wait $load || true
report() { perf report -i "$data" --stdio "$@" 2>/dev/null | grep -v '^#' | grep -v '^$'; }
echo "== CPU by thread"
report --no-children --sort comm -g none
echo "== hottest functions (self time), by thread"
report --no-children --sort comm,symbol -g none --percent-limit 0.7
echo "== inclusive time (children), ledger thread"
report --children --comms ledger --sort symbol -g none --percent-limit 3 | head -40
echo "perf data: $data (perf report -i $data)"
