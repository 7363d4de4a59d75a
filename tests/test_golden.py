"""A golden ``/metrics`` for a fixed fixture, linted by ``promtool check metrics``.

The golden file shows users the whole exposition and catches any unintended change to names, labels,
help texts or values. Values that depend on time (durations, timestamps, ages) and the exporter's own
process metrics are normalised. Regenerate with ``UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and
review the diff.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from immich_thumbnail_exporter import __version__
from immich_thumbnail_exporter.metrics import DEFS
from tests.conftest import Immich, wait_for
from tests.helpers import fetch, running_exporter

GOLDEN = Path(__file__).parent / "golden" / "metrics.prom"
TIME_DEPENDENT = re.compile(
    r"^(immich_exporter_collection_duration_seconds|immich_exporter_collection_last_success_timestamp_seconds"
    r"|immich_queue_oldest_job_age_seconds"
    # Not time but the machine: the free space of the disk the test's media folder is on.
    r"|immich_media_filesystem_size_bytes|immich_media_filesystem_avail_bytes)(\{.*\})? .*$"
)


def normalise(text: str) -> str:
    out = []
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0] if not line.startswith("#") else line.split(" ")[2]
        if name.startswith(("process_", "python_")):
            continue
        m = TIME_DEPENDENT.match(line)
        if m:
            line = f"{m.group(1)}{m.group(2) or ''} 0"
        line = line.replace(f'version="{__version__}"', 'version="VERSION"')
        out.append(line)
    return "\n".join(out) + "\n"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run ./scripts/install-system-deps.sh (Debian package prometheus)"
    return path


@pytest.mark.asyncio
async def test_golden_metrics(immich_factory: Any) -> None:
    imm: Immich = await immich_factory("v1.136+")
    overrides = {"media.root": imm.media, "checks.verify_headers": True, "checks.check_originals": True}
    async with running_exporter(overrides, env=imm.env()) as (exporter, url):
        await wait_for(lambda: exporter.store.ready, timeout=30)
        status, text, _ = await fetch(f"{url}/metrics")
    assert status == 200
    lint = _promtool_check(text)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    got = normalise(text)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text(), "exposition changed: rerun with UPDATE_GOLDEN=1 and review the diff"
    # Every family in the golden file is one the exporter defines, and carries HELP and TYPE.
    for line in got.splitlines():
        if line.startswith("# HELP "):
            assert line.split(" ")[2] in DEFS


def _promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


def test_golden_file_passes_promtool() -> None:
    lint = _promtool_check(GOLDEN.read_text())
    assert lint.returncode == 0, lint.stdout + lint.stderr
