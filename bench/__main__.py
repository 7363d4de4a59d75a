"""``python -m bench``: build (once) and measure a synthetic Immich of 10k, 100k and 1M assets.

    python -m bench                         # 10k, 100k, 1M
    python -m bench --quick                 # 10k and 100k only
    python -m bench --sizes 2000 --runs 1   # any sizes

Prints one table (and writes it as JSON with ``--json FILE``). Data is cached under ``bench/.cache/``;
``--rebuild`` builds it again, ``--clean`` deletes the cache and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import CACHE, measure
from bench.dataset import DATABASE, open_dataset
from bench.measure import (
    measure_baseline,
    measure_floor,
    measure_scan,
    measure_scrapes,
    measure_sql,
    median,
    percentile,
)

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    ds = open_dataset(n, Path(args.cache), rebuild=args.rebuild, log=log)
    manifest = ds.manifest()
    pg = ds.postgres()
    pg.start()
    out: dict[str, Any] = {"n": n, "directories": manifest["directories"], "files": manifest["files"],
                           "database_bytes": manifest["database_bytes"], "load_before": loadavg()}
    try:
        dsn = pg.dsn_for(DATABASE)
        log(f"[{n:,}] SQL alone")
        sql = asyncio.run(measure_sql(dsn, args.runs))
        out["sql"] = asdict(sql)
        log(f"[{n:,}] full scan (child process) x{args.runs}")
        scan = asyncio.run(measure_scan(ds, pg, args.runs))
        out["scan"] = asdict(scan)
        out["scan"]["watch"]["lock_modes"] = sorted(scan.watch.lock_modes)
        if scan.diffs:
            log(f"[{n:,}] COUNTS DIFFER from the dataset:\n  " + "\n  ".join(scan.diffs))
        log(f"[{n:,}] full scan without sizes (checks.file_sizes: false) x{args.runs}")
        quick = asyncio.run(measure_scan(ds, pg, args.runs, {"checks.file_sizes": False}))
        out["scan_nosizes"] = asdict(quick)
        out["scan_nosizes"]["watch"]["lock_modes"] = sorted(quick.watch.lock_modes)
        if quick.diffs:
            log(f"[{n:,}] COUNTS DIFFER from the dataset (no sizes):\n  " + "\n  ".join(quick.diffs))
        log(f"[{n:,}] shell pipeline")
        base, lines = measure_baseline(pg, ds.media, args.runs)
        out["baseline"] = {"seconds": base, "lines": lines}
        log(f"[{n:,}] floor")
        floor = measure_floor(ds, sql.paths_seconds, args.runs)
        out["floor"] = asdict(floor) | {"total": floor.total}
        if not args.no_scrapes:
            # Enough scans back to back for a few hundred scrapes during them, whatever the size.
            scans = max(args.scrape_scans, math.ceil(args.scrape_seconds / max(median(scan.seconds), 0.05)))
            log(f"[{n:,}] /metrics with {args.scrapers} scrapers during {scans} scans")
            scr = asyncio.run(measure_scrapes(ds, pg, scrapers=args.scrapers, pause=args.pause,
                                              min_scans=scans, idle_seconds=args.idle_seconds))
            out["scrapes"] = {
                "count": len(scr.during), "p50_ms": percentile(scr.during, 50) * 1000,
                "p99_ms": percentile(scr.during, 99) * 1000, "max_ms": max(scr.during, default=0) * 1000,
                "outside_count": len(scr.outside), "outside_p50_ms": percentile(scr.outside, 50) * 1000,
                "outside_p99_ms": percentile(scr.outside, 99) * 1000,
                "lag_p99_ms": percentile(scr.loop_lag_during, 99) * 1000,
                "lag_max_ms": max(scr.loop_lag_during, default=0) * 1000,
                "lag_outside_p99_ms": percentile(scr.loop_lag_outside, 99) * 1000,
                "scans": scr.scans, "scan_seconds": scr.scan_seconds, "errors": scr.errors,
                "scrapers": scr.scrapers, "pause": scr.pause,
                "max_connections": scr.watch.max_connections, "lock_modes": sorted(scr.watch.lock_modes),
                "blocking": scr.watch.blocking,
            }
        out["load_after"] = loadavg()
    finally:
        pg.stop()
    return out


def fmt_s(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    cols = [f"{r['n']:,} assets" for r in results]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn: Any) -> None:
        vals = []
        for r in results:
            try:
                vals.append(fn(r))
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                vals.append("-")
        rows.append((label, vals))

    def scan_s(r: dict[str, Any]) -> float:
        return median(r["scan"]["seconds"])

    row("database rows / files on disk / dirs",
        lambda r: f"{r['scan']['rows']:,} / {r['files']:,} / {r['directories']:,}")
    row("full scan (run_scan), s", lambda r: fmt_s(scan_s(r)))
    row("  rows/s", lambda r: f"{r['scan']['rows'] / scan_s(r):,.0f}")
    row("  files/s", lambda r: f"{r['files'] / scan_s(r):,.0f}")
    row("  CPU s: exporter + walkers + PostgreSQL",
        lambda r: f"{fmt_s(median(r['scan']['cpu_seconds']))} + {fmt_s(median(r['scan']['walker_cpu_seconds']))}"
                  f" + {fmt_s(sum(r['scan']['watch']['backend_cpu'].values()))}")
    row("  µs per asset", lambda r: f"{scan_s(r) / r['n'] * 1e6:.1f}")
    row("  peak RSS, MB: all processes (exporter; largest walker)",
        lambda r: f"{max(r['scan']['total_peak_rss']) / 1e6:.0f} ({max(r['scan']['peak_rss']) / 1e6:.0f}; "
                  f"{max(r['scan']['walker_peak_rss']) / 1e6:.0f})")
    row("  counts match the dataset", lambda r: "yes" if not r["scan"]["diffs"] else f"NO ({len(r['scan']['diffs'])})")
    def quick_s(r: dict[str, Any]) -> float:
        return median(r["scan_nosizes"]["seconds"])

    row("full scan, checks.file_sizes: false (no lstat), s", lambda r: fmt_s(quick_s(r)))
    row("  CPU s: exporter + walkers + PostgreSQL",
        lambda r: f"{fmt_s(median(r['scan_nosizes']['cpu_seconds']))} + "
                  f"{fmt_s(median(r['scan_nosizes']['walker_cpu_seconds']))}"
                  f" + {fmt_s(sum(r['scan_nosizes']['watch']['backend_cpu'].values()))}")
    row("  counts match the dataset (less sizes)",
        lambda r: "yes" if not r["scan_nosizes"]["diffs"] else f"NO ({len(r['scan_nosizes']['diffs'])})")
    row("inventory SQL alone, s", lambda r: fmt_s(r["sql"]["inventory_seconds"]))
    row("file-stream SQL alone (COPY to null), s", lambda r: fmt_s(r["sql"]["files_seconds"]))
    row("shell pipeline (psql|sort, find|sort, comm), s", lambda r: fmt_s(r["baseline"]["seconds"]))
    row("  scan / pipeline (without sizes)",
        lambda r: f"{scan_s(r) / r['baseline']['seconds']:.2f}x ({quick_s(r) / r['baseline']['seconds']:.2f}x)")
    row("floor: list dirs + read paths, s",
        lambda r: f"{fmt_s(r['floor']['listing_seconds'])} + {fmt_s(r['floor']['paths_seconds'])}"
                  f" = {fmt_s(r['floor']['total'])}")
    row("  scan / floor (without sizes)",
        lambda r: f"{scan_s(r) / r['floor']['total']:.2f}x ({quick_s(r) / r['floor']['total']:.2f}x)")
    row("/metrics p50 / p99 during scans, ms",
        lambda r: f"{r['scrapes']['p50_ms']:.1f} / {r['scrapes']['p99_ms']:.1f} (n={r['scrapes']['count']:,})")
    row("  same, exporter idle, ms",
        lambda r: f"{r['scrapes']['outside_p50_ms']:.1f} / {r['scrapes']['outside_p99_ms']:.1f} "
                  f"(n={r['scrapes']['outside_count']:,})")
    row("  event-loop lag p99 during scans / idle, ms",
        lambda r: f"{r['scrapes']['lag_p99_ms']:.1f} / {r['scrapes']['lag_outside_p99_ms']:.1f}")
    row("PostgreSQL connections, max seen: scan / serve",
        lambda r: f"{r['scan']['watch']['max_connections']} / {r.get('scrapes', {}).get('max_connections', '-')}")
    def locks(r: dict[str, Any]) -> str:
        serve = r.get("scrapes", {})
        modes = sorted(set(r["scan"]["watch"]["lock_modes"]) | set(serve.get("lock_modes", [])))
        return f"{', '.join(modes) or '-'} / {r['scan']['watch']['blocking'] + serve.get('blocking', 0)}"

    row("locks held / sessions blocked by them", locks)
    row("Immich-style write during scan, p50 / max ms",
        lambda r: f"{median(r['scan']['watch']['writer_ms']):.1f} / {max(r['scan']['watch']['writer_ms']):.1f}")
    row("load average before / after", lambda r: f"{r['load_before'].split()[0]} / {r['load_after'].split()[0]}")

    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(c), *(len(v[i]) for _, v in rows)) for i, c in enumerate(cols)]
    lines = ["| " + " | ".join(["measure".ljust(width0), *(c.rjust(w) for c, w in zip(cols, widths, strict=True))])
             + " |"]
    lines.append("|" + "|".join(["-" * (width0 + 2), *("-" * (w + 1) + ":" for w in widths)]) + "|")
    for label, vals in rows:
        lines.append("| " + " | ".join([label.ljust(width0), *(v.rjust(w) for v, w in zip(vals, widths, strict=True))])
                     + " |")
    return "\n".join(lines)


def explain_notes(results: list[dict[str, Any]]) -> str:
    out = []
    for r in results:
        sql = r["sql"]
        inv = sql["inventory_explain"]
        out.append(f"{r['n']:,} assets:")
        out.append(f"  inventory EXPLAIN: {inv['execution_ms'] / 1000:.2f}s exec, buffers hit "
                   f"{inv['shared_hit']:,} read {inv['shared_read']:,}; {'; '.join(inv['sorts']) or 'no sort'}")
        for e in sql["files_explain"]:
            temp = f", temp written {e['temp_written'] * 8 // 1024} MiB" if e["temp_written"] else ""
            out.append(f"  file stream EXPLAIN: {e['execution_ms'] / 1000:.2f}s exec, buffers hit "
                       f"{e['shared_hit']:,} read {e['shared_read']:,}{temp}; "
                       f"{'; '.join(e['sorts']) or 'no sort'}; plan: {' > '.join(n.strip() for n in e['nodes'][:6])}")
        s = r.get("scrapes")
        if s:
            out.append(f"  /metrics: {s['scrapers']} scrapers pausing ~{s['pause']:g}s, {s['count']:,} scrapes "
                       f"during {s['scans']} scan(s) of {', '.join(f'{x:.1f}s' for x in s['scan_seconds'])}: "
                       f"max {s['max_ms']:.1f} ms, errors {s['errors']}; event loop lag max {s['lag_max_ms']:.1f} ms")
        if r["scan"]["diffs"]:
            out.extend("  DIFF " + d for d in r["scan"]["diffs"])
        if r.get("scan_nosizes", {}).get("diffs"):
            out.extend("  DIFF (no sizes) " + d for d in r["scan_nosizes"]["diffs"])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated asset counts (default 10000,100000,1000000)")
    parser.add_argument("--quick", action="store_true", help="10k and 100k only")
    parser.add_argument("--runs", type=int, default=3, help="timed repetitions after a warm-up (median reported)")
    parser.add_argument("--scrapers", type=int, default=50)
    parser.add_argument("--pause", type=float, default=1.0, help="each scraper's pause between requests, seconds")
    parser.add_argument("--scrape-scans", type=int, default=2, help="scans to scrape through (at least)")
    parser.add_argument("--scrape-seconds", type=float, default=15.0,
                        help="scan time to scrape through (at least; more scans at small sizes)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="keep scraping the idle exporter this long after the scans (the baseline)")
    parser.add_argument("--no-scrapes", action="store_true", help="skip the /metrics latency measurement")
    parser.add_argument("--cache", default=str(CACHE), help="where datasets are kept")
    parser.add_argument("--rebuild", action="store_true", help="build the datasets again")
    parser.add_argument("--clean", action="store_true", help="delete the dataset cache and exit")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--exporter-path", metavar="DIR",
                        help="measure the exporter package found in DIR instead (e.g. an older version "
                             "from 'git archive <rev> exporter | tar -x -C DIR'); SQL figures stay this one's")
    args = parser.parse_args(argv)
    if args.exporter_path:
        measure.EXPORTER_PATH = os.path.abspath(args.exporter_path)
    if args.clean:
        shutil.rmtree(args.cache, ignore_errors=True)
        log(f"removed {args.cache}")
        return 0
    if args.sizes:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    else:
        sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    started = time.time()
    results = [measure_size(n, args) for n in sizes]
    cpus = os.cpu_count()
    print(f"\nimmich-thumbnail-exporter benchmark, {cpus} CPU(s), Python {sys.version.split()[0]}, "
          f"medians of {args.runs} run(s), {time.time() - started:.0f}s in all\n")
    print(table(results))
    print()
    print(explain_notes(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": cpus, "results": results}, indent=1, default=str))
    bad = [r["n"] for r in results if r["scan"]["diffs"] or r.get("scan_nosizes", {}).get("diffs")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
