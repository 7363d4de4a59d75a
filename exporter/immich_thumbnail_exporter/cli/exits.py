"""Exit statuses, the same for every command, and how problems are printed."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Final

EXIT_OK: Final = 0
EXIT_PROBLEMS: Final = 1  # scan --fail-on-problems found problems
EXIT_CONFIG: Final = 2  # a configuration or connection error


def fail(lines: Sequence[str]) -> int:
    """Print each problem as one ``error:`` line on stderr; the configuration error status."""
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_CONFIG
