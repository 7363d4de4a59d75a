"""``regenerate``: its flags, and running it (the engine is ``remediation/engine.py``).

Dry run unless ``--apply``. Exit 0 when everything selected was fixed or skipped (or, without ``--wait``,
submitted and queued), 1 when something is still missing, not queued or given up, 2 on a configuration,
connection or API error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from immich_thumbnail_exporter.config import Config, duration_argument
from immich_thumbnail_exporter.output.regenerate_report import write_json, write_table
from immich_thumbnail_exporter.remediation.engine import Failure, Options, regenerate
from immich_thumbnail_exporter.remediation.report import EXIT_ERROR
from immich_thumbnail_exporter.sources.immich_access import FACES, REGENERATION, preflight
from immich_thumbnail_exporter.vocabulary import KINDS, PROBLEM_KINDS, REASONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("regenerate")
    g.add_argument("--apply", action="store_true",
                   help="really ask Immich (otherwise a dry run that prints what it would do)")
    g.add_argument("--kind", action="append", choices=PROBLEM_KINDS, metavar="KIND",
                   help="only problems of this kind: thumbnail, preview, fullsize, or person for face "
                   "thumbnails (repeatable; default thumbnail, preview and fullsize)")
    g.add_argument("--reason", action="append", choices=REASONS, metavar="REASON",
                   help="only problems with this reason (repeatable; default all; file_unreadable is only "
                   "submitted when named here)")
    g.add_argument("--asset", action="append", metavar="ID",
                   help="only this asset (repeatable); with only --kind person, this person")
    g.add_argument("--limit", type=int, metavar="N", help="submit at most N assets in this run")
    g.add_argument("--batch-size", type=int, metavar="N",
                   help="assets per request (default remediation.batch_size)")
    g.add_argument("--rate", type=float, metavar="R",
                   help="requests per second (default remediation.requests_per_second)")
    g.add_argument("--wait", action="store_true",
                   help="verify: check the files until fixed or --timeout, retrying what is still broken")
    g.add_argument("--timeout", type=duration_argument, metavar="DURATION",
                   help="verification deadline with --wait (default: long enough for every attempt)")
    g.add_argument("--max-attempts", type=int, metavar="N",
                   help="give up on an asset after N requests (default remediation.max_attempts)")
    g.add_argument("--retry-after", type=duration_argument, metavar="DURATION",
                   help="wait this long after a request before calling it failed and retrying; doubles "
                   "with each attempt (default remediation.verify_after)")
    g.add_argument("--confirm-within", type=duration_argument, metavar="DURATION",
                   help="after each accepted request, how long to look for a job naming each asset before "
                   "calling it not queued (default remediation.confirm_within)")
    g.add_argument("--retry-gave-up", action="store_true",
                   help="try again assets an earlier run gave up on")
    g.add_argument("--format", choices=("table", "json"), default="table")
    g.add_argument("--state-dir", metavar="DIR",
                   help="where the ledger of requests is kept (default remediation.state_dir)")


def options_from_args(config: Config, args: argparse.Namespace) -> Options:
    """Flags over ``remediation.*``; raises Failure with every problem on one line."""
    rem = config.remediation

    def flag(name: str, default: Any) -> Any:
        given = getattr(args, name, None)
        return default if given is None else given

    def many(name: str) -> tuple[str, ...] | None:
        given = getattr(args, name, None)
        return tuple(dict.fromkeys(given)) if given else None

    opts = Options(
        apply=bool(flag("apply", False)),
        kinds=many("kind") or KINDS,
        reasons=many("reason"),
        assets=many("asset") or (),
        limit=flag("limit", None),
        batch_size=flag("batch_size", rem.batch_size),
        rate=flag("rate", rem.requests_per_second),
        wait=bool(flag("wait", False)),
        timeout=flag("timeout", None),
        max_attempts=flag("max_attempts", rem.max_attempts),
        retry_after=float(flag("retry_after", rem.verify_after)),
        retry_gave_up=bool(flag("retry_gave_up", False)),
        state_dir=flag("state_dir", rem.state_dir),
        format=flag("format", "table"),
        confirm_within=float(flag("confirm_within", rem.confirm_within)),
    )
    problems = []
    if opts.limit is not None and opts.limit < 1:
        problems.append("--limit: expected 1 or more")
    if not 1 <= opts.batch_size <= 1000:
        problems.append("--batch-size: expected 1 to 1000")
    if opts.rate <= 0:
        problems.append("--rate: expected a positive number")
    if opts.max_attempts < 1:
        problems.append("--max-attempts: expected 1 or more")
    if problems:
        raise Failure("; ".join(problems))
    return opts


def run_command(config: Config, args: argparse.Namespace) -> int:
    try:
        opts = options_from_args(config, args)
        if opts.apply and config.immich.enabled:  # know the key before the first request (sources/immich_access)
            lines, refused = asyncio.run(key_preflight(config, opts))
            for line in lines:
                print(line, file=sys.stderr)
            if refused is not None:
                raise Failure(f"{refused}: nothing was sent")
        report = asyncio.run(regenerate(config, opts))
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if opts.format == "json":
        write_json(report, sys.stdout)
    else:
        write_table(report, sys.stdout)
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    return report.exit_code()


async def key_preflight(config: Config, opts: Options) -> tuple[list[str], str | None]:
    """The key checked for what the run asks: regeneration for asset kinds, face thumbnails for
    ``person``. The key's lines once; the first feature it cannot do stops the run."""
    features = ([REGENERATION] if opts.asset_kinds else []) + ([FACES] if opts.people else [])
    shown: list[str] = []
    for feature in features:
        lines, refused = await preflight(config.immich, feature)
        shown = shown or lines
        if refused is not None:
            return shown, refused
    return shown, None
