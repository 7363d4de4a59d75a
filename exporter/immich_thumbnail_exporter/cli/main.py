"""Command line: ``serve`` (default), ``scan``, ``regenerate``, ``check-config``, ``demo``, ``config-schema``.

This module parses the arguments, defines the flags commands share, loads the configuration and hands it
to the command's module (one per command). Flags follow Prometheus exporters (``--config.file``,
``--web.listen-address``, ``--web.config.file``, ``--log.level``, ``--log.format``, ``--collector.<name>`` /
``--no-collector.<name>``). Exit codes: 0 ran, 1 ``scan --fail-on-problems`` found problems, 2 configuration
or connection error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any, Final

from immich_thumbnail_exporter import __version__, logs
from immich_thumbnail_exporter.cli import check_config, config_schema, demo, regenerate, report, scan, serve
from immich_thumbnail_exporter.cli.exits import EXIT_CONFIG, EXIT_OK, EXIT_PROBLEMS, fail
from immich_thumbnail_exporter.config import LOG_FORMATS, LOG_LEVELS, CollectorSwitches, LogSettings, collect

__all__ = ["COLLECTORS", "COMMANDS", "EXIT_CONFIG", "EXIT_OK", "EXIT_PROBLEMS", "build_parser", "main", "overrides"]

COMMANDS: Final = ("serve", "scan", "regenerate", "report", "check-config", "demo", "config-schema")
COLLECTORS: Final = tuple(f.name for f in dataclasses.fields(CollectorSwitches))


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common")
    g.add_argument("--config.file", dest="config_file", metavar="FILE", help="YAML configuration file")
    g.add_argument("--log.level", dest="log_level", choices=LOG_LEVELS)
    g.add_argument("--log.format", dest="log_format", choices=LOG_FORMATS)
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

    p = sub.add_parser("serve", help="run the exporter (default)")
    _common(p)
    _web(p)

    p = sub.add_parser("scan", help="one full inventory and file check now, as a report")
    _common(p)
    scan.add_arguments(p)

    p = sub.add_parser("check-config", help="validate the configuration files and the connections they name")
    _common(p)
    check_config.add_arguments(p)

    p = sub.add_parser("regenerate", help="ask Immich to regenerate problem assets' thumbnails")
    _common(p)
    regenerate.add_arguments(p)

    p = sub.add_parser("report", help="the restore report: a fresh scan, the queue and the regeneration ledger")
    _common(p)
    report.add_arguments(p)

    p = sub.add_parser("demo", help="embedded PostgreSQL + Valkey seeded like a post-restore Immich, then serve")
    demo.add_arguments(p)

    p = sub.add_parser("config-schema", help="print the configuration file's JSON Schema (for editors)")
    config_schema.add_arguments(p)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_normalise_argv(sys.argv[1:] if argv is None else argv))
    if args.command == "demo":
        return demo.run(args)
    if args.command == "config-schema":
        return config_schema.run(args)
    # Every other command reads Immich's database, so naming none anywhere is a configuration error.
    loaded = collect(args.config_file, overrides=overrides(args), require_database=True)
    log_settings = loaded.section("log", LogSettings) or LogSettings()
    logs.setup(log_settings.level, log_settings.format)
    try:
        if args.command == "serve":
            return serve.run(loaded, args)
        if args.command == "check-config":
            return check_config.run(loaded, args)
        if loaded.config is None:
            return fail(loaded.problems)
        if args.command == "scan":
            return scan.run(loaded.config, args)
        if args.command == "report":
            return report.run(loaded.config, args)
        return int(regenerate.run_command(loaded.config, args))
    except KeyboardInterrupt:
        return 130
