"""Command line: ``serve`` (default), ``scan``, ``regenerate``, ``check-config``, ``demo``.

Flags follow Prometheus exporters (``--config.file``, ``--web.listen-address``, ``--web.config.file``,
``--log.level``, ``--log.format``, ``--collector.<name>`` / ``--no-collector.<name>``). Exit codes: 0 ran,
1 ``scan --fail-on-problems`` found problems, 2 configuration or connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from immich_thumbnail_exporter import __version__
from immich_thumbnail_exporter.config import Config, ConfigError, describe, load_config
from immich_thumbnail_exporter.exposition.webconfig import WebConfigError, load_web_config
from immich_thumbnail_exporter.model import FileStats, ProblemStore
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.sources.schema import SchemaError

log = logging.getLogger("immich_thumbnail_exporter")

COMMANDS = ("serve", "scan", "regenerate", "check-config", "demo")
COLLECTORS = ("inventory", "files", "queues")
EXIT_OK, EXIT_PROBLEMS, EXIT_CONFIG = 0, 1, 2


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common")
    g.add_argument("--config.file", dest="config_file", metavar="FILE", help="YAML configuration file")
    g.add_argument("--log.level", dest="log_level", choices=("debug", "info", "warn", "error"))
    g.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"))
    g.add_argument("--media.root", dest="media_root", metavar="DIR",
                   help="where this process sees Immich's media folder")
    g.add_argument("--media.location", dest="media_location", metavar="PATH",
                   help="the media prefix stored in Immich's database, or 'auto'")


def _web(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("web")
    g.add_argument("--web.listen-address", dest="listen_address", metavar="ADDR",
                   help="address to listen on (default :9813)")
    g.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                   help="TLS and basic auth, in the Prometheus exporter-toolkit format")
    for name in COLLECTORS:
        g.add_argument(f"--collector.{name}", dest=f"collector_{name}", action="store_true", default=None,
                       help=f"enable the {name} collector (default on)")
        g.add_argument(f"--no-collector.{name}", dest=f"collector_{name}", action="store_false",
                       help=f"disable the {name} collector")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="immich-thumbnail-exporter",
        description="Find Immich assets whose thumbnails or previews are missing, and regeneration that "
        "never finishes; serve it as Prometheus metrics.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")

    serve = sub.add_parser("serve", help="run the exporter (default)")
    _common(serve)
    _web(serve)

    scan = sub.add_parser("scan", help="one full inventory and file check now, as a report")
    _common(scan)
    scan.add_argument("--format", choices=("table", "json", "csv"), default="table")
    scan.add_argument("--output", metavar="FILE", help="write the report here instead of stdout")
    scan.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    scan.add_argument("--fail-on-problems", action="store_true", help="exit 1 when problems are found")
    scan.add_argument("--max-rows", type=int, default=None, help="table format: list at most this many problems")

    check = sub.add_parser("check-config", help="validate the configuration and the connections it names")
    _common(check)
    check.add_argument("--web.config.file", dest="web_config_file", metavar="FILE")

    regen = sub.add_parser("regenerate", help="ask Immich to regenerate problem assets' thumbnails")
    _common(regen)
    _add_regenerate_flags(regen)

    demo = sub.add_parser("demo", help="embedded PostgreSQL + Valkey seeded like a post-restore Immich, then serve")
    demo.add_argument("--web.listen-address", dest="listen_address", metavar="ADDR", default="127.0.0.1:9813")
    demo.add_argument("--log.level", dest="log_level", choices=("debug", "info", "warn", "error"), default="info")
    demo.add_argument("--log.format", dest="log_format", choices=("logfmt", "json"), default="logfmt")
    demo.add_argument("--assets", type=int, default=254, help="assets to seed (default 254)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's data directory on exit")
    return parser


def _add_regenerate_flags(parser: argparse.ArgumentParser) -> None:
    from immich_thumbnail_exporter.cli.regenerate import add_arguments

    add_arguments(parser)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that set configuration values (they win over YAML and environment)."""
    pairs = {
        "log.level": getattr(args, "log_level", None),
        "log.format": getattr(args, "log_format", None),
        "media.root": getattr(args, "media_root", None),
        "media.location": getattr(args, "media_location", None),
        "web.listen_address": getattr(args, "listen_address", None),
        "web.config_file": getattr(args, "web_config_file", None),
    }
    for name in COLLECTORS:
        pairs[f"collectors.{name}"] = getattr(args, f"collector_{name}", None)
    return {k: v for k, v in pairs.items() if v is not None}


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    items = list(argv)
    if not items or (items[0].startswith("-") and items[0] not in ("-h", "--help", "--version")):
        items.insert(0, "serve")
    return items


