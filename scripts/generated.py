"""The main shared by the generators of committed files (the dashboard, the PrometheusRule).

Each generator renders its file as text; this writes it, or with ``--check`` compares it with the
committed copy and exits 1 with a unified diff when the two differ, so CI and reviewers see what is
stale instead of a bare "out of date".
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def stale_diff(path: Path, text: str) -> str:
    """A unified diff from the file at ``path`` (empty when absent) to ``text``; "" when they agree."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    if current == text:
        return ""
    name = _shown(path)
    return "".join(difflib.unified_diff(
        current.splitlines(keepends=True), text.splitlines(keepends=True),
        fromfile=f"{name} (committed)", tofile=f"{name} (generated)",
    ))


def main(
    description: str,
    output: Path,
    render: Callable[[argparse.Namespace], str],
    *,
    generator: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """``generator`` is the command that rewrites the file, named in the message when it is stale."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 with a diff if the committed file is out of date; write nothing")
    parser.add_argument("--output", type=Path, default=output, help="where to write (default: %(default)s)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    text = render(args)
    if args.check:
        diff = stale_diff(args.output, text)
        if diff:
            sys.stderr.write(diff if diff.endswith("\n") else diff + "\n")
            print(f"{_shown(args.output)} is out of date: run {generator}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0

