"""``check-config``'s look at the optional sources: can Redis and Immich's API be used as configured?

Each prints one ``ok: ...`` line when it works; every problem comes back as one line for the caller.
"""

from __future__ import annotations

import asyncio
import time

from redis.exceptions import ResponseError

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.sources.bullmq import BullMQ
from immich_thumbnail_exporter.sources.immich_api import ApiError, ImmichApi
from immich_thumbnail_exporter.sources.postgres import SourceError
from immich_thumbnail_exporter.sources.redis import RedisSource, describe_redis_error


async def check_connections(config: Config) -> list[str]:
    """Try Redis and Immich's API as configured; print ``ok: ...`` lines, return one line per problem."""
    problems: list[str] = []
    if config.redis.enabled:
        source = RedisSource(config.redis)
        try:
            await source.ping()
            version = await source.server_version()
            queues, _ = await BullMQ(source, config.redis.prefix).discover(time.monotonic() + source.timeout * 2)
            prefix = config.redis.prefix
            what = f"{len(queues)} BullMQ queues under {prefix}:" if queues else (
                f"no BullMQ queues under {prefix}: yet (is this Immich's Redis, and the right database?)"
            )
            print(f"ok: redis {source.target}: {version}, {what}")
        except SourceError as exc:
            problems.append(f"redis: {exc}")
        except ResponseError as exc:
            problems.append(f"redis: {describe_redis_error(exc)}")
        finally:
            await source.close()
    if config.immich.enabled:
        api = ImmichApi(config.immich)
        limit = float(config.immich.timeout) + 2
        try:
            await asyncio.wait_for(api.ping(), limit)
            version = await asyncio.wait_for(api.version(), limit)
            stats = await asyncio.wait_for(api.queues(), limit)
            endpoint = "/api/queues" if api.queues_endpoint == "queues" else "/api/jobs"
            print(f"ok: immich API {api.base}: Immich {version}, {len(stats)} queues readable ({endpoint})")
        except ApiError as exc:
            problems.append(f"immich: {exc}")
        except TimeoutError:
            problems.append(f"immich: {api.base}: no answer within {limit:.0f}s")
        finally:
            await api.close()
    return problems
