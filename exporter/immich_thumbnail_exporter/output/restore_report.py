"""The restore report (``report``): what an operator writes by hand after a restore test, from one scan,
the queue, the remediation ledger and Immich's own integrity report.

``cli/report.py`` gathers plain data into a ``RestoreData``; this module turns it into the figures every
rendering shows (``sections``) and renders Markdown; ``restore_report_html.py`` renders the same figures
as one HTML file. A source that could not be read is said so in its section: a figure is never made up.
Everything that came from the database or Redis (ids, paths, reasons) is escaped by the renderer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from immich_thumbnail_exporter.output.scan_report import (
    Space,
    by_filesystem,
    human_bytes,
    human_duration,
    needed_bytes,
    summary,
)
from immich_thumbnail_exporter.scan.run import ScanResult
from immich_thumbnail_exporter.vocabulary import KINDS, REASONS

__all__ = ["RestoreData", "Space", "needed_bytes", "write_markdown"]


@dataclass(frozen=True)
class JobTimes:
    """The job Immich queued for an attempt, as BullMQ still has it (None fields: not recorded there)."""

    job_id: str
    state: str  # waiting, active, completed, failed, gone (removed once finished, as Immich does)
    added: float | None = None
    started: float | None = None
    finished: float | None = None
    failed_reason: str | None = None


@dataclass(frozen=True)
class FileNow:
    kind: str
    size: int | None  # None: present but not sized (unreadable)


@dataclass(frozen=True)
class AssetHistory:
    """One asset of the remediation ledger, its attempts and how it is now."""

    asset_id: str
    state: str  # the ledger's: submitted, fixed, still_missing, not_queued, gave_up, error, ...
    attempts: int
    first_requested: float | None
    last_requested: float | None
    request_outcome: str | None  # accepted, rejected, error, not_queued, fixed, ...
    detail: str | None
    job: JobTimes | None  # the last attempt's job; None when the ledger names none
    last_checked: float | None
    fixed_at: float | None
    why: str | None  # why it is still broken, as the ledger recorded it
    gave_up_reason: str | None
    # How it is now (a targeted check in this report's run); None when it could not be checked.
    files_now: list[FileNow] | None = None
    broken_now: list[tuple[str, str]] | None = None  # (kind, reason)
    exists_now: bool | None = None


@dataclass(frozen=True)
class OrphanJob:
    job_id: str
    asset_id: str
    state: str


@dataclass
class QueueReport:
    """The thumbnail queue now. ``error``: it could not be read (the other fields are then empty)."""

    error: str | None = None
    workers: int | None = None  # None: CLIENT LIST refused
    counts: dict[str, int] = field(default_factory=dict)
    paused: bool = False
    oldest_waiting_age: float | None = None
    orphans: list[OrphanJob] = field(default_factory=list)
    jobs_checked: int = 0
    truncated: bool = False


@dataclass(frozen=True)
class Check:
    """One thing the report looked at: what, how, and what came of it."""

    what: str
    how: str
    result: str
    ok: bool


@dataclass
class RestoreData:
    generated_at: float
    scan: ScanResult | None
    scan_error: str | None = None
    # scan_report.summary()'s view of the thumbnail queue's finish rate (Throughput | str | None).
    throughput: Any = None
    spaces: list[Space] | None = None  # None: no media root
    queue: QueueReport | None = None  # None: Redis not configured
    ledger: list[AssetHistory] | None = None  # None: no ledger in the state directory
    ledger_note: str = ""
    integrity: dict[tuple[str, str], int] | None = None  # None: not Immich v3, or unreadable
    integrity_newest: float | None = None
    integrity_note: str = ""
    # Face thumbnails by reason, once the scan reports them; None: not reported.
    person_missing: dict[str, int] | None = None
    checks: list[Check] = field(default_factory=list)


# -- figures -------------------------------------------------------------------------------------------


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def problems_by_kind_reason(s: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(k, r): n for k in KINDS for r in REASONS if (n := s["missing"][k].get(r))}


def complete_assets(result: ScanResult) -> int:
    total = sum(result.counts.assets.values())
    broken = len({p.asset_id for p in result.problems})
    return total - broken


def fixed_after_retry(ledger: list[AssetHistory]) -> list[AssetHistory]:
    return [a for a in ledger if a.state == "fixed" and a.attempts > 1]


def still_broken(ledger: list[AssetHistory]) -> list[AssetHistory]:
    return [a for a in ledger if a.state != "fixed"]


def attempt_times(ledger: list[AssetHistory]) -> list[tuple[float, str]]:
    """Every recorded moment of the ledger (request, job start and finish, fix), for the timeline chart."""
    out: list[tuple[float, str]] = []
    for a in ledger:
        if a.first_requested is not None:
            out.append((a.first_requested, "requested"))
        if a.last_requested is not None and a.attempts > 1:
            out.append((a.last_requested, "requested"))
        if a.fixed_at is not None:
            out.append((a.fixed_at, "fixed"))
    return sorted(out)


def why_broken(a: AssetHistory) -> str:
    if a.exists_now is False:
        return "the asset is no longer in the database"
    parts = []
    if a.broken_now:
        parts.append(", ".join(f"{k} {r}" for k, r in a.broken_now))
    reason = a.gave_up_reason or a.why or a.detail
    if reason:
        parts.append(reason)
    return "; ".join(parts) or "not checked"


def timeline(a: AssetHistory) -> list[tuple[str, str]]:
    """The asset's recorded moments, in order: (what, detail)."""
    rows: list[tuple[str, str]] = []
    if a.first_requested is not None:
        rows.append(("first requested", when(a.first_requested)))
    if a.attempts > 1 and a.last_requested is not None:
        rows.append((f"requested again (attempt {a.attempts})", when(a.last_requested)))
    # The ledger keeps each asset's last outcome, not one per attempt: a request's answer shows until the
    # check that follows replaces it. Immich's API answers 204 to an accepted request.
    outcome = a.request_outcome or "-"
    if outcome == "accepted":
        rows.append(("request", "accepted by Immich (HTTP 204)"))
    else:
        rows.append(("last outcome", outcome))
    if a.job is None:
        rows.append(("job", "none recorded in the ledger"))
    else:
        j = a.job
        rows.append(("job queued", f"{j.job_id} at {when(j.added)}" if j.added else f"{j.job_id}"))
        if j.state == "gone":
            rows.append(("job", "finished and removed by BullMQ (Immich keeps no finished job): times not kept"))
        else:
            rows.append(("job started", when(j.started)))
            rows.append(("job finished", when(j.finished) + (f" ({j.failed_reason})" if j.failed_reason else "")))
    if a.last_checked is not None:
        rows.append(("checked", when(a.last_checked)))
    if a.fixed_at is not None:
        rows.append(("fixed", when(a.fixed_at)))
    rows.append(("files now", files_after(a)))
    if a.state != "fixed":
        rows.append(("why", why_broken(a)))
    return rows


