"""The ``scan`` report: a summary, then the problem assets, as a table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from immich_thumbnail_exporter.findings import FolderSpace, Problem, ProblemStore, Throughput
from immich_thumbnail_exporter.scan.run import ScanResult
from immich_thumbnail_exporter.vocabulary import KINDS, PERSON_KIND, PERSON_REASONS, REASONS

PROBLEM_FIELDS = (
    "asset_id", "owner_id", "asset_type", "kind", "reason", "path", "original_path", "original_exists",
)


def by_filesystem(spaces: Sequence[FolderSpace]) -> list[tuple[list[str], FolderSpace]]:
    """Folders grouped by the filesystem holding them (first-seen order): one free-space figure each."""
    groups: dict[int, tuple[list[str], FolderSpace]] = {}
    for s in spaces:
        key = s.device or -len(groups) - 1  # unknown device: its own group
        if key in groups:
            groups[key][0].append(s.folder)
        else:
            groups[key] = ([s.folder], s)
    return list(groups.values())


def needed_bytes(result: ScanResult) -> int | None:
    """Bytes regenerating every missing file takes: each kind's mean file size on disk times the files of
    that kind missing (a kind with no file on disk yet has no mean and counts 0). None without sizes."""
    stats = result.stats
    if stats is None or not stats.sizes_known:
        return None
    missing: Counter[str] = Counter()
    for kind, n in result.counts.no_record.items():
        missing[kind] += n
    for (kind, reason), n in stats.missing.items():
        if reason != "no_record":
            missing[kind] += n
    total = 0.0
    for kind in KINDS:
        if stats.files[kind] > 0:
            total += stats.bytes[kind] / stats.files[kind] * missing[kind]
    return round(total)


def capacity(result: ScanResult, spaces: Sequence[FolderSpace] | None) -> dict[str, Any]:
    """Bytes needed to regenerate what is missing, beside the free space of each storage folder.

    ``spaces`` None: not measured (no media root), so ``free_bytes`` is null rather than empty."""
    return {
        "bytes_needed": needed_bytes(result),
        "free_bytes": None if spaces is None else {s.folder: s.avail_bytes for s in spaces},
        "size_bytes": None if spaces is None else {s.folder: s.size_bytes for s in spaces},
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def regeneration_review(problems: ProblemStore | Sequence[Problem]) -> dict[str, Any]:
    """What regeneration can and cannot fix, by reason, in problems and in assets.

    An asset whose original is gone cannot be fixed in any of its kinds; ``file_unreadable`` means the
    exporter cannot read the file (permissions, a symlink out of the media folder), which regeneration
    does not change. Everything else is fixable by asking Immich to regenerate the asset: one job per asset.
    """
    # Iterated twice (a ProblemStore re-reads its spill file): never all problems in memory at once.
    # Face thumbnails (kind person) are people, not assets: ``regenerate --kind person`` remakes them.
    lost = {p.asset_id for p in problems if p.original_exists is False and p.kind != PERSON_KIND}
    can: Counter[str] = Counter()
    original_missing: Counter[str] = Counter()
    unreadable: Counter[str] = Counter()
    assets_can: set[str] = set()
    assets_unreadable: set[str] = set()
    unchecked = 0
    for p in problems:
        if p.kind == PERSON_KIND:
            continue
        if p.asset_id in lost:
            original_missing[p.reason] += 1
        elif p.reason == "file_unreadable":
            unreadable[p.reason] += 1
            assets_unreadable.add(p.asset_id)
        else:
            can[p.reason] += 1
            assets_can.add(p.asset_id)
            if p.original_exists is None:
                unchecked += 1
    return {
        "can_fix_by_reason": {r: can[r] for r in REASONS if can[r]},
        "cannot_fix_by_reason": {
            "original_missing": {r: original_missing[r] for r in REASONS if original_missing[r]},
            "unreadable_by_exporter": {r: unreadable[r] for r in REASONS if unreadable[r]},
        },
        "assets": {
            "can_fix": len(assets_can),
            "original_missing": len(lost),
            "unreadable_by_exporter": len(assets_unreadable - assets_can),
        },
        # no_record problems: the scan does not look at their originals, so a few may still be lost.
        "can_fix_original_not_checked": unchecked,
    }


def regeneration_estimate(jobs: int, throughput: Throughput | str | None) -> dict[str, Any]:
    """How long regenerating ``jobs`` assets should take at the thumbnail queue's observed finish rate.

    ``throughput`` is None when Redis is not configured, a string when it could not be read.
    """
    out: dict[str, Any] = {"jobs": jobs, "backlog": None, "rate_per_second": None, "seconds": None}
    if throughput is None:
        out["basis"] = "unknown: Redis is not configured, so the thumbnail queue's finish rate is not known"
        return out
    if isinstance(throughput, str):
        out["basis"] = f"unknown: {throughput}"
        return out
    out["backlog"] = throughput.backlog
    rate = throughput.rate
    if rate is None:
        out["basis"] = ("unknown: fewer than two thumbnail jobs finished in the queue's recent events "
                        f"({throughput.completed} seen)")
        return out
    out["rate_per_second"] = round(rate, 3)
    out["seconds"] = round((jobs + throughput.backlog) / rate, 1)
    age = throughput.last_completed_age
    out["basis"] = (
        f"{throughput.completed} thumbnail jobs finished over {throughput.window_seconds:.0f}s"
        + (f", the last {age:.0f}s ago" if age is not None else "")
        + f"; {throughput.backlog} job(s) already queued ahead"
    )
    return out


def human_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def summary(result: ScanResult, throughput: Throughput | str | None = None) -> dict[str, Any]:
    counts, stats = result.counts, result.stats
    missing: dict[str, dict[str, int]] = {k: {} for k in KINDS}
    for kind, n in counts.no_record.items():  # the kinds Immich's "Missing" rule judges on this schema
        missing[kind]["no_record"] = n
    if stats is not None:
        for kind in KINDS:
            for reason in REASONS[1:]:
                if reason != "file_empty" or stats.sizes_known:
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
    review = regeneration_review(result.problems)
    out["regeneration"].update(review)
    out["regeneration"]["estimate"] = regeneration_estimate(review["assets"]["can_fix"], throughput)
    if stats is not None:
        out["files"] = {k: stats.files[k] for k in KINDS}
        # null without sizes (checks.file_sizes: false): not read, rather than 0.
        out["bytes"] = {k: stats.bytes[k] for k in KINDS} if stats.sizes_known else None
        out["orphaned_files"] = stats.orphaned_files
        out["orphaned_bytes"] = stats.orphaned_bytes if stats.sizes_known else None
        out["paths_refused"] = sum(stats.refused.values())
        out["originals_missing"] = stats.originals_missing
        out["database_rows"] = stats.rows
        out["person_thumbnails_missing"] = {
            r: stats.person_missing[r] for r in PERSON_REASONS if r != "file_empty" or stats.sizes_known
        }
    return out


def write_json(
    result: ScanResult, out: TextIO, throughput: Throughput | str | None = None,
    spaces: Sequence[FolderSpace] | None = None,
) -> None:
    head = summary(result, throughput)
    head["capacity"] = capacity(result, spaces)
    doc = {"summary": head, "problems": [p.to_dict() for p in result.problems]}
    json.dump(doc, out, indent=2)
    out.write("\n")


def write_review(regen: dict[str, Any], out: TextIO) -> None:
    """The post-restore capacity review: what regeneration can fix, what not, and how long it would take."""
    w = out.write

    def by_reason(counts: dict[str, int]) -> str:
        return ", ".join(f"{r} {n}" for r, n in counts.items()) or "none"

    assets = regen["assets"]
    w("\nPost-restore review:\n")
    w(f"  Regeneration can fix {assets['can_fix']} asset(s) ({by_reason(regen['can_fix_by_reason'])})\n")
    cannot = regen["cannot_fix_by_reason"]
    lost = cannot["original_missing"]
    if assets["original_missing"]:
        w(f"  Cannot fix {assets['original_missing']} asset(s) whose original is missing ({by_reason(lost)}): "
          "restore the originals from a backup\n")
    if assets["unreadable_by_exporter"]:
        w(f"  {assets['unreadable_by_exporter']} asset(s) unreadable by the exporter "
          f"({by_reason(cannot['unreadable_by_exporter'])}): check permissions and symlinks\n")
    if regen["can_fix_original_not_checked"]:
        w(f"  {regen['can_fix_original_not_checked']} fixable problem(s) have no row at all; their originals "
          "were not checked (regenerate checks them first)\n")
    est = regen["estimate"]
    if est["seconds"] is None:
        w(f"  Time to regenerate: {est['basis']}\n")
    else:
        w(f"  Time to regenerate: about {human_duration(est['seconds'])} ({est['jobs']} job(s) at "
          f"{est['rate_per_second']:g} jobs/s; {est['basis']})\n")


def write_capacity(cap: dict[str, Any], out: TextIO, spaces: Sequence[FolderSpace] | None) -> None:
    need = cap["bytes_needed"]
    out.write("  Needed to regenerate every missing file: "
              + ("unknown (sizes not read)" if need is None else human_bytes(need)) + "\n")
    free = cap["free_bytes"]
    if free is None:
        return
    if not free:
        out.write("  Free space: no storage folder could be measured\n")
        return
    out.write("  Free space: " + "; ".join(
        f"{', '.join(f + '/' for f in folders)} {human_bytes(s.avail_bytes)} of {human_bytes(s.size_bytes)}"
        for folders, s in by_filesystem(spaces or [])) + "\n")


def write_csv(problems: Iterable[Problem], out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(PROBLEM_FIELDS)
    for p in problems:
        d = p.to_dict()
        writer.writerow(["" if d[f] is None else d[f] for f in PROBLEM_FIELDS])


def write_table(
    result: ScanResult, out: TextIO, max_rows: int | None = None, throughput: Throughput | str | None = None,
    spaces: Sequence[FolderSpace] | None = None,
) -> None:
    s = summary(result, throughput)
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
        sized = s["bytes"] is not None
        on_disk = ", ".join(
            f"{k} {s['files'][k]}" + (f" ({human_bytes(s['bytes'][k])})" if sized else "") for k in KINDS
        )
        w(f"On disk: {on_disk}" + ("" if sized else " (sizes not read: checks.file_sizes is off)") + "\n")
        orphaned = f" ({human_bytes(s['orphaned_bytes'])})" if sized else ""
        w(f"Orphaned under thumbs/: {s['orphaned_files']} files{orphaned}\n")
        if s["paths_refused"]:
            w(f"Paths refused (outside the media location or with '..'): {s['paths_refused']}\n")
        if s["originals_missing"] is not None:
            w(f"Originals missing: {s['originals_missing']}\n")
        faces = s["person_thumbnails_missing"]
        if any(faces.values()):
            w(f"Face (person) thumbnails missing or broken: {sum(faces.values())} ("
              + ", ".join(f"{r} {n}" for r, n in faces.items() if n) + "): regenerate --kind person remakes them\n")
    regen = s["regeneration"]
    w(f"Regeneration can fix {regen['can_fix']} problem(s); {regen['cannot_fix_original_missing']} have no "
      "original file and need a restore from backup\n")
    write_review(s["regeneration"], out)
    write_capacity(capacity(result, spaces), out, spaces)
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
