"""The restore report as one self-contained HTML file: inline CSS and SVG charts, no script, no network.

The same figures as the Markdown rendering (``restore_report``), in the same order. Every text that came
from the database or Redis goes through ``html.escape``.
"""

from __future__ import annotations

import html
from typing import Any, TextIO

from immich_thumbnail_exporter.output.restore_report import (
    AssetHistory,
    RestoreData,
    attempt_times,
    complete_assets,
    files_after,
    fixed_after_retry,
    needed_bytes,
    problems_by_kind_reason,
    still_broken,
    timeline,
    when,
    why_broken,
)
from immich_thumbnail_exporter.output.scan_report import by_filesystem, human_bytes, human_duration, summary
from immich_thumbnail_exporter.vocabulary import KINDS, REASONS

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:70em;color:#1d2733;
padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #dde3ea;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #dde3ea;padding:.25em .6em;text-align:left}
td.n,th.n{text-align:right}th{background:#f2f5f8}.down{color:#b00020;font-weight:600}
.id{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
details{margin:.3em 0}summary{cursor:pointer}svg text{font:12px system-ui,sans-serif;fill:#1d2733}
.key{display:inline-block;width:.8em;height:.8em;margin:0 .3em 0 1em;vertical-align:-.05em}
"""
COLORS = {"no_record": "#8a63d2", "file_missing": "#d9534f", "file_empty": "#f0ad4e", "file_corrupt": "#e36f9b",
          "file_unreadable": "#5b8def", "requested": "#5b8def", "fixed": "#2e9d57"}


def e(text: object) -> str:
    return html.escape(str(text), quote=True)


def write_html(data: RestoreData, out: TextIO) -> None:
    parts: list[str] = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>Immich restore report {e(when(data.generated_at))}</title><style>{CSS}</style></head><body>",
        "<h1>Immich restore report</h1>",
        f"<p>Generated {e(when(data.generated_at))} by immich-thumbnail-exporter.</p>",
    ]
    parts += _summary(data)
    parts += _capacity(data)
    parts += _regeneration(data)
    parts += _queues(data)
    parts += _integrity(data)
    parts += _checks(data)
    parts.append("</body></html>\n")
    out.write("\n".join(parts))


def _table(header: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f'<th{" class=n" if i in numeric else ""}>{e(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def problems_chart(counts: dict[tuple[str, str], int]) -> str:
    """Horizontal stacked bars: one per kind, one segment per reason."""
    if not counts:
        return "<p>No problem found.</p>"
    width, bar, gap, left = 640, 24, 10, 90
    biggest = max(sum(n for (k, _), n in counts.items() if k == kind) for kind in KINDS) or 1
    scale = (width - left - 60) / biggest
    rows = []
    for i, kind in enumerate(KINDS):
        y = 10 + i * (bar + gap)
        rows.append(f'<text x="0" y="{y + 16}">{e(kind)}</text>')
        x = float(left)
        for reason in REASONS:
            n = counts.get((kind, reason), 0)
            if not n:
                continue
            w = n * scale
            rows.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{COLORS[reason]}">'
                        f"<title>{e(kind)} {e(reason)}: {n}</title></rect>")
            x += w
        total = sum(counts.get((kind, r), 0) for r in REASONS)
        rows.append(f'<text x="{x + 6:.1f}" y="{y + 16}">{total}</text>')
    height = 10 + len(KINDS) * (bar + gap)
    legend = "".join(f'<span class="key" style="background:{COLORS[r]}"></span>{e(r)}'
                     for r in REASONS if any(rr == r for (_, rr) in counts))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="Problems by kind and reason" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">' + "".join(rows) + "</svg>"
            f"<div>{legend}</div>")


def attempts_chart(ledger: list[AssetHistory]) -> str:
    """Requests and fixes over time: one mark per recorded moment, requests above, fixes below."""
    moments = attempt_times(ledger)
    if not moments:
        return ""
    width, height, left, right = 640, 110, 20, 20
    t0, t1 = moments[0][0], moments[-1][0]
    span = max(t1 - t0, 1.0)
    marks = []
    for t, what in moments:
        x = left + (t - t0) / span * (width - left - right)
        y = 30 if what == "requested" else 70
        marks.append(f'<circle cx="{x:.1f}" cy="{y}" r="5" fill="{COLORS[what]}" fill-opacity="0.7">'
                     f"<title>{e(what)} {e(when(t))}</title></circle>")
    axis = (f'<line x1="{left}" y1="95" x2="{width - right}" y2="95" stroke="#8895a3"/>'
            f'<text x="{left}" y="108">{e(when(t0))}</text>'
            f'<text x="{width - right}" y="108" text-anchor="end">{e(when(t1))}</text>'
            f'<text x="{left}" y="14">requested</text><text x="{left}" y="54">fixed</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="Attempts over time" width="{width}" '
            f'height="{height + 5}" viewBox="0 0 {width} {height + 5}">{axis}{"".join(marks)}</svg>')


def _summary(data: RestoreData) -> list[str]:
    out = ["<h2>1. Summary</h2>"]
    if data.scan is None:
        why = e(data.scan_error or "unknown error")
        return [*out, f'<p class="down">The scan could not run: {why}. No figure below comes from it.</p>']
    s = summary(data.scan, data.throughput)
    total = sum(s["assets"].values())
    orig = s.get("originals_missing")
    items = [
        f"Immich {e(s['immich_version'] or 'version unknown')}, database schema {e(s['schema'])}",
        f"Assets that should have thumbnails: <b>{total}</b> ({s['assets'].get('image', 0)} images, "
        f"{s['assets'].get('video', 0)} videos)",
        f"Complete (no missing or broken file): <b>{complete_assets(data.scan)}</b>",
        f"Problem files: <b>{data.scan.problems.total}</b> in {len({p.asset_id for p in data.scan.problems})} assets",
        "Originals checked: " + ("no" if orig is None else f"yes, {orig} missing (regeneration cannot fix those)"),
    ]
    if data.person_missing is not None:
        items.append(f"Face thumbnails missing or broken: {sum(data.person_missing.values())} ("
                     + ", ".join(f"{e(r)} {n}" for r, n in data.person_missing.items() if n) + ")")
    out.append("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
    rows = [[e(r), *("-" if s["missing"][k].get(r) is None else str(s["missing"][k][r]) for k in KINDS)]
            for r in REASONS]
    out.append(_table(["problem", *KINDS], rows, {1, 2, 3}))
    out.append(problems_chart(problems_by_kind_reason(s)))
    return out


def _capacity(data: RestoreData) -> list[str]:
    out = ["<h2>2. Capacity</h2>"]
    stats = data.scan.stats if data.scan is not None else None
    items = []
    if stats is not None and stats.sizes_known and data.scan is not None:
        out.append(_table(["kind", "files on disk", "bytes on disk"],
                          [[e(k), str(stats.files[k]), e(human_bytes(stats.bytes[k]))] for k in KINDS], {1, 2}))
        items.append(f"Needed to regenerate every missing file: <b>{e(human_bytes(needed_bytes(data.scan) or 0))}</b> "
                     "(each kind's mean size on disk times the files of that kind missing)")
    elif stats is not None:
        items.append("Sizes not read (checks.file_sizes is off): bytes on disk and bytes needed are unknown")
    elif data.scan is None:
        items.append("No file check (the database could not be read): bytes on disk and bytes needed are unknown")
    else:
        items.append("No file check (no media root): bytes on disk and bytes needed are unknown")
    if data.spaces is None:
        items.append("Free space: unknown (no media root)")
    elif not data.spaces:
        items.append('<span class="down">Free space: no storage folder could be measured</span>')
    for folders, sp in by_filesystem(data.spaces or []):
        items.append(f"Free under {e(', '.join(f + '/' for f in folders))}: <b>{e(human_bytes(sp.avail_bytes))}</b>"
                     f" of {e(human_bytes(sp.size_bytes))}" + (" (one filesystem)" if len(folders) > 1 else ""))
    if data.scan is not None:
        est = summary(data.scan, data.throughput)["regeneration"]["estimate"]
        if est["jobs"] == 0 and not est["backlog"]:
            items.append("Nothing is left that regeneration can fix, and no thumbnail job is waiting")
        elif est["seconds"] is None:
            items.append(f"Throughput and ETA: {e(est['basis'])}")
        else:
            items.append(f"Observed throughput: {est['rate_per_second']:g} thumbnail jobs/s ({e(est['basis'])})")
            items.append(f"ETA to regenerate {est['jobs']} asset(s): about {e(human_duration(est['seconds']))}")
    out.append("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
    return out


def _regeneration(data: RestoreData) -> list[str]:
    out = ["<h2>3. Regeneration</h2>"]
    if data.ledger is None:
        return [*out, f"<p>{e(data.ledger_note or 'No remediation ledger.')}</p>"]
    ledger = data.ledger
    fixed = [a for a in ledger if a.state == "fixed"]
    out.append(f"<p>{len(ledger)} asset(s) in the ledger: {len(fixed)} fixed, "
               f"{len(still_broken(ledger))} not fixed.</p>")
    out.append(attempts_chart(ledger))
    retried = fixed_after_retry(ledger)
    if retried:
        out.append("<h3>Fixed only after several attempts</h3>")
        out.append(_table(["asset", "attempts", "fixed"],
                          [[f'<span class="id">{e(a.asset_id)}</span>', str(a.attempts), e(when(a.fixed_at))]
                           for a in retried], {1}))
    broken = still_broken(ledger)
    if broken:
        out.append("<h3>Still broken</h3>")
        out.append(_table(["asset", "state", "attempts", "why"],
                          [[f'<span class="id">{e(a.asset_id)}</span>', e(a.state), str(a.attempts), e(why_broken(a))]
                           for a in broken], {2}))
    out.append("<h3>Every asset's timeline</h3>")
    for a in ledger:
        steps = _table(["step", "detail"], [[e(what), e(detail)] for what, detail in timeline(a)])
        out.append(f'<details><summary><span class="id">{e(a.asset_id)}</span>: {e(a.state)}, '
                   f"{a.attempts} attempt(s); {e(files_after(a))}</summary>{steps}</details>")
    return out


def _queues(data: RestoreData) -> list[str]:
    out = ["<h2>4. Queues</h2>"]
    q = data.queue
    if q is None:
        return [*out, "<p>Redis is not configured: the queues were not looked at.</p>"]
    if q.error is not None:
        return [*out, f'<p class="down">The thumbnail queue could not be read: {e(q.error)}.</p>']
    workers = "unknown (CLIENT LIST refused)" if q.workers is None else str(q.workers)
    waiting = sum(q.counts.get(s, 0) for s in ("waiting", "prioritized", "paused", "delayed"))
    age = "-" if q.oldest_waiting_age is None else human_duration(q.oldest_waiting_age)
    out.append(f"<ul><li>Thumbnail queue: {e(workers)} worker(s), {waiting} waiting, {q.counts.get('active', 0)} "
               f"active, {q.counts.get('failed', 0)} failed{', <b>paused</b>' if q.paused else ''}</li>"
               f"<li>Oldest waiting job: {e(age)}</li></ul>")
    if q.orphans:
        out.append(f"<p>{len(q.orphans)} job(s) name assets that are not in this database. That is expected "
                   "after restoring an older database: the jobs were queued before the backup was restored over; "
                   "Immich ends each with &quot;not found&quot; and nothing else happens.</p>")
        out.append(_table(["job", "asset", "state"],
                          [[f'<span class="id">{e(o.job_id)}</span>', f'<span class="id">{e(o.asset_id)}</span>',
                            e(o.state)] for o in q.orphans]))
    else:
        out.append("<p>No job names an asset missing from the database.</p>")
    if q.truncated:
        out.append(f"<p>(Only the first {q.jobs_checked} waiting or active jobs were looked at for orphans.)</p>")
    return out


def _integrity(data: RestoreData) -> list[str]:
    out = ["<h2>5. Immich's integrity report beside ours</h2>"]
    if data.integrity is None:
        return [*out, f"<p>{e(data.integrity_note or 'Not available.')}</p>"]
    ours: dict[str, int] = {}
    if data.scan is not None and data.scan.stats is not None:
        ours = {k: data.scan.stats.missing[(k, "file_missing")] for k in KINDS}
    rows = [[e(t), e(k), str(n), str(ours[k]) if t == "missing_file" and k in ours else "-"]
            for (t, k), n in sorted(data.integrity.items())]
    out.append(f"<p>Immich's newest entry: {e(when(data.integrity_newest))}</p>")
    out.append(_table(["type", "kind", "Immich", "exporter"], rows, {2, 3}))
    out.append("<p>The two differ by design: Immich's counts are from its last scheduled check, the exporter's "
               "from this report's scan.</p>")
    return out


def _checks(data: RestoreData) -> list[str]:
    rows = [[e(c.what), e(c.how), ("" if c.ok else '<span class="down">not reachable</span> ') + e(c.result)]
            for c in data.checks]
    return ["<h2>6. What was checked and how</h2>", _table(["what", "how", "result"], rows)]