def files_after(a: AssetHistory) -> str:
    if a.exists_now is False:
        return "asset not in the database"
    if a.files_now is None and a.broken_now is None:
        return "not checked"
    # "written" only where regeneration fixed the asset: elsewhere a sound file may be the restored one.
    verb = "written" if a.state == "fixed" else "present"
    parts = [f"{f.kind} {verb}" + (f" ({human_bytes(f.size)})" if f.size is not None else "")
             for f in a.files_now or []]
    parts += [f"{k} {r}" for k, r in a.broken_now or []]
    return ", ".join(parts) or "no thumbnail-type file"


# -- Markdown -------------------------------------------------------------------------------------------


def md(text: object) -> str:
    """Text from the database or Redis, safe in a Markdown table cell or line: no markup, no HTML."""
    s = str(text)
    for ch in "\\`*_[]<>|~":
        s = s.replace(ch, "\\" + ch)
    return " ".join(s.split())


def write_markdown(data: RestoreData, out: TextIO) -> None:
    w = out.write
    w("# Immich restore report\n\n")
    w(f"Generated {when(data.generated_at)} by immich-thumbnail-exporter.\n\n")
    _summary(data, w)
    _capacity(data, w)
    _regeneration(data, w)
    _queues(data, w)
    _integrity(data, w)
    _checks(data, w)