def _fail(lines: Sequence[str]) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    if args.command == "demo":
        from immich_thumbnail_exporter import logs
        from immich_thumbnail_exporter.demo.run import run_demo

        logs.setup(args.log_level, args.log_format)
        return run_demo(args)
    try:
        config = load_config(args.config_file, overrides=overrides(args))
    except ConfigError as exc:
        return _fail(exc.problems)
    from immich_thumbnail_exporter import logs

    logs.setup(config.log.level, config.log.format)
    handler: dict[str, Callable[[Config, argparse.Namespace], int]] = {
        "serve": cmd_serve,
        "scan": cmd_scan,
        "check-config": cmd_check_config,
        "regenerate": cmd_regenerate,
    }
    try:
        return handler[args.command](config, args)
    except KeyboardInterrupt:
        return 130


# -- serve -----------------------------------------------------------------------------------------


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    try:
        web_config = load_web_config(config.web.config_file)
    except WebConfigError as exc:
        return _fail([str(exc)])
    from immich_thumbnail_exporter.exposition.http import parse_listen_address

    try:
        host, port = parse_listen_address(config.web.listen_address)
    except ValueError as exc:
        return _fail([str(exc)])
    from immich_thumbnail_exporter.app import serve

    return asyncio.run(serve(config, web_config, host, port))


# -- scan ------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress display on stderr, redrawn at most a few times a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = 0.0

    def __call__(self, stats: FileStats) -> None:
        if not self.enabled:
            return
        import time

        now = time.monotonic()
        if now - self._last < 0.25:
            return
        self._last = now
        sys.stderr.write(
            f"\rchecked {stats.rows:,} database rows, {stats.entries:,} files on disk, "
            f"{stats.problems_total:,} problems"
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


async def _scan(config: Config, problems: ProblemStore, progress: Progress) -> Any:
    from immich_thumbnail_exporter.scan.run import run_scan

    pg = PostgresSource(config.database)
    try:
        return await run_scan(pg, config, problems, progress=progress)
    finally:
        await pg.close()


def cmd_scan(config: Config, args: argparse.Namespace) -> int:
    from immich_thumbnail_exporter.output import scan_report as report

    progress = Progress(enabled=not args.no_progress and sys.stderr.isatty())
    problems = ProblemStore()
    try:
        result = asyncio.run(_scan(config, problems, progress))
    except (SourceError, SchemaError) as exc:
        progress.done()
        return _fail([str(exc)])
    progress.done()
    # The thumbnail queue's recent finish rate, for the review's time estimate (None without Redis).
    throughput = report.observe_queue(config) if args.format != "csv" else None
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.format == "json":
            report.write_json(result, out, throughput)
        elif args.format == "csv":
            report.write_csv(result.problems, out)
        else:
            report.write_table(result, out, args.max_rows, throughput)
    finally:
        if args.output:
            out.close()
        problems.close()
    if args.fail_on_problems and result.problems.total:
        return EXIT_PROBLEMS
    return EXIT_OK


# -- check-config ----------------------------------------------------------------------------------


async def _check_connections(config: Config) -> list[str]:
    from immich_thumbnail_exporter.scan.run import media_identity

    problems: list[str] = []
    pg = PostgresSource(config.database)
    try:
        schema = await pg.schema()
        print(f"ok: database {pg.target}: Immich schema {schema.era}")
    except (SourceError, SchemaError) as exc:
        problems.append(f"database: {exc}")
    finally:
        await pg.close()
    if config.media.root:
        try:
            media_identity(config.media.root)
            print(f"ok: media root {config.media.root}")
        except SourceError as exc:
            problems.append(f"media.root: {exc}")
    else:
        print("note: media.root not set: only database checks will run")
    with contextlib.suppress(ImportError):
        from immich_thumbnail_exporter.collectors.queues import check_connections

        problems.extend(await check_connections(config))
    return problems


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    problems: list[str] = []
    try:
        load_web_config(config.web.config_file)
    except WebConfigError as exc:
        problems.append(str(exc))
    if log.isEnabledFor(logging.DEBUG):
        print(json.dumps(describe(config), indent=2, default=str))
    problems.extend(asyncio.run(_check_connections(config)))
    if problems:
        return _fail(problems)
    print("configuration ok")
    return EXIT_OK


# -- regenerate ------------------------------------------------------------------------------------


def cmd_regenerate(config: Config, args: argparse.Namespace) -> int:
    from immich_thumbnail_exporter.cli.regenerate import run_command

    return run_command(config, args)

