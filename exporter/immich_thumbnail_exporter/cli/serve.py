"""``serve`` (the default command): the collection loops and the HTTP server."""

from __future__ import annotations

import argparse
import asyncio

from immich_thumbnail_exporter.app import serve
from immich_thumbnail_exporter.cli.exits import fail
from immich_thumbnail_exporter.config import Loaded, WebSettings
from immich_thumbnail_exporter.exposition.http import parse_listen_address
from immich_thumbnail_exporter.exposition.webconfig import WebConfig, WebConfigError, load_web_config


def run(loaded: Loaded, args: argparse.Namespace) -> int:
    """Serve, once the configuration, the web configuration file and the listen address are all valid;
    otherwise list every problem of the three."""
    problems = list(loaded.problems)
    web_config: WebConfig | None = None
    address: tuple[str | None, int] | None = None
    web = loaded.section("web", WebSettings)
    if web is not None:
        try:
            web_config = load_web_config(web.config_file)
        except WebConfigError as exc:
            problems.extend(exc.problems)
        try:
            address = parse_listen_address(web.listen_address)
        except ValueError as exc:
            problems.append(str(exc))
    if problems or loaded.config is None or web_config is None or address is None:
        return fail(problems)
    return asyncio.run(serve(loaded.config, web_config, *address))
