"""``check-config``: every problem in every file it reads, at once, then the connections they name."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from immich_thumbnail_exporter.cli.exits import EXIT_OK, fail
from immich_thumbnail_exporter.config import Config, Loaded, WebSettings, describe
from immich_thumbnail_exporter.exposition.webconfig import WebConfigError, load_web_config
from immich_thumbnail_exporter.remediation.room import room_warning
from immich_thumbnail_exporter.sources.connections import check_connections
from immich_thumbnail_exporter.sources.media import probe_filesystem
from immich_thumbnail_exporter.sources.postgres import PostgresSource, SourceError
from immich_thumbnail_exporter.sources.schema import SchemaError

log = logging.getLogger("immich_thumbnail_exporter")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--web.config.file", dest="web_config_file", metavar="FILE",
                        help="also check this web configuration file (TLS, basic auth)")


def run(loaded: Loaded, args: argparse.Namespace) -> int:
    """The configuration's problems (its secret files included), the web configuration file's, then,
    when the configuration is valid, the connections; one line per problem, exit 2 if there is any."""
    problems = list(loaded.problems)
    web = loaded.section("web", WebSettings)
    if web is not None:
        try:
            load_web_config(web.config_file)
        except WebConfigError as exc:
            problems.extend(exc.problems)
    if loaded.config is None:
        print("note: connections not checked: the configuration has problems")
        return fail(problems)
    if log.isEnabledFor(logging.DEBUG):
        print(json.dumps(describe(loaded.config), indent=2, default=str))
    problems.extend(asyncio.run(_check_connections(loaded.config)))
    if (room := room_warning(loaded.config)) is not None:
        print(f"warning: {room}")
    if problems:
        return fail(problems)
    print("configuration ok")
    return EXIT_OK


async def _check_connections(config: Config) -> list[str]:
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
            await probe_filesystem(config.media.root, 10.0)
            print(f"ok: media root {config.media.root}")
        except SourceError as exc:
            problems.append(f"media.root: {exc}")
    else:
        print("note: media.root not set: only database checks will run")
    problems.extend(await check_connections(config))
    return problems
