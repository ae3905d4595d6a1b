#!/usr/bin/env python3
"""Reproducible performance measurements of the exporter (see BENCHMARKS.md).

Each measurement starts the release binary on 127.0.0.1 with a temporary SQLite database (its
default storage: a file, sync normal), drives it with `tencent-css-exporter load`, samples what it
needs and stops everything it started. Build first:

    cargo build --release && cargo build --release --example bare_server

Then, for example:

    scripts/perf.py throughput            # max rate, bare HTTP stack vs exporter, 60 s each
    scripts/perf.py latency --rate 10000  # open-loop latency at a fixed rate
    scripts/perf.py metrics               # /metrics with 1,000 domains, scrape vs callback latency
    scripts/perf.py metrics --gzip        # the same, scraping as Prometheus does (Accept-Encoding: gzip)
    scripts/perf.py scrapers --clients 32 # many clients scraping /metrics at once, peak RSS
    scripts/perf.py scrapers --gzip       # the same, asking for gzip
    scripts/perf.py memory                # idle RSS, 1,000,000 live streams, restart readiness
    scripts/perf.py memory --redis        # the same with the state in Redis (also: metrics --redis)
    scripts/perf.py soak                  # 10 minutes of unique events, RSS/db/fds every 10 s
    scripts/perf.py restart OLD NEW       # restart readiness of two builds, alternated
    scripts/perf.py metrics --redis --scrape-every 1.1 OLD NEW  # scrapes' cost to callbacks, two builds alternated
    scripts/perf.py metrics --gzip --scrape-every 1 --unscraped OLD NEW  # the same on SQLite, with a run without scrapes each round
    scripts/perf.py silent                # a callback while silent connections hold every slot
    scripts/perf.py silent --slow-body    # the same with slow POSTs (head sent, body never finished)

Each load waits until the rest of the machine is idle (up to 15 minutes; PERF_NO_WAIT=1 skips
that) and reports the CPU the server, the load generator and everything else used meanwhile.
EXPORTER_BIN and BARE_BIN select other builds.
"""

import argparse
import bisect
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# EXPORTER_BIN and BARE_BIN point at other builds (e.g. a copy that a rebuild cannot replace
# in the middle of a run).
BIN = os.environ.get("EXPORTER_BIN", os.path.join(ROOT, "target", "release", "tencent-css-exporter"))
BARE = os.environ.get("BARE_BIN", os.path.join(ROOT, "target", "release", "examples", "bare_server"))
KEY = "perf-measurement-key"
HOST = "127.0.0.1"
EXPORTER_PORT = 19877
BARE_PORT = 19878
# CPUs the servers and the load generator are confined to (`throughput --pin`); None: any.
AFFINITY = {"server": None, "load": None}


def pinned(role):
    """A Popen preexec_fn confining the child to the CPUs of `role`, or None."""
    cpus = AFFINITY[role]
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def log(*parts):
    print(*parts, file=sys.stderr, flush=True)


def http_get(url, timeout=5.0, headers=None):
    """Status and body (as sent) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def rss_mib(pid, field="VmRSS"):
    """Resident memory of the process; `field="VmHWM"`: its peak so far."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def db_mib(path):
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.path.getsize(path + suffix)
        except OSError:
            pass
    return total / (1024 * 1024)


class Exporter:
    """The release binary serving on EXPORTER_PORT with a database at `db`."""

    def __init__(self, db, extra=(), bin=None):
        self.db = db
        self.extra = list(extra)
        self.bin = bin or BIN
        self.proc = None
        self.ready_seconds = None

    @property
    def url(self):
        return f"http://{HOST}:{EXPORTER_PORT}"

    def start(self, ready_timeout=120.0):
        env = dict(os.environ, CSS_CALLBACK_KEY=KEY)
        cmd = [
            self.bin,
            "--web.listen-address", f"{HOST}:{EXPORTER_PORT}",
            "--storage.path", self.db,
            "--log.level", "warn",
            *self.extra,
        ]
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env, preexec_fn=pinned("server"))
        while time.monotonic() - started < ready_timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"exporter exited with {self.proc.returncode}")
            status, _ = http_get(self.url + "/readyz", timeout=1.0)
            if status == 200:
                self.ready_seconds = time.monotonic() - started
                return self
            time.sleep(0.005)
        raise SystemExit("exporter not ready in time")

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *_):
        self.stop()


