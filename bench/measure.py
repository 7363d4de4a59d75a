"""The measurements, each against a running embedded PostgreSQL holding a ``bench.dataset``.

Every timing is a wall-clock median of ``runs`` repetitions after one warm-up (the page cache is warm:
a scheduled scan of a live library finds it so too). Nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.dataset import DATABASE, Dataset
from immich_thumbnail_exporter.demo.embedded import EmbeddedPostgres
from immich_thumbnail_exporter.scan.file_sql import files_sql
from immich_thumbnail_exporter.scan.inventory import count, counts_sql
from immich_thumbnail_exporter.sources.postgres import APPLICATION_NAME
from immich_thumbnail_exporter.sources.schema import detect

ROOT = Path(__file__).resolve().parent.parent


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


# Another copy of the exporter package to measure instead of this one (``--exporter-path``: a before/after).
# Children run ``python -P``, so the working directory does not come before it on ``sys.path``.
EXPORTER_PATH: str | None = None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = (EXPORTER_PATH or "", str(ROOT), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return {k: v for k, v in env.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}


# -- correctness ------------------------------------------------------------------------------------


def _nonzero(missing: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {k: {r: n for r, n in v.items() if n} for k, v in missing.items()}


def without_sizes(expected: dict[str, Any]) -> dict[str, Any]:
    """What a scan with ``checks.file_sizes: false`` must report: no bytes, and no ``file_empty`` problems
    (an empty file still counts as a file on disk, as it does with sizes)."""
    want: dict[str, Any] = json.loads(json.dumps(expected))
    for reasons in want["missing"].values():
        want["problems"] -= reasons.pop("file_empty", 0)
    want["bytes"] = want["orphaned_bytes"] = None
    return want


def compare(
    summary: dict[str, Any], expected: dict[str, Any], verify_headers: bool = False, sizes: bool = True
) -> list[str]:
    """Differences between a scan's summary and what the dataset holds (empty: exact)."""
    diffs = []
    want = dict(expected) if sizes else without_sizes(expected)
    want_missing = _nonzero(want["missing"])
    if verify_headers and want["corrupt_with_verify_headers"]:
        want_missing["preview"]["file_corrupt"] = want["corrupt_with_verify_headers"]
        want["problems"] += want["corrupt_with_verify_headers"]
    for key, value in want.items():
        if key == "corrupt_with_verify_headers":
            continue
        got = summary.get(key)
        if key == "missing":
            got, value = _nonzero(got or {}), want_missing
        if got != value:
            diffs.append(f"{key}: got {got!r}, expected {value!r}")
    return diffs


# -- database side ----------------------------------------------------------------------------------


@dataclass
class Explain:
    seconds: float
    execution_ms: float
    shared_hit: int
    shared_read: int
    temp_read: int
    temp_written: int
    sorts: list[str]
    nodes: list[str]

    def brief(self) -> str:
        sort = "; ".join(self.sorts) or "no sort"
        temp = f", temp {self.temp_written * 8 // 1024} MiB written" if self.temp_written else ""
        return (f"{self.execution_ms / 1000:.2f}s exec, buffers hit {self.shared_hit:,} read {self.shared_read:,}"
                f"{temp}; {sort}")


def _walk_plan(node: dict[str, Any], sorts: list[str], nodes: list[str], depth: int = 0) -> None:
    name = node.get("Node Type", "?")
    if node.get("Relation Name"):
        name += f" on {node['Relation Name']}"
    if node.get("Index Name"):
        name += f" using {node['Index Name']}"
    nodes.append("  " * depth + name)
    if "Sort Method" in node:
        sorts.append(f"{node['Sort Method']} ({node.get('Sort Space Type', '?')} "
                     f"{int(node.get('Sort Space Used', 0)) // 1024} MiB)")
    for child in node.get("Plans", []):
        _walk_plan(child, sorts, nodes, depth + 1)


