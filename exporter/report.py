"""The ``scan`` report: a summary, then the problem assets, as a table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable
from typing import Any, TextIO

from exporter.inventory import RECORD_KINDS
from exporter.model import KINDS, REASONS, Problem
from exporter.scanner import ScanResult

PROBLEM_FIELDS = (
    "asset_id", "owner_id", "asset_type", "kind", "reason", "path", "original_path", "original_exists",
)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def summary(result: ScanResult) -> dict[str, Any]:
    counts, stats = result.counts, result.stats
    missing: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    for kind in RECORD_KINDS:
        missing[kind]["no_record"] = counts.no_record[kind]
    if stats is not None:
        for kind in KINDS:
            for reason in REASONS[1:]:
                missing[kind][reason] = stats.missing[(kind, reason)]
    fixable = unfixable = 0
    for problem in result.problems:
        if problem.original_exists is False:
            unfixable += 1
        else:
            fixable += 1
    out: dict[str, Any] = {
        "scanned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(result.started_at)),
        "duration_seconds": round(result.duration, 3),
        "schema": counts.schema,
        "immich_version": counts.version,
        "media_root": result.root,
        "media_location": result.location,
        "assets": dict(counts.assets),
        "missing": missing,
        "thumbhash_missing": counts.thumbhash_missing,
        "metadata_pending": counts.metadata_pending,
        "problems": result.problems.total,
        "regeneration": {"can_fix": fixable, "cannot_fix_original_missing": unfixable},
    }
    if stats is not None:
        out["files"] = {k: stats.files[k] for k in KINDS}
        out["bytes"] = {k: stats.bytes[k] for k in KINDS}
        out["orphaned_files"] = stats.orphaned_files
        out["orphaned_bytes"] = stats.orphaned_bytes
        out["paths_refused"] = sum(stats.refused.values())
        out["originals_missing"] = stats.originals_missing
        out["database_rows"] = stats.rows
    return out


def write_json(result: ScanResult, out: TextIO) -> None:
    doc = {"summary": summary(result), "problems": [p.to_dict() for p in result.problems]}
    json.dump(doc, out, indent=2)
    out.write("\n")


def write_csv(problems: Iterable[Problem], out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(PROBLEM_FIELDS)
    for p in problems:
        d = p.to_dict()
        writer.writerow(["" if d[f] is None else d[f] for f in PROBLEM_FIELDS])


def write_table(result: ScanResult, out: TextIO, max_rows: int | None = None) -> None:
    s = summary(result)
    w = out.write
    version = s["immich_version"] or "unknown version"
    w(f"Immich thumbnail scan, {s['scanned_at']} ({version}, schema {s['schema']}), "
      f"took {s['duration_seconds']:.1f}s\n")
    if result.root:
        w(f"Media root {result.root} (stored paths under {result.location})\n")
    else:
        w("No media root configured: database checks only (set media.root to check files)\n")
    w(f"\nAssets that should have thumbnails: {s['assets']['image']} images, {s['assets']['video']} videos\n\n")
    w(f"{'problem':<18}" + "".join(f"{k:>12}" for k in KINDS) + "\n")
    for reason in REASONS:
        cells = []
        for kind in KINDS:
            value = s["missing"][kind].get(reason)
            cells.append(f"{'-' if value is None else value:>12}")
        w(f"{reason:<18}" + "".join(cells) + "\n")
    w(f"\nThumbhash missing: {s['thumbhash_missing']}    "
      f"no asset_job_status row (Immich's Missing skips them): {s['metadata_pending']}\n")
    if "files" in s:
        on_disk = ", ".join(f"{k} {s['files'][k]} ({human_bytes(s['bytes'][k])})" for k in KINDS)
        w(f"On disk: {on_disk}\n")
        w(f"Orphaned under thumbs/: {s['orphaned_files']} files ({human_bytes(s['orphaned_bytes'])})\n")
        if s["paths_refused"]:
            w(f"Paths refused (outside the media location or with '..'): {s['paths_refused']}\n")
        if s["originals_missing"] is not None:
            w(f"Originals missing: {s['originals_missing']}\n")
    regen = s["regeneration"]
    w(f"Regeneration can fix {regen['can_fix']} problem(s); {regen['cannot_fix_original_missing']} have no "
      "original file and need a restore from backup\n")
    total = result.problems.total
    w(f"\nProblem assets: {total}\n")
    if not total:
        return
    buf = io.StringIO()
    header = ("ASSET", "TYPE", "KIND", "REASON", "ORIGINAL", "PATH")
    buf.write(f"{header[0]:<36}  {header[1]:<5}  {header[2]:<9}  {header[3]:<15}  {header[4]:<8}  {header[5]}\n")
    for shown, p in enumerate(result.problems):
        if max_rows is not None and shown >= max_rows:
            buf.write(f"... {total - shown} more (use --format json or csv for all)\n")
            break
        original = {True: "ok", False: "MISSING", None: "?"}[p.original_exists]
        buf.write(f"{p.asset_id:<36}  {p.asset_type:<5}  {p.kind:<9}  {p.reason:<15}  {original:<8}  "
                  f"{p.path or '-'}\n")
    w(buf.getvalue())
