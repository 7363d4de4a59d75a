"""The benchmark's machinery, end to end at a tiny size: it builds its dataset, every measurement runs,
and the exporter's counts on the synthetic library are exact. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_bench_runs_end_to_end_at_2000_assets(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--sizes", "2000", "--runs", "1", "--cache", str(tmp_path / "cache"),
         "--scrapers", "5", "--scrape-seconds", "1", "--idle-seconds", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=170,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "full scan (run_scan), s" in res.stdout
    (r,) = json.loads(out.read_text())["results"]
    assert r["n"] == 2000
    assert r["scan"]["diffs"] == []  # the scan found exactly what the dataset holds
    assert r["scan_nosizes"]["diffs"] == []  # and without sizes, the same less bytes and empty files
    assert "checks.file_sizes: false" in res.stdout
    assert r["scan"]["rows"] == 4026 and r["files"] == 4019
    watch = r["scan"]["watch"]
    assert watch["max_connections"] <= 2
    assert set(watch["lock_modes"]) <= {"AccessShareLock"}
    assert watch["blocking"] == 0
    assert r["baseline"]["lines"] > 0  # the shell pipeline's comm found the missing files too
    assert r["scrapes"]["errors"] == 0 and r["scrapes"]["count"] + r["scrapes"]["outside_count"] > 0
    # The cached dataset is reused, and no server was left running on it.
    pid_file = next((tmp_path / "cache").glob("v*-n2000")) / "pg" / "data" / "postmaster.pid"
    assert not pid_file.exists()
