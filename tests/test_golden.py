"""A golden ``/metrics`` holding every family the exporter defines, linted by ``promtool check metrics``.

The golden file shows users the whole exposition and catches any unintended change to names, labels,
help texts or values. It is a real exporter run on a fixed seeded Immich (inventory and file check),
completed with made-up data for the families that run does not produce, all through the real store and
``/metrics`` code (``tests/golden/__init__.py``). Regenerate with ``python -m tests.golden`` (or
``make golden``, or ``UPDATE_GOLDEN=1 pytest tests/test_golden.py``) and review the diff.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest

from tests.conftest import Immich, wait_for
from tests.golden import GOLDEN, complete, normalise, render
from tests.helpers import fetch, running_exporter

# The exporter's own families: the complete store reports more collections and sources than the run had.
_OWN = ("immich_exporter_source_up", "immich_exporter_collection_")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is missing: run ./scripts/install-system-deps.sh (Debian package prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


def _samples(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#") and not line.startswith(_OWN)]


@pytest.mark.asyncio
async def test_golden_metrics(immich_factory: Any) -> None:
    imm: Immich = await immich_factory("v1.136+")
    overrides = {"media.root": imm.media, "checks.verify_headers": True, "checks.check_originals": True}
    async with running_exporter(overrides, env=imm.env()) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=30)
        status, scraped, _ = await fetch(f"{url}/metrics")
        got = render(complete(exporter.store))
    assert status == 200
    lint = _promtool_check(scraped)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # What the real scrape showed is in the golden exposition as it was, in the same order.
    real = _samples(normalise(scraped))
    assert real and [line for line in _samples(got) if line in set(real)] == real
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text(), "exposition changed: run python -m tests.golden and review the diff"


def test_golden_file_passes_promtool() -> None:
    lint = _promtool_check(GOLDEN.read_text())
    assert lint.returncode == 0, lint.stdout + lint.stderr

