#!/usr/bin/env bash
# Where the exporter's CPU a callback goes beyond the bare HTTP stack's: both servers are driven
# at the same fixed rate (open loop, so both do the same work a second), each is sampled with
# perf for SECONDS, and every symbol's samples are turned into microseconds a request. Prints
# the total a request for each server and the symbols that cost the exporter the most more than
# the bare server, largest first.
#
#   scripts/profile_diff.sh [RATE] [SECONDS] [STORAGE]
#
# RATE defaults to 40000 requests/s, SECONDS to 8, STORAGE to a temporary SQLite file
# (`:memory:` for the memory store). Needs perf (`apt-get install -y linux-perf`) and the
# release builds: cargo build --release --bin tencent-css-exporter --example bare_server
set -euo pipefail
rate=${1:-40000}
seconds=${2:-8}
storage=${3:-}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${EXPORTER_BIN:-$root/target/release/tencent-css-exporter}
bare=${BARE_BIN:-$root/target/release/examples/bare_server}
tmp=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$tmp"' EXIT
export CSS_CALLBACK_KEY=perf-measurement-key
hz=4999
port=19879

# profile NAME COMMAND...: serves on $port, loads it at $rate, samples it; leaves NAME.txt.
profile() {
    local name=$1
    shift
    "$@" &
    pid=$!
    until curl -s -o /dev/null "http://127.0.0.1:$port/"; do sleep 0.05; done
    "$bin" load --target "http://127.0.0.1:$port/callback" --concurrency 64 --rate "$rate" \
        --duration "$((seconds + 5))s" --progress 0s >"$tmp/$name.load" 2>&1 &
    local load=$!
    sleep 3
    perf record -F "$hz" -p "$pid" -o "$tmp/$name.data" -- sleep "$seconds" >/dev/null 2>&1
    wait $load || { cat "$tmp/$name.load"; exit 1; }
    kill $pid
    wait $pid 2>/dev/null || true
    pid=
    perf report -i "$tmp/$name.data" --stdio --no-children --sort symbol >"$tmp/$name.txt" \
        2>/dev/null
    awk '/^# Samples/ {print $3; exit}' "$tmp/$name.txt" >"$tmp/$name.samples"
}

profile bare "$bare" "127.0.0.1:$port"
if [ -n "$storage" ]; then db=$storage; else db=$tmp/exporter.db; fi
profile exporter "$bin" --web.listen-address "127.0.0.1:$port" --storage.path "$db" \
    --log.level warn

python3 - "$tmp" "$hz" "$((rate * seconds))" <<'PY'
import re, sys
tmp, hz, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def count(name):
    s = open(f"{tmp}/{name}.samples").read().strip()
    return float(s[:-1]) * 1000 if s.endswith("K") else float(s)
def load(name):
    total, per = count(name), {}
    for line in open(f"{tmp}/{name}.txt"):
        if line.startswith("#"):
            continue
        m = re.match(r"\s*([\d.]+)%\s+\[.\]\s+(.*)", line)
        if m:
            sym = m.group(2).strip()[:100]
            per[sym] = per.get(sym, 0.0) + float(m.group(1)) * total / 100
    return total, per
us = 1e6 / hz / requests
(bt, b), (et, e) = load("bare"), load("exporter")
print(f"CPU a request: bare server {bt * us:.1f} us, exporter {et * us:.1f} us "
      f"(+{(et - bt) * us:.1f} us)")
print("  more    bare  exporter  symbol")
for sym in sorted(set(b) | set(e), key=lambda s: b.get(s, 0) - e.get(s, 0))[:40]:
    print(f"{(e.get(sym, 0) - b.get(sym, 0)) * us:6.2f}  {b.get(sym, 0) * us:6.2f}  "
          f"{e.get(sym, 0) * us:8.2f}  {sym}")
PY