class Bare:
    """examples/bare_server on BARE_PORT: the HTTP stack ceiling."""

    url = f"http://{HOST}:{BARE_PORT}"

    def __enter__(self):
        self.proc = subprocess.Popen([BARE, f"{HOST}:{BARE_PORT}"], preexec_fn=pinned("server"))
        for _ in range(500):
            try:
                import socket

                with socket.create_connection((HOST, BARE_PORT), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.01)
        raise SystemExit("bare server did not start")

    @property
    def pid(self):
        return self.proc.pid

    def __exit__(self, *_):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def busy_seconds():
    """CPU time the whole machine spent busy, in seconds (all cores)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_seconds(pid):
    """CPU time of a running process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait=900.0, window=3.0, threshold=0.15):
    """Waits until the rest of the machine is idle (other work skews every figure here);
    PERF_NO_WAIT=1 skips the wait."""
    if os.environ.get("PERF_NO_WAIT"):
        return
    deadline = time.monotonic() + max_wait
    while True:
        before = busy_seconds()
        time.sleep(window)
        cores = (busy_seconds() - before) / window
        if cores < threshold or time.monotonic() > deadline:
            if cores >= threshold:
                log(f"  machine still busy ({cores:.2f} cores used by other work); measuring anyway")
            return
        log(f"  waiting for a quiet machine ({cores:.2f} cores used by other work)")


def load(target, *args, server_pid=None, quiet=True):
    """Runs `tencent-css-exporter load` and returns its JSON summary, with the CPU time the
    server, the load generator and everything else on the machine used meanwhile."""
    if quiet:
        wait_quiet()
    cmd = [BIN, "load", "--target", target + "/callback", "--json", *map(str, args)]
    log("$ CSS_CALLBACK_KEY=... " + " ".join(os.path.relpath(c, ROOT) if c == BIN else c for c in cmd))
    env = dict(os.environ, CSS_CALLBACK_KEY=KEY)
    busy0, t0 = busy_seconds(), time.monotonic()
    server0 = process_seconds(server_pid) if server_pid else 0.0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, preexec_fn=pinned("load"))
    stdout = proc.stdout.read()
    _, _, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - t0
    server = (process_seconds(server_pid) - server0) if server_pid else 0.0
    generator = usage.ru_utime + usage.ru_stime
    summary = json.loads(stdout.strip().splitlines()[-1])
    summary["cpu_cores"] = {
        "server": server / elapsed,
        "load_generator": generator / elapsed,
        "other": max(0.0, busy_seconds() - busy0 - server - generator) / elapsed,
    }
    log("  CPU used (cores): server {server:.2f}, load generator {load_generator:.2f}, "
        "other work {other:.2f}".format(**summary["cpu_cores"]))
    if summary["errors"] or summary["non_200"]:
        log("  refused or failed requests:", summary["statuses"], summary["first_error"])
    return summary


def describe(summary):
    lat = summary["latency_ms"] or {}
    return (
        f"{summary['requests_per_second']:.0f} req/s "
        f"(slowest 10 s: {summary['slowest_interval_per_second'] or 0:.0f}), "
        f"p50 {lat.get('p50', 0):.2f} ms, p99 {lat.get('p99', 0):.2f} ms, "
        f"p99.9 {lat.get('p99_9', 0):.2f} ms, max {lat.get('max', 0):.2f} ms, "
        f"non-200 {summary['non_200']}, errors {summary['errors']}"
    )


def workdir():
    return tempfile.mkdtemp(prefix="css-exporter-perf-")


class Sqlite:
    """The exporter's default store: the database file `db` (with its WAL)."""

    args = []
    what = "database"

    def __init__(self, db):
        self.db = db

    def stored_mib(self):
        return db_mib(self.db)

    def reset_stats(self):
        pass

    def stats(self):
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class Redis:
    """`--redis`: a redis-server in `dir` (AOF, `appendfsync everysec`, as
    scripts/redis_bench.sh runs it) for the exporter to keep its state in instead."""

    PORT = 16398
    args = ["--storage.redis-url", f"redis://{HOST}:{PORT}/0"]
    what = "Redis used_memory"

    def __init__(self, dir):
        self.dir = dir
        self.proc = None

    def cli(self, *words):
        return subprocess.run(["redis-cli", "-p", str(self.PORT), *words],
                              capture_output=True, text=True).stdout

    def stored_mib(self):
        for line in self.cli("INFO", "memory").splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1]) / (1024 * 1024)
        return None

    def reset_stats(self):
        """Starts Redis's own per-command times and its record of stalls afresh."""
        self.cli("CONFIG", "SET", "latency-monitor-threshold", "1")
        self.cli("CONFIG", "RESETSTAT")
        self.cli("LATENCY", "RESET")

    def stats(self):
        """Since `reset_stats`: Redis's own time per call of the commands a scrape reads with,
        and its longest stall (ms), during which it answered no one."""
        out = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            name, _, fields = line.removeprefix("cmdstat_").partition(":")
            if line.startswith("cmdstat_") and name in ("hgetall", "hscan"):
                f = dict(kv.split("=", 1) for kv in fields.split(","))
                out[name] = {"calls": int(f["calls"]), "usec_per_call": float(f["usec_per_call"])}
        # Four lines an event: its name, when, the latest and the longest stall in ms.
        latest = self.cli("LATENCY", "LATEST").split()
        out["longest_stall_ms"] = max((int(m) for m in latest[3::4]), default=0)
        return out

    def __enter__(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.PORT), "--bind", HOST, "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", self.dir],
            stdout=subprocess.DEVNULL)
        for _ in range(100):
            if "PONG" in self.cli("PING"):
                return self
            time.sleep(0.1)
        raise SystemExit("redis-server did not answer")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()


