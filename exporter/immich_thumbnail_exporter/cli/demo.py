"""``demo``: embedded PostgreSQL and Valkey seeded like a post-restore Immich, then ``serve`` on it."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from immich_thumbnail_exporter import logs
from immich_thumbnail_exporter.cli.exits import EXIT_CONFIG
from immich_thumbnail_exporter.config import LOG_FORMATS, LOG_LEVELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--web.listen-address", dest="listen_address", metavar="ADDR", default="127.0.0.1:9813")
    parser.add_argument("--log.level", dest="log_level", choices=LOG_LEVELS, default="info")
    parser.add_argument("--log.format", dest="log_format", choices=LOG_FORMATS, default="logfmt")
    parser.add_argument("--assets", type=int, default=254, help="assets to seed (default 254)")
    parser.add_argument("--keep", action="store_true", help="keep the demo's data directory on exit")


def run(args: argparse.Namespace) -> int:
    """The demo builds its own configuration: no configuration file, no environment."""
    # Imported here: the demo's servers and seeding are for this command (and the tests) only, and its
    # wheels are the optional [demo] extra. Its servers can come from the system's packages, but the
    # simulated Immich queues real BullMQ jobs: without bullmq there is no demo, and one line says so.
    if importlib.util.find_spec("bullmq") is None:
        print("error: the demo needs the demo extra: pip install 'immich-thumbnail-exporter[demo]'", file=sys.stderr)
        return EXIT_CONFIG
    from immich_thumbnail_exporter.demo.run import run_demo

    logs.setup(args.log_level, args.log_format)
    return run_demo(args)
