"""``config-schema``: the configuration file's JSON Schema, for editors' YAML plugins.

For example, with the YAML language server (VS Code's YAML extension, Neovim, Helix)::

    immich-thumbnail-exporter config-schema > config.schema.json
    # then, as the first line of config.yml:
    # yaml-language-server: $schema=./config.schema.json
"""

from __future__ import annotations

import argparse
import json
import sys

from immich_thumbnail_exporter.cli.exits import EXIT_OK, fail
from immich_thumbnail_exporter.config import config_schema


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", metavar="FILE", help="write the schema here instead of stdout")


def run(args: argparse.Namespace) -> int:
    text = json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"
    if not args.output:
        sys.stdout.write(text)
        return EXIT_OK
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        return fail([f"--output: cannot write {args.output}: {exc.strerror or exc}"])
    return EXIT_OK
