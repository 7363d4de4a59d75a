"""The golden ``/metrics`` (``tests/golden/metrics.prom``) holds every metric the exporter defines.

Checked here, in the fast tier, so that adding a metric to ``metrics.py`` without regenerating the file
(``python -m tests.golden``) fails at once; ``tests/test_golden.py`` checks its content against a run.
"""

from __future__ import annotations

from immich_thumbnail_exporter.metrics import DEFS
from tests.golden import GOLDEN


def test_golden_file_holds_every_definition() -> None:
    """Every metric in metrics.py is in the golden file with its type, and the file holds no other."""
    text = GOLDEN.read_text()
    declared = [line.split(" ")[2:4] for line in text.splitlines() if line.startswith("# TYPE ")]
    # The text format names a counter family with its _total.
    types = {name.removesuffix("_total") if kind == "counter" else name: kind for name, kind in declared}
    assert sorted(set(DEFS) - set(types)) == [], "missing from tests/golden/metrics.prom: run python -m tests.golden"
    assert sorted(set(types) - set(DEFS)) == []
    assert {name: d.type for name, d in DEFS.items()} == types
    assert len(declared) == len(types), "a family declared twice"