def _summary(data: RestoreData, w: Any) -> None:
    w("## 1. Summary\n\n")
    if data.scan is None:
        w(f"The scan could not run: {md(data.scan_error or 'unknown error')}. No figure below comes from it.\n\n")
        return
    s = summary(data.scan, data.throughput)
    total = sum(s["assets"].values())
    w(f"- Immich {md(s['immich_version'] or 'version unknown')}, database schema {md(s['schema'])}\n")
    w(f"- Assets that should have thumbnails: **{total}** ({s['assets'].get('image', 0)} images, "
      f"{s['assets'].get('video', 0)} videos)\n")
    w(f"- Complete (no missing or broken file): **{complete_assets(data.scan)}**\n")
    w(f"- Problem files: **{data.scan.problems.total}** in "
      f"{len({p.asset_id for p in data.scan.problems})} assets\n")
    orig = s.get("originals_missing")
    w(f"- Originals checked: {'yes' if orig is not None else 'no'}"
      + (f", {orig} missing (regeneration cannot fix those)" if orig is not None else "") + "\n")
    if data.person_missing is not None:
        w(f"- Face thumbnails missing or broken: {sum(data.person_missing.values())}"
          + "".join(f", {md(r)} {n}" for r, n in data.person_missing.items() if n) + "\n")
    w("\n| problem | " + " | ".join(KINDS) + " |\n|---|" + "---:|" * len(KINDS) + "\n")
    for reason in REASONS:
        cells = [s["missing"][k].get(reason) for k in KINDS]
        w(f"| {reason} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |\n")
    w("\n")


def _capacity(data: RestoreData, w: Any) -> None:
    w("## 2. Capacity\n\n")
    stats = data.scan.stats if data.scan is not None else None
    if stats is not None and stats.sizes_known:
        w("| kind | files on disk | bytes on disk |\n|---|---:|---:|\n")
        for k in KINDS:
            w(f"| {k} | {stats.files[k]} | {human_bytes(stats.bytes[k])} |\n")
        w("\n")
        need = needed_bytes(data.scan) if data.scan is not None else None
        w(f"- Needed to regenerate every missing file: **{human_bytes(need or 0)}** "
          "(each kind's mean size on disk times the files of that kind missing)\n")
    elif stats is not None:
        w("- Sizes not read (checks.file_sizes is off): bytes on disk and bytes needed are unknown\n")
    elif data.scan is None:
        w("- No file check (the database could not be read): bytes on disk and bytes needed are unknown\n")
    else:
        w("- No file check (no media root): bytes on disk and bytes needed are unknown\n")
    if data.spaces is None:
        w("- Free space: unknown (no media root)\n")
    elif not data.spaces:
        w("- Free space: no storage folder could be measured\n")
    else:
        for folders, sp in by_filesystem(data.spaces):
            w(f"- Free under {', '.join(md(f) + '/' for f in folders)}: **{human_bytes(sp.avail_bytes)}** of "
              f"{human_bytes(sp.size_bytes)}" + (" (one filesystem)" if len(folders) > 1 else "") + "\n")
    if data.scan is not None:
        est = summary(data.scan, data.throughput)["regeneration"]["estimate"]
        if est["jobs"] == 0 and not est["backlog"]:
            w("- Nothing is left that regeneration can fix, and no thumbnail job is waiting\n")
        elif est["seconds"] is None:
            w(f"- Throughput and ETA: {md(est['basis'])}\n")
        else:
            w(f"- Observed throughput: {est['rate_per_second']:g} thumbnail jobs/s ({md(est['basis'])})\n")
            w(f"- ETA to regenerate {est['jobs']} asset(s): about {human_duration(est['seconds'])}\n")
    w("\n")


