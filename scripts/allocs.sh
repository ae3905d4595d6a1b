#!/usr/bin/env bash
# Heap allocations a callback, the exporter (memory store) against the bare server, by dhat.
#
#   scripts/allocs.sh [SMALL] [LARGE]
#
# Runs each server under `valgrind --tool=dhat` twice, once for SMALL and once for LARGE closed-
# loop callbacks (8 connections), stops it with SIGINT so dhat writes its profile, and prints
# (blocks(LARGE) - blocks(SMALL)) / (LARGE - SMALL): the allocations one more callback costs,
# with start-up and shutdown cancelled out. Counts, not times: the figures repeat whatever else
# the machine does. With DHAT_TOP=N it also lists the N allocation sites that grew the most.
# Needs the release builds of the exporter and of examples/bare_server.
set -euo pipefail
small=${1:-5000}
large=${2:-15000}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${EXPORTER_BIN:-$root/target/release/tencent-css-exporter}
bare=${BARE_BIN:-$root/target/release/examples/bare_server}
tmp=$(mktemp -d)
trap '[ -n "${DHAT_KEEP:-}" ] || rm -rf "$tmp"' EXIT
export CSS_CALLBACK_KEY=allocs-measurement-key
address=127.0.0.1:19879

# run NAME REQUESTS COMMAND...: serves REQUESTS callbacks under dhat, profile in $tmp/NAME.json
run() {
    local name=$1 requests=$2
    shift 2
    valgrind --tool=dhat --dhat-out-file="$tmp/$name.json" "$@" >"$tmp/$name.log" 2>&1 &
    local pid=$!
    # Any answer at all: the bare server has no /readyz, and the memory store is ready at once.
    until curl -s -o /dev/null "http://$address/readyz"; do
        kill -0 $pid || { cat "$tmp/$name.log"; exit 1; }
        sleep 0.2
    done
    "$bin" load --target "http://$address/callback" --concurrency 8 --requests "$requests" \
        --progress 0s >"$tmp/$name.load" 2>&1
    kill -INT $pid
    wait $pid || true
}

for server in exporter bare; do
    if [ $server = exporter ]; then
        cmd=("$bin" --web.listen-address $address --storage.path :memory: --log.level warn)
    else
        cmd=("$bare" $address)
    fi
    run "$server-small" "$small" "${cmd[@]}"
    run "$server-large" "$large" "${cmd[@]}"
done

python3 - "$tmp" "$small" "$large" "${DHAT_TOP:-0}" <<'EOF'
import json, sys, collections
tmp, small, large, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def sites(path):
    """Blocks allocated by site: the innermost frame outside the allocator and the std
    containers that call it."""
    d = json.load(open(path))
    frames = d["ftbl"]
    skip = ("alloc", "raw_vec", "boxed", "vec::", "Vec<", "String", "string::", "hashbrown",
            "bytes::", "clone", "__rdl", "__rust")
    out = collections.Counter()
    for p in d["pps"]:
        names = [frames[i].split(": ", 1)[-1].split(" (in ")[0] for i in p["fs"]]
        site = next((n for n in names if not any(s in n for s in skip)), names[-1] if names else "?")
        out[site] += p["tbk"]
    return out

for server in ("exporter", "bare"):
    a, b = sites(f"{tmp}/{server}-small.json"), sites(f"{tmp}/{server}-large.json")
    per = (sum(b.values()) - sum(a.values())) / (large - small)
    print(f"{server}: {per:.1f} allocations a callback")
    if top:
        grown = sorted(((b[k] - a[k]) / (large - small), k) for k in b)[::-1][:top]
        for n, k in grown:
            print(f"    {n:6.2f}  {k[:150]}")
EOF
