"""Metric names: the README's Metrics table and the shipped alert rules and dashboard, each checked
against the exporter's own definitions (``metrics.py``), the one list of what it can emit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from immich_thumbnail_exporter.metrics import DEFS, exposed_names
from immich_thumbnail_exporter.vocabulary import REASONS
from tests.artefact_metrics import metric_names_used, promql_metric_names

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_metrics(text: str) -> dict[str, frozenset[str] | None]:
    """The README's Metrics table: each metric name as exposed -> the labels its row lists (None when the
    table has no ``labels`` column).

    The table is the first one under the ``## Metrics`` heading. Its first column names metrics in
    backticks, several to a cell if they share labels (`` `a`, `b` ``); a name starting with ``_`` is
    shorthand for the cell's first name with its last word replaced (`` `x_success`, `_duration_seconds` ``
    is ``x_duration_seconds``). A row's labels are the backticked names in its ``labels`` cell.
    """
    match = re.search(r"^## Metrics[ \t]*\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Metrics' section"
    table: dict[str, frozenset[str] | None] = {}
    label_column: int | None = None
    header_seen = False
    for line in match.group(1).splitlines():
        if not line.startswith("|"):
            if header_seen:
                break  # the first table only
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not header_seen:
            header_seen = True
            heads = [c.lower() for c in cells]
            label_column = heads.index("labels") if "labels" in heads else None
            continue
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        labels = None
        if label_column is not None and label_column < len(cells):
            labels = frozenset(re.findall(r"`([a-zA-Z_][a-zA-Z0-9_]*)`", cells[label_column]))
        first = ""
        for name in re.findall(r"`([a-z_:][a-z0-9_:]*)`", cells[0]):
            if name.startswith("_"):
                assert first, f"README Metrics row {cells[0]!r}: shorthand {name} before a full name"
                name = first.rsplit("_", 1)[0] + name
            else:
                first = first or name
            table[name] = labels
    assert table, "README.md's Metrics section has no table of backticked metric names"
    return table


def exposed_metric_names() -> dict[str, frozenset[str]]:
    """Each metric the exporter defines (metrics.py), named as exposed (counters with ``_total``), with its labels."""
    return {d.name + ("_total" if d.type == "counter" else ""): frozenset(d.labels) for d in DEFS.values()}


def test_readme_table_parses() -> None:
    text = (
        "## Metrics\n\nIntro.\n\n| metric | labels | meaning |\n|---|---|---|\n"
        "| `a_total` | `queue`, `job_name` (, `outcome`) | x |\n"
        "| `b_files`, `b_bytes` | `kind` | y with `not_a_label` in prose |\n"
        "| `c_success`, `_duration_seconds`, `_last_timestamp` | `collection` | |\n"
        "| `d` | | |\n\nText after.\n\n| `not_in_the_first_table` | | |\n\n## Next\n| `e` | | |\n"
    )
    assert readme_metrics(text) == {
        "a_total": {"queue", "job_name", "outcome"},
        "b_files": {"kind"}, "b_bytes": {"kind"},
        "c_success": {"collection"}, "c_duration_seconds": {"collection"}, "c_last_timestamp": {"collection"},
        "d": frozenset(),
    }
    without_labels = "## Metrics\n| metric | meaning |\n|---|---|\n| `a`, `b` | `x` |\n"
    assert readme_metrics(without_labels) == {"a": None, "b": None}


def test_readme_metrics_table_matches_the_definitions() -> None:
    """Every metric the exporter defines is in the README's Metrics table, and the table names no other."""
    readme = readme_metrics(README.read_text(encoding="utf-8"))
    defined = exposed_metric_names()
    assert not defined.keys() - readme.keys(), "defined in metrics.py, missing from the README's Metrics table"
    assert not readme.keys() - defined.keys(), "in the README's Metrics table, not defined in metrics.py"


def test_readme_metrics_table_lists_their_labels() -> None:
    """Where the table has a labels column, each row lists exactly the labels its metrics carry (a row of
    several metrics lists all of theirs: ``queue``, ``job_name`` (, ``outcome``))."""
    readme = readme_metrics(README.read_text(encoding="utf-8"))
    defined = exposed_metric_names()
    rows: dict[frozenset[str], set[str]] = {}
    for name, labels in readme.items():
        if labels is not None and name in defined:
            rows.setdefault(labels, set()).add(name)
    for labels, names in rows.items():
        union = frozenset().union(*(defined[n] for n in names))
        # Metrics sharing the same listed labels may sit on different rows: each must be within them, and
        # together they must use every label listed.
        assert all(defined[n] <= labels for n in names), (sorted(names), sorted(labels))
        assert union == labels, (sorted(names), sorted(labels))


def test_readme_names_every_reason() -> None:
    """The row of ``immich_asset_files_missing`` names every reason the exporter emits."""
    text = README.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `immich_asset_files_missing`"))
    assert set(REASONS) <= set(re.findall(r"`([a-z_]+)`", row))


def test_artefacts_use_defined_metrics() -> None:
    """The alert rules and the dashboard query only what the exporter defines (or Prometheus makes)."""
    exposed = exposed_names()
    assert metric_names_used() - exposed == set()


def test_metric_names_used_finds_metrics_only() -> None:
    used = metric_names_used()
    assert {"immich_asset_files_missing", "immich_queue_oldest_job_age_seconds", "immich_exporter_build_info"} <= used
    assert "immich_job_wait_seconds_bucket" in used
    assert not used & {"up", "immich_exporter:up", "le", "instance", "kind", "queue", "sum", "rate", "by"}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (le, queue) (rate(a_bucket{x="y{z}"}[5m]))', {"a_bucket"}),
        ("a / on (instance) group_left (kind) b offset 5m > bool 0.1", {"a", "b"}),
        ("max_over_time(c[1h:5m]) unless ignoring (state) d", {"c", "d"}),
        ('time() - e{collection!~"a|b"} > 3600 or vector(0)', {"e"}),
        ("topk by (queue) (3, f) and g @ start()", {"f", "g"}),
        ("sum without (reason) (h) > 1e3", {"h"}),
    ],
)
def test_promql_metric_names(expr: str, expected: set[str]) -> None:
    assert promql_metric_names(expr) == expected
