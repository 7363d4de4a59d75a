"""``check-config``'s look at the optional sources: can Redis and Immich's API be used as configured?

Each prints one ``ok: ...`` line when it works; every problem comes back as one line for the caller.
"""

from __future__ import annotations

import asyncio
import time

from redis.exceptions import ResponseError

from immich_thumbnail_exporter.config import Config
from immich_thumbnail_exporter.sources.bullmq import BullMQ
from immich_thumbnail_exporter.sources.immich_access import (
    QUEUE_FALLBACK,
    REGENERATION,
    describe_permissions,
    key_access,
)
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
        problems.extend(await _check_immich(config))
    return problems


async def _check_immich(config: Config) -> list[str]:
    """Immich's API: reachable, its release, what the key may do there (one line per feature), then the
    queue status when the key may read it. A refused feature is a problem only where the configuration
    relies on it: regeneration with remediation enabled, the queue status without Redis."""
    api = ImmichApi(config.immich)
    limit = float(config.immich.timeout) + 2
    problems: list[str] = []
    try:
        await asyncio.wait_for(api.ping(), limit)
        access = await asyncio.wait_for(key_access(api), limit * 3)
        print(f"ok: immich API {api.base}: Immich {access.shown}, API key with "
              f"{describe_permissions(access.permissions)}")
        for feature in access.features:
            needed = (feature.name == REGENERATION and config.remediation.enabled) or (
                feature.name == QUEUE_FALLBACK and not config.redis.enabled)
            if feature.allowed is False and needed:
                problems.append(f"immich: {feature.line}")
            else:
                print(f"{'ok' if feature.allowed else 'note'}: immich API key: {feature.line}")
        if access.feature(QUEUE_FALLBACK).allowed is not False:
            stats = await asyncio.wait_for(api.queues(), limit)
            endpoint = "/api/queues" if api.queues_endpoint == "queues" else "/api/jobs"
            print(f"ok: immich API {api.base}: {len(stats)} queues readable ({endpoint})")
    except ApiError as exc:
        problems.append(f"immich: {exc}")
    except TimeoutError:
        problems.append(f"immich: {api.base}: no answer within {limit:.0f}s")
    finally:
        await api.close()
    return problems
