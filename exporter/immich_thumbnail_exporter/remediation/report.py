"""What one ``regenerate`` run found, per asset: plain data (``output/regenerate_report.py`` renders it)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

EXIT_OK, EXIT_BROKEN, EXIT_ERROR = 0, 1, 2
# Results a row of the report can have, in the order the report lists them.
RESULTS = ("fixed", "still_missing", "not_queued", "gave_up", "skipped", "submitted", "waiting", "would_submit",
           "not_submitted")
BROKEN_RESULTS = ("still_missing", "not_queued", "gave_up")


@dataclass
class Row:
    asset_id: str
    result: str
    problems: str = ""
    kinds: tuple[str, ...] = ()
    attempts: int = 0
    detail: str = ""
    # Why it is still broken (a vocabulary.WHY code), when the exporter can tell.
    why: str | None = None
    # The decision's reason code (``decision.REASONS``): why it was skipped, given up, ...
    reason: str | None = None


@dataclass
class RunReport:
    mode: str  # dry_run, apply
    problems_total: int = 0
    assets_with_problems: int = 0
    rows: dict[str, Row] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    # The asset ids of each request Immich accepted, in order (with --apply).
    sent: list[list[str]] = field(default_factory=list)

    def set(self, row: Row) -> None:
        self.rows[row.asset_id] = row

    def counts(self) -> dict[str, int]:
        c = Counter(r.result for r in self.rows.values())
        return {k: c[k] for k in RESULTS}

    def ordered(self) -> list[Row]:
        return sorted(self.rows.values(), key=lambda r: (RESULTS.index(r.result), r.asset_id))

    def exit_code(self) -> int:
        if self.errors:
            return EXIT_ERROR
        if any(r.result in BROKEN_RESULTS for r in self.rows.values()):
            return EXIT_BROKEN
        return EXIT_OK
