#!/usr/bin/env bash
# The exporter while its SQLite database fails, under load (see BENCHMARKS.md, "Outages of the
# database"). Linux, as root for `immutable` (chattr); `lock` needs the sqlite3 shell.
#
#   cargo build --release
#   scripts/outages.sh writes-fail   # 60,000 live, then 2,000/s for 30 s while no write can grow a file
#   scripts/outages.sh lock          # 60,000 live, 1,000/s for 30 s, a sqlite3 session locks it for 15 s
#   scripts/outages.sh memory        # 60,000 live, 200/s, writes failing 1 s in 3, twenty times: RSS
#   scripts/outages.sh immutable     # 1,000/s for 40 s, the database file immutable for 20 s: CPU, WAL
#   scripts/outages.sh crash         # 1,000,000 live, then killed (SIGKILL) and started again three
#                                    # times while 2,000 callbacks/s keep coming: time to ready
#
# Writes fail through the file size limit (`prlimit --fsize`), which makes every write past the
# file's end fail with EFBIG, as a full disk does, without filling one.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${EXPORTER_BIN:-target/release/tencent-css-exporter}
SCENARIO=${1:?"which outage: writes-fail, lock, memory, immutable or crash"}
export CSS_CALLBACK_KEY=outage-bench-key
work=$(mktemp -d)
port=48200
target=http://127.0.0.1:$port/callback
db=$work/exporter.db
cleanup() {
    chattr -i "$db" 2>/dev/null || true
    kill "$exporter" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

start() {
    "$BIN" --web.listen-address 127.0.0.1:$port --storage.path "$db" >>"$work/exporter.log" 2>&1 &
    exporter=$!
    until curl -sf http://127.0.0.1:$port/readyz >/dev/null; do sleep 0.01; done
}
start

# Non-200 answers are what an outage brings: the load's exit status does not stop the script.
load() { "$BIN" load --target "$target" --progress 0s "$@" || true; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$exporter/stat"; }
rss_mib() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$exporter/status"; }
live_streams() { load --push-only --requests 60000 --concurrency 32 | grep -E '^answers'; }

case $SCENARIO in
writes-fail)
    live_streams
    before=$(cpu_ticks)
    prlimit --pid "$exporter" --fsize=1:1
    load --rate 2000 --duration 30s --concurrency 64 | grep -E 'latency|answers'
    echo "exporter CPU while failing: $(( $(cpu_ticks) - before )) ticks (1/100 s)"
    ;;
lock)
    live_streams
    load --rate 1000 --duration 30s --concurrency 32 >"$work/load.txt" 2>&1 &
    driver=$!
    for _ in $(seq 56); do
        curl -so /dev/null -w '%{time_total}\n' http://127.0.0.1:$port/metrics
        sleep 0.5
    done >"$work/scrapes.txt" &
    scraper=$!
    sleep 7
    (echo '.timeout 5000'; echo 'BEGIN IMMEDIATE;'; sleep 15; echo 'ROLLBACK;') | sqlite3 "$db"
    wait "$driver" "$scraper"
    grep -E 'latency|answers' "$work/load.txt"
    sort -n "$work/scrapes.txt" | awk -v slow="$(awk '$1 > 0.5' "$work/scrapes.txt" | wc -l)" \
        '{a[NR] = $1} END {print "scrapes:", NR, "median", a[int(NR / 2)] " s, max", a[NR] " s, over 0.5 s:", slow}'
    ;;
memory)
    live_streams
    echo "RSS after the pushes: $(rss_mib) MiB"
    load --rate 200 --duration 65s --concurrency 16 >"$work/load.txt" 2>&1 &
    driver=$!
    rss=""
    for _ in $(seq 20); do
        prlimit --pid "$exporter" --fsize=1:unlimited
        sleep 1
        prlimit --pid "$exporter" --fsize=unlimited:unlimited
        sleep 2
        rss="$rss $(rss_mib)"
    done
    echo "RSS after each outage (MiB):$rss"
    wait "$driver"
    grep -E 'answers' "$work/load.txt"
    ;;
immutable)
    load --rate 1000 --duration 40s --concurrency 16 >"$work/load.txt" 2>&1 &
    driver=$!
    sleep 5
    before=$(cpu_ticks)
    chattr +i "$db"
    sleep 20
    echo "exporter CPU in the 20 s: $(( $(cpu_ticks) - before )) ticks (1/100 s), WAL $(stat -c %s "$db-wal") bytes"
    curl -s http://127.0.0.1:$port/metrics | grep -E '^tencent_css_exporter_storage_(wal|checkpoint)'
    chattr -i "$db"
    wait "$driver"
    grep -E 'latency|answers' "$work/load.txt"
    sleep 2
    echo "after: WAL $(stat -c %s "$db-wal") bytes"
    curl -s http://127.0.0.1:$port/metrics | grep -E '^tencent_css_exporter_storage_(wal|checkpoint)'
    grep -i checkpoint "$work/exporter.log" | cut -c1-200
    ;;
crash)
    load --push-only --requests 1000000 --concurrency 32 | grep -E '^answers'
    load --rate 2000 --duration 40s --concurrency 32 >"$work/load.txt" 2>&1 &
    driver=$!
    for _ in 1 2 3; do
        sleep 3
        kill -KILL "$exporter"
        wait "$exporter" 2>/dev/null || true
        began=$(date +%s.%N)
        start
        awk -v a="$began" -v b="$(date +%s.%N)" 'BEGIN {printf "ready %.2f s after the start, callbacks arriving\n", b - a}'
    done
    wait "$driver"
    grep -E 'latency|answers' "$work/load.txt"
    ;;
*)
    echo "unknown outage $SCENARIO: writes-fail, lock, memory, immutable or crash" >&2
    exit 2
    ;;
esac
