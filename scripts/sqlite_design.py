#!/usr/bin/env python3
"""Compares the SQLite write cost per event of the exporter's schema (rows upserted and deleted in
B-trees keyed by stream and by sequence) with an append-only event journal, committing batches
like the ledger does. Python's sqlite3, so absolute rates are lower than the exporter's; the
ratio and the WAL bytes per event are what it is for (see BENCHMARKS.md).

    scripts/sqlite_design.py [EVENTS=200000] [BATCH=64] [CACHE_SIZE=-2000]
"""
import os, random, sqlite3, sys, tempfile, time

N_EVENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
BATCH = int(sys.argv[2]) if len(sys.argv) > 2 else 64
CACHE = sys.argv[3] if len(sys.argv) > 3 else "-2000"

CURRENT = """
CREATE TABLE sessions (app TEXT NOT NULL, appname TEXT NOT NULL, stream_id TEXT NOT NULL,
  sequence TEXT NOT NULL, area TEXT NOT NULL, since INTEGER NOT NULL,
  PRIMARY KEY (app, appname, stream_id)) WITHOUT ROWID;
CREATE TABLE delivered (sequence TEXT NOT NULL, event_type INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
  PRIMARY KEY (sequence, event_type)) WITHOUT ROWID;
CREATE INDEX delivered_expiry ON delivered (expires_ms);
CREATE TABLE series (metric TEXT NOT NULL, labels TEXT NOT NULL, value INTEGER NOT NULL, sum_ms INTEGER,
  buckets TEXT, PRIMARY KEY (metric, labels)) WITHOUT ROWID;
"""
JOURNAL = """
CREATE TABLE journal (id INTEGER PRIMARY KEY, event_type INTEGER NOT NULL, app TEXT NOT NULL,
  appname TEXT NOT NULL, stream_id TEXT NOT NULL, sequence INTEGER NOT NULL, area INTEGER NOT NULL,
  at_ms INTEGER NOT NULL, errcode INTEGER, push_duration_ms INTEGER);
CREATE TABLE series (metric TEXT NOT NULL, labels TEXT NOT NULL, value INTEGER NOT NULL, sum_ms INTEGER,
  buckets TEXT, PRIMARY KEY (metric, labels)) WITHOUT ROWID;
"""

def events(seed=1):
    rnd = random.Random(seed)
    pending = []
    k = 0
    out = []
    while len(out) < N_EVENTS:
        # half of each batch: new pushes; the other half: disconnects of earlier pushes
        for _ in range(BATCH // 2):
            seq = rnd.getrandbits(63)
            s = (f"push{k % 100}.load.example.com", "live", f"load_abc_{k}", seq)
            out.append(("push", s)); pending.append(s); k += 1
        for _ in range(BATCH // 2):
            if pending:
                out.append(("disconnect", pending.pop(0)))
    return out[:N_EVENTS]

def run(design):
    d = tempfile.mkdtemp()
    c = sqlite3.connect(os.path.join(d, "x.db"), isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=NORMAL")
    c.execute(f"PRAGMA cache_size={CACHE}")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.executescript(CURRENT if design == "current" else JOURNAL)
    evs = events()
    frames = 0
    t0 = time.perf_counter()
    now = 1_700_000_000_000
    for i in range(0, len(evs), BATCH):
        c.execute("BEGIN IMMEDIATE")
        for kind, (app, appname, sid, seq) in evs[i:i + BATCH]:
            if design == "current":
                if kind == "push":
                    c.execute("INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?)", (app, appname, sid, str(seq), "mainland", now))
                else:
                    c.execute("DELETE FROM sessions WHERE app=? AND appname=? AND stream_id=?", (app, appname, sid))
                c.execute("INSERT OR REPLACE INTO delivered VALUES (?,?,?)", (str(seq), 1 if kind == "push" else 0, now + 3_600_000))
            else:
                c.execute("INSERT INTO journal (event_type, app, appname, stream_id, sequence, area, at_ms, errcode, push_duration_ms) VALUES (?,?,?,?,?,?,?,?,?)",
                          (1 if kind == "push" else 0, app, appname, sid, seq, 1, now, None if kind == "push" else 1, None if kind == "push" else 128581))
        # the series a batch touches: a few counters and histograms
        for j in range(8):
            c.execute("INSERT OR REPLACE INTO series VALUES (?,?,?,?,?)", ("pushes_total", f'["push{(i + j) % 100}.load.example.com","mainland"]', i, None, None))
        c.execute("COMMIT")
        if (i // BATCH) % 200 == 199:
            frames += (os.path.getsize(os.path.join(d, "x.db-wal")) - 32) // 4120
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        now += 1
    frames += max(0, os.path.getsize(os.path.join(d, "x.db-wal")) - 32) // 4120
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    el = time.perf_counter() - t0
    size = os.path.getsize(os.path.join(d, "x.db"))
    print(f"{design:8} batch {BATCH:4} cache {CACHE:>7}: {len(evs) / el:8.0f} events/s, "
          f"{frames / len(evs):.3f} WAL pages/event ({frames * 4096 / len(evs):.0f} B/event), db {size / 2**20:.1f} MiB")

for design in ("current", "journal"):
    run(design)