async def _scan_settings(conn: asyncpg.Connection) -> None:
    """The settings ``run_scan`` gives its transaction (see scan/run.py and sources/postgres.py)."""
    await conn.execute("SET LOCAL jit = off")
    await conn.execute("SET LOCAL work_mem = '64MB'")
    await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")


async def explain(conn: asyncpg.Connection, sql: str) -> Explain:
    t0 = time.perf_counter()
    raw = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")
    seconds = time.perf_counter() - t0
    doc = json.loads(raw)[0] if isinstance(raw, str) else raw[0]
    plan = doc["Plan"]
    sorts: list[str] = []
    nodes: list[str] = []
    _walk_plan(plan, sorts, nodes)
    return Explain(
        seconds=seconds,
        execution_ms=float(doc.get("Execution Time", 0.0)),
        shared_hit=int(plan.get("Shared Hit Blocks", 0)),
        shared_read=int(plan.get("Shared Read Blocks", 0)),
        temp_read=int(plan.get("Temp Read Blocks", 0)),
        temp_written=int(plan.get("Temp Written Blocks", 0)),
        sorts=sorts,
        nodes=nodes,
    )


async def copy_to_null(conn: asyncpg.Connection, sql: str) -> tuple[float, int]:
    """Run a query to completion through COPY, discarding the rows: (seconds, bytes)."""
    total = 0

    async def sink(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    t0 = time.perf_counter()
    await conn.copy_from_query(sql, output=sink)
    return time.perf_counter() - t0, total


@dataclass
class SqlFigures:
    inventory_seconds: float
    inventory_explain: Explain
    files_seconds: float
    files_explain: list[Explain]
    paths_seconds: float
    paths_bytes: int


def stream_sqls(schema: Any) -> list[str]:
    """The statements the file check streams (one today; the ordered-by-id plan may add more)."""
    from immich_thumbnail_exporter.scan import file_sql as files

    sqls = getattr(files, "stream_sqls", None)
    if sqls is not None:
        return list(sqls(schema))
    return [files_sql(schema)]


async def measure_sql(dsn: str, runs: int) -> SqlFigures:
    """Each query as the exporter runs it: in a read-only transaction with the scan's settings."""
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        schema = await detect(conn)
        inv = counts_sql(schema)
        streams = stream_sqls(schema)
        paths = "SELECT path FROM asset_file"
        inv_t, files_t, paths_t = [], [], []
        paths_bytes = 0
        for i in range(runs + 1):
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await _scan_settings(conn)
                t0 = time.perf_counter()
                await count(conn, schema, 600)
                t_inv = time.perf_counter() - t0
                t_files = 0.0
                for sql in streams:
                    t_files += (await copy_to_null(conn, sql))[0]
            t_paths, paths_bytes = await copy_to_null(conn, paths)
            if i:  # the first round warms the caches
                inv_t.append(t_inv)
                files_t.append(t_files)
                paths_t.append(t_paths)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await _scan_settings(conn)
            await conn.execute("SET LOCAL enable_hashjoin = off")  # as scan.inventory.count does
            inv_explain = await explain(conn, inv)
            files_explain = [await explain(conn, sql) for sql in streams]
    finally:
        await conn.close()
    return SqlFigures(median(inv_t), inv_explain, median(files_t), files_explain, median(paths_t), paths_bytes)


# -- the scan, watched from the database ------------------------------------------------------------


@dataclass
class Watch:
    """What the exporter's sessions did in PostgreSQL while it ran, sampled every 50 ms."""

    max_connections: int = 0
    lock_modes: set[str] = field(default_factory=set)
    waiting: int = 0
    blocking: int = 0
    samples: int = 0
    writer_ms: list[float] = field(default_factory=list)
    # CPU seconds of the exporter's PostgreSQL backends (sampled from /proc: same machine).
    backend_cpu: dict[int, float] = field(default_factory=dict)

    def brief(self) -> str:
        modes = ", ".join(sorted(self.lock_modes)) or "none seen"
        write = f"; Immich-style UPDATE+INSERT during scan: max {max(self.writer_ms):.1f} ms" if self.writer_ms else ""
        return (f"max {self.max_connections} connection(s); locks: {modes}; blocked others: {self.blocking}, "
                f"waited: {self.waiting}{write}")


async def watch(dsn: str, stop: asyncio.Event, out: Watch, write: bool = True) -> None:
    """Sample the exporter's sessions until ``stop``; every 200 ms also do what Immich does all day (update
    an asset, add a file row, in a transaction rolled back) and time it: our scan must never make it wait."""
    conn = await asyncpg.connect(dsn, timeout=30, server_settings={"application_name": "bench-monitor"})
    writer = await asyncpg.connect(dsn, timeout=30, server_settings={"application_name": "bench-immich"})
    try:
        victim = await writer.fetchval("SELECT id FROM asset ORDER BY id LIMIT 1")
        await _immich_write(writer, victim)  # warm-up: the first statement of a session plans and caches
        tick = 0
        while not stop.is_set():
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1", APPLICATION_NAME)
            out.samples += 1
            out.max_connections = max(out.max_connections, len(rows))
            if rows:
                pids = [r["pid"] for r in rows]
                for pid in pids:
                    cpu = _proc_cpu(pid)
                    if cpu is not None:
                        out.backend_cpu[pid] = cpu
                locks = await conn.fetch(
                    "SELECT l.mode, l.granted, coalesce(c.relname, l.locktype) AS what FROM pg_locks l "
                    "LEFT JOIN pg_class c ON c.oid = l.relation WHERE l.pid = ANY($1::int[])", pids,
                )
                for lock in locks:
                    what = str(lock["what"])
                    if what not in ("virtualxid", "transactionid") and not what.startswith("pg_"):
                        out.lock_modes.add(str(lock["mode"]))
                    if not lock["granted"]:
                        out.waiting += 1
                blocked = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pg_blocking_pids(pid) && $1::int[]", pids
                )
                out.blocking += int(blocked or 0)
                if write and victim is not None and tick % 4 == 0:
                    out.writer_ms.append(await _immich_write(writer, victim))
            tick += 1
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
        await writer.close()


