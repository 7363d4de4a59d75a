"""The ``regenerate`` report, as a table or JSON: pure formatting of a ``RunReport``."""

from __future__ import annotations

import json
from typing import Any, TextIO

from immich_thumbnail_exporter.remediation.report import Row, RunReport
from immich_thumbnail_exporter.vocabulary import REQUEST_RESULTS


def row_dict(row: Row) -> dict[str, Any]:
    return {
        "asset_id": row.asset_id,
        "result": row.result,
        "problems": row.problems,
        "kinds": list(row.kinds),
        "attempts": row.attempts,
        "detail": row.detail,
        "why": row.why,
        "reason": row.reason,
    }


def report_dict(report: RunReport) -> dict[str, Any]:
    return {
        "mode": report.mode,
        "summary": {
            "problems": report.problems_total,
            "assets_with_problems": report.assets_with_problems,
            "assets_listed": len(report.rows),
            **report.counts(),
            "requests": {k: report.requests[k] for k in REQUEST_RESULTS},
        },
        "assets": [row_dict(r) for r in report.ordered()],
        "errors": list(report.errors),
        "notes": list(report.notes),
    }


def write_json(report: RunReport, out: TextIO) -> None:
    json.dump(report_dict(report), out, indent=2)
    out.write("\n")


def write_table(report: RunReport, out: TextIO) -> None:
    w = out.write
    if report.mode == "dry_run":
        w("Regeneration: dry run, nothing submitted (add --apply to ask Immich)\n")
    else:
        w("Regeneration: applied\n")
    w(f"Scan: {report.problems_total} problem(s) on {report.assets_with_problems} asset(s)\n")
    for note in report.notes:
        w(f"Note: {note}\n")
    if report.rows:
        w(f"\n{'ASSET':<36}  {'RESULT':<13}  {'TRIES':>5}  {'PROBLEMS':<32}  DETAIL\n")
        for row in report.ordered():
            w(f"{row.asset_id:<36}  {row.result:<13}  {row.attempts:>5}  {row.problems or '-':<32}  {row.detail}\n")
    c = report.counts()
    w(f"\nFixed {c['fixed']}, still missing {c['still_missing']}, not queued {c['not_queued']}, "
      f"gave up {c['gave_up']}, skipped {c['skipped']}")
    if report.mode == "dry_run":
        w(f", would submit {c['would_submit']}, waiting {c['waiting']}\n")
    else:
        w(f", submitted (not verified) {c['submitted']}, waiting {c['waiting']}, "
          f"not submitted {c['not_submitted']}\n")
    for error in report.errors:
        w(f"Error: {error}\n")
