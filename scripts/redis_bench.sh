#!/usr/bin/env bash
# Throughput of one and of two exporter replicas sharing one Redis (see BENCHMARKS.md).
#
#   cargo build --release
#   scripts/redis_bench.sh [duration] [concurrency per replica]
#
# Starts redis-server (AOF, appendfsync everysec) on a free port, then for 1 and 2 replicas:
# starts the replicas, drives each with its own `load` process at the given concurrency for the
# given duration, and prints the summed request rate and each load's latency summary.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${EXPORTER_BIN:-target/release/tencent-css-exporter}
DURATION=${1:-30s}
CONCURRENCY=${2:-32}
export CSS_CALLBACK_KEY=redis-bench-key
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

redis_port=16399
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly yes \
    --appendfsync everysec --dir "$work" >"$work/redis.log" &
pids+=($!)
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.1; done

for replicas in 1 2; do
    redis-cli -p "$redis_port" flushall >/dev/null
    ports=()
    for i in $(seq 1 "$replicas"); do
        port=$((19880 + i))
        "$BIN" --web.listen-address "127.0.0.1:$port" \
            --storage.redis-url "redis://127.0.0.1:$redis_port/0" --log.level warn &
        pids+=($!)
        ports+=("$port")
    done
    for port in "${ports[@]}"; do
        until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done
    done
    loads=()
    for port in "${ports[@]}"; do
        "$BIN" load --target "http://127.0.0.1:$port/callback" --duration "$DURATION" \
            --concurrency "$CONCURRENCY" --progress 0s --json >"$work/load-$port.json" &
        loads+=($!)
    done
    for p in "${loads[@]}"; do wait "$p"; done
    total=$(cat "$work"/load-*.json | python3 -c '
import json, sys
runs = [json.loads(l) for l in sys.stdin if l.strip()]
print(round(sum(r["requests_per_second"] for r in runs)))')
    echo "replicas=$replicas total_requests_per_second=$total"
    for port in "${ports[@]}"; do echo "  replica :$port $(cat "$work/load-$port.json")"; done
    for port in "${ports[@]}"; do
        pkill -f -- "--web.listen-address 127.0.0.1:$port" || true
    done
    rm -f "$work"/load-*.json
    sleep 1
done