def _regeneration(data: RestoreData, w: Any) -> None:
    w("## 3. Regeneration\n\n")
    if data.ledger is None:
        w(f"{md(data.ledger_note or 'No remediation ledger: nothing was regenerated through the exporter.')}\n\n")
        return
    ledger = data.ledger
    fixed = [a for a in ledger if a.state == "fixed"]
    w(f"{len(ledger)} asset(s) in the ledger: {len(fixed)} fixed, {len(still_broken(ledger))} not fixed.\n\n")
    retried = fixed_after_retry(ledger)
    if retried:
        w("### Fixed only after several attempts\n\n| asset | attempts | fixed |\n|---|---:|---|\n")
        for a in retried:
            w(f"| {md(a.asset_id)} | {a.attempts} | {when(a.fixed_at)} |\n")
        w("\n")
    broken = still_broken(ledger)
    if broken:
        w("### Still broken\n\n| asset | state | attempts | why |\n|---|---|---:|---|\n")
        for a in broken:
            w(f"| {md(a.asset_id)} | {md(a.state)} | {a.attempts} | {md(why_broken(a))} |\n")
        w("\n")
    w("### Every asset's timeline\n\n")
    for a in ledger:
        w(f"**{md(a.asset_id)}**: {md(a.state)}, {a.attempts} attempt(s)\n\n")
        for what, detail in timeline(a):
            w(f"- {what}: {md(detail)}\n")
        w("\n")


def _queues(data: RestoreData, w: Any) -> None:
    w("## 4. Queues\n\n")
    q = data.queue
    if q is None:
        w("Redis is not configured: the queues were not looked at.\n\n")
        return
    if q.error is not None:
        w(f"The thumbnail queue could not be read: {md(q.error)}.\n\n")
        return
    workers = "unknown (CLIENT LIST refused)" if q.workers is None else str(q.workers)
    waiting = sum(q.counts.get(s, 0) for s in ("waiting", "prioritized", "paused", "delayed"))
    w(f"- Thumbnail queue: {workers} worker(s), {waiting} waiting, {q.counts.get('active', 0)} active, "
      f"{q.counts.get('failed', 0)} failed{', PAUSED' if q.paused else ''}\n")
    age = "-" if q.oldest_waiting_age is None else human_duration(q.oldest_waiting_age)
    w(f"- Oldest waiting job: {age}\n")
    if q.orphans:
        w(f"\n{len(q.orphans)} job(s) name assets that are not in this database. That is expected after "
          "restoring an older database: the jobs were queued before the backup was restored over; Immich "
          "ends each with \"not found\" and nothing else happens.\n\n| job | asset | state |\n|---|---|---|\n")
        for o in q.orphans:
            w(f"| {md(o.job_id)} | {md(o.asset_id)} | {md(o.state)} |\n")
    else:
        w("- No job names an asset missing from the database\n")
    if q.truncated:
        w(f"\n(Only the first {q.jobs_checked} waiting or active jobs were looked at for orphans.)\n")
    w("\n")


def _integrity(data: RestoreData, w: Any) -> None:
    w("## 5. Immich's integrity report beside ours\n\n")
    if data.integrity is None:
        w(f"{md(data.integrity_note or 'Not available.')}\n\n")
        return
    ours: dict[str, int] = {}
    if data.scan is not None and data.scan.stats is not None:
        ours = {k: data.scan.stats.missing[(k, "file_missing")] for k in KINDS}
    w(f"Immich's newest entry: {when(data.integrity_newest)}\n\n| type | kind | Immich | exporter |\n"
      "|---|---|---:|---:|\n")
    for (typ, kind), n in sorted(data.integrity.items()):
        mine = str(ours[kind]) if typ == "missing_file" and kind in ours else "-"
        w(f"| {md(typ)} | {md(kind)} | {n} | {mine} |\n")
    w("\nThe two differ by design: Immich's counts are from its last scheduled check, the exporter's from "
      "this report's scan (docs/immich-integrity.md).\n\n")


def _checks(data: RestoreData, w: Any) -> None:
    w("## 6. What was checked and how\n\n| what | how | result |\n|---|---|---|\n")
    for c in data.checks:
        w(f"| {md(c.what)} | {md(c.how)} | {'' if c.ok else '**not reachable** '}{md(c.result)} |\n")
    w("\n")
