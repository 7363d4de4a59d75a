"""``python -m tests.golden``: rewrite ``tests/golden/metrics.prom`` (a real run plus made-up data).

It runs ``tests/test_golden.py`` with ``UPDATE_GOLDEN=1``: the seeded Immich and the exporter come up as
in the test, the file is written, and the same test then checks it. Review ``git diff`` afterwards.
"""

from __future__ import annotations

import os
import sys

import pytest

if __name__ == "__main__":
    os.environ["UPDATE_GOLDEN"] = "1"
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_golden.py", *sys.argv[1:]]))