def storage(a, tmp):
    """The store a command runs the exporter on: Redis with `--redis`, else SQLite."""
    return Redis(tmp) if getattr(a, "redis", False) else Sqlite(os.path.join(tmp, "exporter.db"))


def cmd_throughput(a):
    if a.pin:
        # The load generator on the first CPU, the server on the others: each server gets the
        # same CPU whatever the generator needs to drive it.
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        AFFINITY.update(load={cpus[0]}, server=set(cpus[1:]))
        log(f"load generator on CPU {cpus[0]}, servers on CPU {','.join(map(str, cpus[1:]))}")
    results = {}
    with Bare() as bare:
        s = load(bare.url, "--concurrency", a.concurrency, "--duration", a.duration, server_pid=bare.pid)
        results["bare"] = s
        log("bare HTTP stack:", describe(s))
    tmp = workdir()
    try:
        with Exporter(os.path.join(tmp, "exporter.db")) as ex:
            s = load(ex.url, "--concurrency", a.concurrency, "--duration", a.duration, "--pid", ex.pid, server_pid=ex.pid)
            results["exporter"] = s
            log("exporter (SQLite file, sync normal):", describe(s))
            log(f"  database after the run: {db_mib(ex.db):.1f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = results["exporter"]["requests_per_second"] / results["bare"]["requests_per_second"]
    log(f"exporter / bare = {ratio:.2f}")
    print(json.dumps({"bare": results["bare"], "exporter": results["exporter"], "ratio": ratio}))


def cmd_latency(a):
    out = {}
    tmp = workdir()
    try:
        with Exporter(os.path.join(tmp, "exporter.db")) as ex:
            s = load(ex.url, "--concurrency", a.concurrency, "--duration", a.duration, "--rate", a.rate,
                     "--domains", a.domains, server_pid=ex.pid)
            s["commits"] = commit_stats(ex.url)
            out["exporter"] = s
            log(f"exporter at {a.rate} req/s, {a.domains} domains:", describe(s))
            log("  commits: {count}, {mean_us:.1f} µs each on average".format(**s["commits"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.bare:
        with Bare() as bare:
            s = load(bare.url, "--concurrency", a.concurrency, "--duration", a.duration, "--rate", a.rate, server_pid=bare.pid)
            out["bare"] = s
            log(f"bare HTTP stack at {a.rate} req/s:", describe(s))
    print(json.dumps(out))


def commit_stats(url):
    """How many commits the exporter made and their mean time, from its storage metrics."""
    _, body = http_get(url + "/metrics", timeout=30)
    values = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("tencent_css_exporter_storage_commit_duration_seconds_"):
            values[name.rsplit("_", 1)[-1]] = float(value)
    count = values.get("count", 0.0)
    return {"count": int(count), "mean_us": 1e6 * values.get("sum", 0.0) / count if count else 0.0}


def scrape_headers(gzip):
    """What a scrape sends: `--gzip` asks for a compressed page, as Prometheus does."""
    return {"Accept-Encoding": "gzip"} if gzip else {}


def scrape_times(url, n, gzip=False):
    """Times of `n` scrapes, and the bytes of the last one as sent."""
    times = []
    size = 0
    for _ in range(n):
        t0 = time.perf_counter()
        status, body = http_get(url + "/metrics", timeout=30, headers=scrape_headers(gzip))
        times.append((time.perf_counter() - t0) * 1000)
        assert status == 200, status
        size = len(body)
    return times, size


def pct(values, q):
    v = sorted(values)
    return v[max(0, min(len(v) - 1, int(-(-q * len(v) // 1)) - 1))]


def fill_domains(ex, domains):
    """Fills `domains` push domains: ended sessions (counters over both areas, every errcode of
    the mix, push-duration histograms) and some live streams."""
    load(ex.url, "--domains", domains, "--requests", 400_000, "--concurrency", 64, "--progress", "0s", quiet=False)
    load(ex.url, "--domains", domains, "--requests", 20_000, "--push-only", "--concurrency", 64, "--progress", "0s", quiet=False)


def cmd_scrapers(a):
    """`--clients` clients scraping /metrics back to back, each on a keep-alive connection."""
    tmp = workdir()
    try:
        with Exporter(os.path.join(tmp, "exporter.db")) as ex:
            fill_domains(ex, a.domains)
            http_get(ex.url + "/metrics", timeout=30)
            before = rss_mib(ex.pid)
            import http.client

            stop = time.monotonic() + a.seconds
            times, failures = [], []

            def client():
                conn = http.client.HTTPConnection(HOST, EXPORTER_PORT, timeout=60)
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    conn.request("GET", "/metrics", headers=scrape_headers(a.gzip))
                    r = conn.getresponse()
                    r.read()
                    times.append((time.perf_counter() - t0) * 1000)
                    if r.status != 200:
                        failures.append(r.status)

            threads = [threading.Thread(target=client) for _ in range(a.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out = {"clients": a.clients, "seconds": a.seconds, "scrapes": len(times),
                   "non_200": len(failures), "p50_ms": pct(times, 0.5), "max_ms": max(times),
                   "rss_before_mib": before, "rss_peak_mib": rss_mib(ex.pid, "VmHWM")}
            log(f"{len(times)} scrapes by {a.clients} clients in {a.seconds:.0f} s "
                f"({len(failures)} not 200), p50 {out['p50_ms']:.0f} ms, max {out['max_ms']:.0f} ms; "
                f"RSS {before:.0f} MiB before, peak {out['rss_peak_mib']:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def scraped_load(ex, a):
    """The callback load of `metrics` while /metrics is scraped every `--scrape-every` s: the
    load's summary (with `scrape_windows`, see `scrape_windows`) and each scrape's time in ms."""
    stop = threading.Event()
    during = []
    scrapes = []  # (start, end) of each scrape, on the monotonic clock

    def scrape_loop():
        while not stop.is_set():
            t0 = time.monotonic()
            http_get(ex.url + "/metrics", timeout=30, headers=scrape_headers(a.gzip))
            t1 = time.monotonic()
            during.append((t1 - t0) * 1000)
            scrapes.append((t0, t1))
            # 0: back to back, the worst case; Prometheus scrapes every 15 s or so.
            stop.wait(max(0.0, a.scrape_every - (time.monotonic() - t0)))

    scraper = threading.Thread(target=scrape_loop)
    latency_log = os.path.join(os.path.dirname(ex.db), "latencies.txt")
    pages_before = pages_by_writer(ex)
    scraper.start()
    try:
        busy = load(ex.url, "--domains", a.domains, "--rate", a.rate, "--duration", a.duration, "--concurrency", 32,
                    "--latency-log", latency_log, server_pid=ex.pid, quiet=False)
    finally:
        stop.set()
        scraper.join()
    pages = pages_by_writer(ex)
    if pages and pages_before:
        # Each reading answers its own page; the one after the run (on an idle machine) is the
        # idle writer's.
        busy["pages"] = {w: n - pages_before.get(w, 0) for w, n in pages.items()}
        busy["pages"]["idle"] = busy["pages"].get("idle", 0) - 1
    log(f"callbacks, while scraping every {a.scrape_every} s ({len(during)} scrapes, "
        f"p50 {pct(during, 0.5):.1f} ms, max {max(during):.1f} ms):", describe(busy))
    if "pages" in busy:
        log("  pages by writer: " + ", ".join(f"{w} {n}" for w, n in sorted(busy["pages"].items())))
    busy["scrape_windows"] = scrape_windows(latency_log, scrapes, a.scrape_every)
    os.remove(latency_log)
    if busy["scrape_windows"]:
        log("  " + describe_windows(busy["scrape_windows"]))
    return busy, during


def pages_by_writer(ex):
    """`tencent_css_exporter_metrics_pages_total` by `writer`, read by a scrape of its own (its
    page counted); None from a build without it."""
    status, body = http_get(ex.url + "/metrics", timeout=30)
    pages = {}
    for line in body.decode(errors="replace").splitlines():
        m = re.match(r'tencent_css_exporter_metrics_pages_total\{writer="(\w+)"\} (\S+)$', line)
        if m:
            pages[m.group(1)] = int(float(m.group(2)))
    return pages if status == 200 and pages else None


def scrape_windows(latency_log, scrapes, every):
    """Within one run, the callbacks sent while a scrape was being answered against those sent
    between two scrapes: each scrape's window is its first W ms (W: the median scrape's time),
    its pair the W ms starting half a period later. The windows are fixed in time by the
    scraper's schedule and of equal width, so the machine's own stalls fall into either alike,
    where runs with and without scrapes compare two stretches of a noisy machine. Per pair, the
    slowest callback of each window is compared: without an effect of the scrapes, either is the
    slower about as often (a sign test). None with scrapes back to back (no time between them)."""
    if every < 0.2 or len(scrapes) < 2:
        return None
    with open(latency_log) as f:
        start = float(f.readline().split()[-1])
        sent, latency = [], []
        for line in f:
            s, l = line.split()
            sent.append(start + int(s) / 1e6)
            latency.append(int(l) / 1000.0)
    width = statistics.median(e - s for s, e in scrapes)

    def window(begin):
        return latency[bisect.bisect_left(sent, begin):bisect.bisect_left(sent, begin + width)]

    scraped, between, pairs = [], [], []
    for (begin, end), (following, _) in zip(scrapes, scrapes[1:]):
        quiet = begin + every / 2
        if quiet < end or quiet + width > following:
            continue
        a, b = window(begin), window(quiet)
        if a and b:
            scraped += a
            between += b
            pairs.append((max(a), max(b)))
    if not pairs:
        return None
    n = len(pairs)
    above = sum(1 for a, b in pairs if a > b)
    below = sum(1 for a, b in pairs if a < b)
    # Two-sided sign test over the pairs that differ.
    k, m = min(above, below), above + below
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m) if m else 1.0

    def tails(values):
        return {"n": len(values), "p50": pct(values, 0.5), "p99": pct(values, 0.99),
                "p99_9": pct(values, 0.999), "max": max(values)}
    return {"width_ms": width * 1000, "pairs": n, "scraped_slower": above, "scraped_faster": below,
            "sign_test_p": p, "scraped": tails(scraped), "between": tails(between),
            "median_window_max_ms": {"scraped": statistics.median(a for a, _ in pairs),
                                     "between": statistics.median(b for _, b in pairs)}}


def describe_windows(w):
    s, b = w["scraped"], w["between"]
    return (f"sent in a scrape's first {w['width_ms']:.1f} ms (n={s['n']}): p50 {s['p50']:.2f}, p99 {s['p99']:.2f}, "
            f"p99.9 {s['p99_9']:.2f}, max {s['max']:.2f} ms; half a period later (n={b['n']}): p50 {b['p50']:.2f}, "
            f"p99 {b['p99']:.2f}, p99.9 {b['p99_9']:.2f}, max {b['max']:.2f} ms; slowest of the window: scraped "
            f"slower in {w['scraped_slower']} of {w['pairs']} pairs, faster in {w['scraped_faster']} "
            f"(sign test p = {w['sign_test_p']:.3f}), medians {w['median_window_max_ms']['scraped']:.2f} against "
            f"{w['median_window_max_ms']['between']:.2f} ms")


def metrics_alternated(a):
    """`metrics OLD NEW`: the builds take turns on one store, filled once, each under the same
    callback load while scraped, `--rounds` times, so that they share the machine's state of
    the moment."""
    for b in a.builds:
        if not os.path.exists(b):
            raise SystemExit(f"{b} missing")
    tmp = workdir()
    db = os.path.join(tmp, "exporter.db")
    out = {b: [] for b in a.builds}
    try:
        with storage(a, tmp) as store:
            with Exporter(db, store.args, bin=a.builds[0]) as ex:
                fill_domains(ex, a.domains)
            for _ in range(a.rounds):
                if a.unscraped:
                    log(f"{a.builds[0]}, not scraped:")
                    with Exporter(db, store.args, bin=a.builds[0]) as ex:
                        quiet = load(ex.url, "--domains", a.domains, "--rate", a.rate, "--duration", a.duration, "--concurrency", 32, server_pid=ex.pid, quiet=False)
                    log("callbacks, no scrape:", describe(quiet))
                    out.setdefault("unscraped", []).append(quiet)
                for b in a.builds:
                    log(f"{b}:")
                    store.reset_stats()
                    with Exporter(db, store.args, bin=b) as ex:
                        busy, during = scraped_load(ex, a)
                    stats = store.stats()
                    if stats:
                        log(f"  {store.what.split()[0]}: {stats}")
                    out[b].append({"scraping": busy, "scrapes_during": len(during), "store": stats,
                                   "scrape_during_ms": {"p50": pct(during, 0.5), "max": max(during)}})
        def tails(loads):
            return (", ".join(f"{s['latency_ms']['p99']:.2f}" for s in loads),
                    ", ".join(f"{s['latency_ms']['p99_9']:.2f}" for s in loads))
        if a.unscraped:
            log("not scraped: callbacks' p99 %s ms, p99.9 %s ms" % tails(out["unscraped"]))
        for b in a.builds:
            p99s, p999s = tails([r["scraping"] for r in out[b]])
            scrapes = ", ".join(f"{r['scrape_during_ms']['p50']:.0f}" for r in out[b])
            log(f"{b}: callbacks' p99 {p99s} ms, p99.9 {p999s} ms; scrapes' p50 {scrapes} ms")
            windows = [r["scraping"]["scrape_windows"] for r in out[b] if r["scraping"].get("scrape_windows")]
            if windows:
                log(f"{b}: sent during a scrape against between two, p99 " + ", ".join(
                    f"{w['scraped']['p99']:.2f}/{w['between']['p99']:.2f}" for w in windows) + " ms, p99.9 " + ", ".join(
                    f"{w['scraped']['p99_9']:.2f}/{w['between']['p99_9']:.2f}" for w in windows) + " ms; window's slowest "
                    "scraped slower in " + ", ".join(f"{w['scraped_slower']}/{w['pairs']}" for w in windows) + " pairs")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def cmd_metrics(a):
    if a.builds:
        return metrics_alternated(a)
    tmp = workdir()
    out = {}
    try:
        with storage(a, tmp) as store, Exporter(os.path.join(tmp, "exporter.db"), store.args) as ex:
            fill_domains(ex, a.domains)
            times, size = scrape_times(ex.url, a.scrapes, a.gzip)
            series = sum(1 for line in http_get(ex.url + "/metrics")[1].splitlines() if line and not line.startswith(b"#"))
            out["scrape_ms"] = {
                "p50": pct(times, 0.5), "p99": pct(times, 0.99), "max": max(times),
                "mean": statistics.mean(times), "bytes": size, "samples": series,
            }
            log(f"/metrics with {a.domains} domains: {size} bytes{' gzipped' if a.gzip else ''}, {series} samples; "
                f"p50 {pct(times, 0.5):.1f} ms, p99 {pct(times, 0.99):.1f} ms, max {max(times):.1f} ms over {a.scrapes} scrapes")

            quiet = load(ex.url, "--domains", a.domains, "--rate", a.rate, "--duration", a.duration, "--concurrency", 32, server_pid=ex.pid)
            log("callbacks, no scrape:", describe(quiet))
            busy, during = scraped_load(ex, a)
            out.update(quiet=quiet, scraping=busy, scrapes_during=len(during),
                       scrape_during_ms={"p50": pct(during, 0.5), "max": max(during)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def cmd_memory(a):
    tmp = workdir()
    db = os.path.join(tmp, "exporter.db")
    out = {}
    try:
        with storage(a, tmp) as store:
            memory_runs(a, db, store, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def memory_runs(a, db, store, out):
    """`memory` on `store`: idle, with `--streams` live streams, then restarts."""
    ex = Exporter(db, store.args).start()
    try:
        time.sleep(a.idle)
        out["idle_rss_mib"] = rss_mib(ex.pid)
        log(f"idle RSS after {a.idle} s: {out['idle_rss_mib']:.1f} MiB")
        s = load(ex.url, "--push-only", "--requests", a.streams, "--concurrency", 64, "--pid", ex.pid, server_pid=ex.pid)
        status, body = http_get(ex.url + "/metrics", timeout=60)
        live = sum(
            float(line.rsplit(b" ", 1)[1])
            for line in body.splitlines()
            if line.startswith(b"tencent_css_active_streams{")
        )
        time.sleep(2)
        out["live_streams"] = live
        out["live_rss_mib"] = rss_mib(ex.pid)
        out["load"] = s
        out["stored_mib"] = store.stored_mib()
        log(f"{live:.0f} live streams: RSS {out['live_rss_mib']:.1f} MiB (max during the load "
            f"{s['rss_mib']['max']:.1f} MiB), {store.what} {out['stored_mib']:.1f} MiB; load: {describe(s)}")
    finally:
        ex.stop()
    restarts = []
    for _ in range(a.restarts):
        ex = Exporter(db, store.args).start()
        restarts.append(ex.ready_seconds)
        rss_after = rss_mib(ex.pid)
        ex.stop()
        log(f"restart with {live:.0f} live streams stored: /readyz 200 after {ex.ready_seconds:.2f} s, RSS {rss_after:.1f} MiB")
    out["restart_ready_seconds"] = restarts
    out["restart_rss_mib"] = rss_after


def cmd_restart(a):
    """Restart readiness of several builds on one database, alternated so that they share the
    machine's state of the moment."""
    builds = a.builds or [BIN]
    for b in builds:
        if not os.path.exists(b):
            raise SystemExit(f"{b} missing")
    tmp = workdir()
    db = os.path.join(tmp, "exporter.db")
    out = {b: [] for b in builds}
    try:
        with Exporter(db, bin=builds[0]) as ex:
            load(ex.url, "--push-only", "--requests", a.streams, "--concurrency", 64, server_pid=ex.pid)
        for _ in range(a.rounds):
            for b in builds:
                copy = os.path.join(tmp, "copy.db")
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(copy + suffix):
                        os.remove(copy + suffix)
                    if os.path.exists(db + suffix):
                        shutil.copyfile(db + suffix, copy + suffix)
                ex = Exporter(copy, bin=b).start()
                rss = rss_mib(ex.pid)
                ex.stop()
                out[b].append({"ready_seconds": ex.ready_seconds, "rss_mib": rss})
                log(f"{b}: /readyz 200 after {ex.ready_seconds:.2f} s, RSS {rss:.1f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def cmd_silent(a):
    """Silent connections (connected, never a byte sent) take every slot of the connection cap;
    then callbacks are sent, each on a new connection, and timed. `--slow-body`: the connections
    send the head of a callback and the first byte of its body, never the rest (a slow POST)."""
    import socket

    tmp = workdir()
    out = {}
    try:
        extra = ["--web.max-connections", a.max_connections, "--web.read-header-timeout", a.header_timeout]
        with Exporter(os.path.join(tmp, "exporter.db"), extra=extra) as ex:
            silent = [socket.create_connection((HOST, EXPORTER_PORT)) for _ in range(a.connections)]
            if a.slow_body:
                for c in silent:
                    c.sendall(b"POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
            # Past the exporter's grace for idle connections and incomplete bodies (1 s).
            time.sleep(1.5 if a.slow_body else 0.5)
            times = []
            for _ in range(a.callbacks):
                s = load(ex.url, "--requests", 1, "--concurrency", 1, quiet=False)
                times.append(s["latency_ms"]["max"])
            for c in silent:
                c.close()
            out = {"answer_ms": times}
            log(f"{a.connections} {'slow-body' if a.slow_body else 'silent'} connections against a cap of {a.max_connections}: "
                f"{a.callbacks} callbacks answered after {', '.join(f'{t:.1f}' for t in times)} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def cmd_soak(a):
    tmp = workdir()
    db = os.path.join(tmp, "exporter.db")
    rows = []
    try:
        with Exporter(db, ["--callback.dedup-window", a.dedup_window]) as ex:
            wait_quiet()
            env = dict(os.environ, CSS_CALLBACK_KEY=KEY)
            cmd = [BIN, "load", "--target", ex.url + "/callback", "--json", "--rate", str(a.rate),
                   "--duration", a.duration, "--concurrency", "32", "--pid", str(ex.pid), "--progress", "60s"]
            log("$ CSS_CALLBACK_KEY=... " + " ".join(cmd[1:]))
            busy0, server0, generator = busy_seconds(), process_seconds(ex.pid), 0.0
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
            t0 = time.monotonic()
            while proc.poll() is None:
                try:
                    generator = process_seconds(proc.pid)
                except OSError:
                    pass
                rows.append((round(time.monotonic() - t0), rss_mib(ex.pid), db_mib(db), open_fds(ex.pid)))
                log(f"  {rows[-1][0]:>4} s  RSS {rows[-1][1]:7.1f} MiB  db {rows[-1][2]:7.1f} MiB  fds {rows[-1][3]}")
                for _ in range(int(a.every * 10)):
                    if proc.poll() is not None:
                        break
                    time.sleep(0.1)
            summary = json.loads(proc.stdout.read().strip().splitlines()[-1])
            rows.append((round(time.monotonic() - t0), rss_mib(ex.pid), db_mib(db), open_fds(ex.pid)))
            elapsed = time.monotonic() - t0
            server = process_seconds(ex.pid) - server0
            summary["cpu_cores"] = {
                "server": server / elapsed,
                "load_generator": generator / elapsed,
                "other": max(0.0, busy_seconds() - busy0 - server - generator) / elapsed,
            }
            log("soak:", describe(summary))
            log("  CPU used (cores): server {server:.2f}, load generator {load_generator:.2f}, "
                "other work {other:.2f}".format(**summary["cpu_cores"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.csv:
        with open(a.csv, "w") as f:
            f.write("seconds,rss_mib,db_mib,open_fds\n")
            for r in rows:
                f.write(f"{r[0]},{r[1]:.1f},{r[2]:.1f},{r[3]}\n")
    print(json.dumps({"load": summary, "samples": rows}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput", help="max rate of the bare HTTP stack and of the exporter")
    t.add_argument("--duration", default="60s")
    t.add_argument("--concurrency", default="64")
    t.add_argument("--pin", action="store_true",
                   help="load generator on the first CPU, servers on the rest (no CPU shared between them)")
    lat = sub.add_parser("latency", help="latency at a fixed (open-loop) rate")
    lat.add_argument("--rate", required=True)
    lat.add_argument("--duration", default="60s")
    lat.add_argument("--concurrency", default="64")
    lat.add_argument("--bare", action="store_true", help="also measure the bare HTTP stack at that rate")
    lat.add_argument("--domains", default="100", help="push domains the callbacks are spread over")
    m = sub.add_parser("metrics", help="/metrics time with many domains and its effect on callbacks")
    m.add_argument("--domains", default="1000")
    m.add_argument("--scrapes", type=int, default=200)
    m.add_argument("--rate", default="5000")
    m.add_argument("--duration", default="30s")
    m.add_argument("--scrape-every", type=float, default=0.0,
                   help="seconds between the starts of two scrapes during the callback load (0: back to back)")
    m.add_argument("--gzip", action="store_true", help="scrape with Accept-Encoding: gzip, as Prometheus does")
    m.add_argument("--redis", action="store_true", help="the exporter stores its state in a redis-server started for the run")
    m.add_argument("--rounds", type=int, default=3, help="with builds: turns each build takes")
    m.add_argument("--unscraped", action="store_true",
                   help="with builds: each round also runs the load without scrapes (first build), for reference")
    m.add_argument("builds", nargs="*", help="exporter binaries to alternate on one store, filled once "
                   "(only the load while scraped is run; default: one build, every step)")
    sc = sub.add_parser("scrapers", help="many clients scraping /metrics at once: scrapes answered, peak RSS")
    sc.add_argument("--domains", default="1000")
    sc.add_argument("--clients", type=int, default=32)
    sc.add_argument("--seconds", type=float, default=8.0)
    sc.add_argument("--gzip", action="store_true", help="scrape with Accept-Encoding: gzip, as Prometheus does")
    mem = sub.add_parser("memory", help="idle RSS, RSS with many live streams, restart readiness")
    mem.add_argument("--streams", default="1000000")
    mem.add_argument("--idle", type=float, default=10.0)
    mem.add_argument("--restarts", type=int, default=3)
    mem.add_argument("--redis", action="store_true", help="the exporter stores its state in a redis-server started for the run")
    r = sub.add_parser("restart", help="restart readiness of builds, alternated, on one database")
    r.add_argument("--streams", default="1000000")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("builds", nargs="*", help="exporter binaries (default: EXPORTER_BIN or the release build)")
    si = sub.add_parser("silent", help="callbacks while silent connections hold every slot")
    si.add_argument("--connections", type=int, default=1100)
    si.add_argument("--max-connections", default="1024")
    si.add_argument("--header-timeout", default="10s")
    si.add_argument("--callbacks", type=int, default=5)
    si.add_argument("--slow-body", action="store_true", help="the connections send a callback head and one byte of its body, never the rest")
    s = sub.add_parser("soak", help="unique events at a fixed rate; RSS, db size and fds sampled")
    s.add_argument("--duration", default="10m")
    s.add_argument("--rate", default="5000")
    s.add_argument("--every", type=float, default=10.0)
    s.add_argument("--dedup-window", default="1m")
    s.add_argument("--csv")
    a = p.parse_args()
    for path in (BIN,) + ((BARE,) if a.cmd in ("throughput", "latency") else ()):
        if not os.path.exists(path):
            raise SystemExit(f"{path} missing: cargo build --release && cargo build --release --example bare_server")
    {"throughput": cmd_throughput, "latency": cmd_latency, "metrics": cmd_metrics, "scrapers": cmd_scrapers,
     "memory": cmd_memory, "restart": cmd_restart, "silent": cmd_silent, "soak": cmd_soak}[a.cmd](a)


if __name__ == "__main__":
    main()
