"""Benchmark of the exporter on a synthetic Immich of 10k to 1M assets: ``python -m bench``.

``bench.dataset`` builds (once, cached under ``bench/.cache/``) a singular-era Immich database in a
persistent embedded PostgreSQL and its media tree; ``bench.measure`` times the exporter against it, the
shell pipeline an admin would write, and the floor (listing the directories, reading the paths);
``bench.child`` holds what runs in child processes (the scan, an ``Exporter``) so their memory and GIL
are their own.
"""

from __future__ import annotations

from pathlib import Path

# Bump when the generated data changes shape: caches of another version are rebuilt.
FORMAT_VERSION = 1
CACHE = Path(__file__).resolve().parent / ".cache"
