"""What the benchmark runs in child processes, so that their memory and their GIL are their own.

``python -m bench.child scan DSN MEDIA``  one ``run_scan``; prints one JSON line: seconds, summary, peak RSS.
``python -m bench.child serve DSN MEDIA`` an ``Exporter`` on 127.0.0.1 with back-to-back file scans;
prints JSON lines: ``listening`` (port), then ``scan`` events with ``time.monotonic()`` stamps (the clock
is system-wide, so the parent can tell which scrapes overlapped a scan). Stops on SIGTERM or stdin EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import threading
import time
from typing import Any

from immich_thumbnail_exporter.config import Config, load_config


def peak_rss_bytes() -> int:
    """VmHWM of this process (the peak resident set), in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def config(dsn: str, media: str, extra: dict[str, Any] | None = None) -> Config:
    overrides: dict[str, Any] = {"media.root": media, "log.level": "warn"}
    overrides.update(extra or {})
    return load_config(None, environ={"DB_URL": dsn}, overrides=overrides)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except OSError:
        pass
    return out


class RssWatch(threading.Thread):
    """Samples the resident memory of this process and its children (the file walkers) every 20 ms:
    the peak of their sum, and the largest walker."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.peak_total = 0
        self.peak_child = 0

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.wait(0.02):
            kids = [_rss(c) for c in _children(me)]
            self.peak_child = max(self.peak_child, *kids, 0)
            self.peak_total = max(self.peak_total, _rss(me) + sum(kids))


async def scan(dsn: str, media: str, extra: dict[str, Any]) -> dict[str, Any]:
    from immich_thumbnail_exporter.findings import ProblemStore
    from immich_thumbnail_exporter.output.scan_report import summary
    from immich_thumbnail_exporter.scan.run import run_scan
    from immich_thumbnail_exporter.sources.postgres import PostgresSource

    cfg = config(dsn, media, extra)
    pg = PostgresSource(cfg.database)
    rss_before = peak_rss_bytes()
    watch = RssWatch()
    watch.start()
    try:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        result = await run_scan(pg, cfg, ProblemStore())
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        watch.stop.set()
        await pg.close()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "summary": summary(result),
        "entries": result.stats.entries if result.stats else 0,
        "peak_rss": peak_rss_bytes(),
        # The file walkers are this process's children (sampled: ru_maxrss would count the parent's
        # pages they share between fork and exec).
        "walker_peak_rss": watch.peak_child,
        "total_peak_rss": watch.peak_total,
        "walker_cpu_seconds": children.ru_utime + children.ru_stime,
        "rss_before_scan": rss_before,
    }


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def serve(dsn: str, media: str, extra: dict[str, Any]) -> None:
    from immich_thumbnail_exporter.app import Exporter
    from immich_thumbnail_exporter.exposition.webconfig import load_web_config

    # Back-to-back file scans: a long interval (it is also the scan's deadline), and the loop is woken as
    # soon as a scan ends. Inventory every 30 s, as it would be beside them.
    # Back to back for ``bench.scans`` scans after the first, then idle (the bench also scrapes the idle
    # exporter, to tell what the scans cost from what the scrapers and the machine cost).
    max_scans = int(extra.pop("bench.scans", 1000))
    cfg = config(dsn, media, {"intervals.files": "1h", "intervals.inventory": "30s", **extra})
    exporter = Exporter(cfg, load_web_config(None), "127.0.0.1", 0)
    files = next(c for c in exporter.runner.collections if c.name == "files")
    collect = files.collect
    scans = [0]

    async def timed() -> Any:
        start = time.monotonic()
        emit({"event": "scan_start", "t": start})
        try:
            return await collect()
        finally:
            end = time.monotonic()
            emit({"event": "scan_end", "t": end, "seconds": end - start})
            scans[0] += 1
            if scans[0] <= max_scans:
                exporter.runner._wake["files"].set()

    files.collect = timed  # type: ignore[method-assign]
    await exporter.start()
    emit({"event": "listening", "port": exporter.bound_port})
    # How late the event loop runs a 1 ms timer: what any request waits behind the loop's own work.
    lags: list[tuple[float, float]] = []

    async def probe() -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.001)
            lags.append((round(t0, 4), round(time.monotonic() - t0 - 0.001, 5)))

    prober = asyncio.create_task(probe())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stdin = sys.stdin.fileno()
    loop.add_reader(stdin, lambda: stop.set() if not os.read(stdin, 1) else None)  # EOF: the bench is done
    await stop.wait()
    prober.cancel()
    await exporter.stop()
    emit({"event": "stopped", "peak_rss": peak_rss_bytes(), "loop_lags": lags})


def main(argv: list[str]) -> int:
    mode, dsn, media = argv[:3]
    extra = json.loads(argv[3]) if len(argv) > 3 else {}
    if mode == "scan":
        emit(asyncio.run(scan(dsn, media, extra)))
    elif mode == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(dsn, media, extra))
    else:
        raise SystemExit(f"unknown mode {mode}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