def _proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _immich_write(writer: asyncpg.Connection, asset_id: Any) -> float:
    """What Immich does all day (update an asset, add a file row), rolled back: milliseconds taken."""
    t0 = time.perf_counter()
    tr = writer.transaction()
    await tr.start()
    try:
        await writer.execute('UPDATE asset SET "isFavorite" = NOT "isFavorite" WHERE id = $1', asset_id, timeout=10)
        await writer.execute(
            "INSERT INTO asset_file (\"assetId\", type, path) VALUES ($1, 'bench', '/dev/null')", asset_id, timeout=10
        )
        return (time.perf_counter() - t0) * 1000
    finally:
        await tr.rollback()


@dataclass
class ScanFigures:
    seconds: list[float]
    cpu_seconds: list[float]
    peak_rss: list[int]
    walker_peak_rss: list[int]
    total_peak_rss: list[int]
    walker_cpu_seconds: list[float]
    rss_before: int
    rows: int
    entries: int
    diffs: list[str]
    watch: Watch


async def _scan_once(dsn: str, media: str, extra: dict[str, Any], watch_it: bool) -> tuple[dict[str, Any], Watch]:
    stop = asyncio.Event()
    w = Watch()
    watcher = asyncio.create_task(watch(dsn, stop, w)) if watch_it else None
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "bench.child", "scan", dsn, media, json.dumps(extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
        )
        out, err = await proc.communicate()
    finally:
        stop.set()
        if watcher is not None:
            await watcher
    if proc.returncode != 0:
        raise RuntimeError(f"scan child failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1]), w


async def measure_scan(
    ds: Dataset, pg: EmbeddedPostgres, runs: int, extra: dict[str, Any] | None = None
) -> ScanFigures:
    dsn = pg.dsn_for(DATABASE)
    extra = extra or {}
    results = []
    w = Watch()
    for i in range(runs + 1):
        res, w_i = await _scan_once(dsn, str(ds.media), extra, watch_it=(i == runs))
        if i:
            results.append(res)
        if i == runs:
            w = w_i
    last = results[-1]
    expected = ds.manifest()["expected"]
    diffs = compare(last["summary"], expected, bool(extra.get("checks.verify_headers")),
                    extra.get("checks.file_sizes", True) is not False)
    return ScanFigures(
        seconds=[r["seconds"] for r in results],
        cpu_seconds=[r["cpu_seconds"] for r in results],
        peak_rss=[r["peak_rss"] for r in results],
        walker_peak_rss=[r.get("walker_peak_rss", 0) for r in results],
        total_peak_rss=[r.get("total_peak_rss", 0) for r in results],
        walker_cpu_seconds=[r.get("walker_cpu_seconds", 0.0) for r in results],
        rss_before=last["rss_before_scan"],
        rows=int(last["summary"].get("database_rows", 0)),
        entries=int(last["entries"]),
        diffs=diffs,
        watch=w,
    )


# -- the shell pipeline and the floor ---------------------------------------------------------------


def baseline_script(pg: EmbeddedPostgres, media: Path, out: Path) -> str:
    psql = pg.bin / "psql"
    return f"""set -euo pipefail
export LC_ALL=C
comm -23 \\
  <("{psql}" -X -At -h 127.0.0.1 -p {pg.port} -U {pg.user} -d {DATABASE} \\
      -c "COPY (SELECT path FROM asset_file) TO STDOUT" | sed 's#^/data/##' | sort) \\
  <(cd "{media}" && find thumbs -type f | sort) > "{out}"
"""


def measure_baseline(pg: EmbeddedPostgres, media: Path, runs: int) -> tuple[float, int]:
    """``psql | sort``, ``find | sort``, ``comm -23``: (median seconds, lines it printed)."""
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tmp:
        out = Path(tmp) / "missing.txt"
        script = baseline_script(pg, media, out)
        times = []
        for i in range(runs + 1):
            t0 = time.perf_counter()
            subprocess.run(["bash", "-c", script], check=True)
            if i:
                times.append(time.perf_counter() - t0)
        lines = sum(1 for _ in out.open("rb"))
    return median(times), lines


def list_dirs(top: bytes) -> tuple[int, int]:
    """``os.scandir`` of every directory, nothing else (no stat: ``is_dir`` reads the entry type)."""
    dirs = files = 0
    stack = [top]
    while stack:
        path = stack.pop()
        dirs += 1
        with os.scandir(path) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    files += 1
    return dirs, files


@dataclass
class FloorFigures:
    listing_seconds: float
    paths_seconds: float
    dirs: int
    files: int

    @property
    def total(self) -> float:
        return self.listing_seconds + self.paths_seconds


def measure_floor(ds: Dataset, paths_seconds: float, runs: int) -> FloorFigures:
    top = os.fsencode(ds.thumbs)
    times = []
    dirs = files = 0
    for i in range(runs + 1):
        t0 = time.perf_counter()
        dirs, files = list_dirs(top)
        if i:
            times.append(time.perf_counter() - t0)
    return FloorFigures(median(times), paths_seconds, dirs, files)


# -- /metrics under load during scans ---------------------------------------------------------------


@dataclass
class ScrapeFigures:
    during: list[float]
    outside: list[float]
    scans: int
    scan_seconds: list[float]
    errors: int
    scrapers: int
    pause: float
    loop_lag_during: list[float] = field(default_factory=list)
    loop_lag_outside: list[float] = field(default_factory=list)
    # The exporter's sessions while it served (file checks and the inventory collection together).
    watch: Watch = field(default_factory=Watch)


async def measure_scrapes(
    ds: Dataset,
    pg: EmbeddedPostgres,
    scrapers: int = 50,
    pause: float = 1.0,
    min_scans: int = 2,
    idle_seconds: float = 10.0,
    max_seconds: float = 180.0,
    max_requests: int = 100_000,
    extra: dict[str, Any] | None = None,
) -> ScrapeFigures:
    """``scrapers`` clients, each ``GET /metrics`` then a jittered pause, against an ``Exporter`` in a child
    process. After a first (warm-up) scan, ``min_scans`` scans run back to back, then the exporter idles
    for ``idle_seconds``: scrapes are sorted by whether they started during a scan. The child also
    reports its event loop's lag (how late a 1 ms timer fires), during and outside scans."""
    settings = {**(extra or {}), "bench.scans": min_scans}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "bench.child", "serve", pg.dsn_for(DATABASE), str(ds.media), json.dumps(settings),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(),
        limit=1 << 28,  # the last line carries every loop-lag sample
    )
    assert proc.stdout is not None and proc.stdin is not None
    windows: list[tuple[float, float]] = []
    open_at: list[float] = []
    port = 0
    samples: list[tuple[float, float]] = []
    lags: list[tuple[float, float]] = []
    errors = 0
    scans_done = asyncio.Event()
    listening = asyncio.Event()
    first_scan = asyncio.Event()

    async def events() -> None:
        nonlocal port
        assert proc.stdout is not None
        async for line in proc.stdout:
            ev = json.loads(line)
            if ev["event"] == "listening":
                port = int(ev["port"])
                listening.set()
            elif ev["event"] == "scan_start":
                open_at.append(float(ev["t"]))
            elif ev["event"] == "scan_end":
                windows.append((open_at[-1] if open_at else 0.0, float(ev["t"])))
                first_scan.set()
                if len(windows) >= min_scans + 1:
                    scans_done.set()
            elif ev["event"] == "stopped":
                lags.extend((float(t), float(lag)) for t, lag in ev.get("loop_lags", []))
        listening.set()
        first_scan.set()
        scans_done.set()

    reader = asyncio.create_task(events())
    watched = Watch()
    watch_stop = asyncio.Event()
    watcher = asyncio.create_task(watch(pg.dsn_for(DATABASE), watch_stop, watched, write=False))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listening.wait(), 60)
        if not port:
            raise RuntimeError("the exporter child did not start")
        url = f"http://127.0.0.1:{port}/metrics"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first_scan.wait(), max_seconds)
        stop_at = time.monotonic() + max_seconds
        stop = asyncio.Event()

        async def stopper() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(scans_done.wait(), max_seconds)
            await asyncio.sleep(idle_seconds)
            stop.set()

        connector = aiohttp.TCPConnector(limit=scrapers * 2)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def scraper(seed: int) -> None:
                nonlocal errors
                rng = random.Random(seed)
                await asyncio.sleep(rng.uniform(0, pause))
                while not stop.is_set() and time.monotonic() < stop_at and len(samples) < max_requests:
                    t0 = time.monotonic()
                    try:
                        async with session.get(url) as resp:
                            await resp.read()
                            ok = resp.status == 200
                    except (aiohttp.ClientError, TimeoutError):
                        ok = False
                    t1 = time.monotonic()
                    if ok:
                        samples.append((t0, t1 - t0))
                    else:
                        errors += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), rng.uniform(0.5 * pause, 1.5 * pause))

            stopping = asyncio.create_task(stopper())
            await asyncio.gather(*(scraper(n) for n in range(scrapers)))
            await stopping
    finally:
        watch_stop.set()
        with contextlib.suppress(Exception):
            await watcher
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 5)
    scans = windows[1:]
    t_first = windows[0][1] if windows else 0.0

    def during_scan(t: float) -> bool:
        return any(a <= t <= b for a, b in scans)

    during = [lat for t0, lat in samples if during_scan(t0)]
    outside = [lat for t0, lat in samples if not during_scan(t0)]
    lag_during = [lag for t0, lag in lags if t0 > t_first and during_scan(t0)]
    lag_outside = [lag for t0, lag in lags if t0 > t_first and not during_scan(t0)]
    return ScrapeFigures(during, outside, len(scans), [b - a for a, b in scans], errors, scrapers, pause,
                         lag_during, lag_outside, watched)


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = await fn()
    return time.perf_counter() - t0, value
