"""Which of the asset ids that queued jobs name are assets in Immich's database (orphaned jobs).

One query per round, bounded by the number of jobs sampled (``redis.orphan_sample`` per queue), under
the caller's statement timeout. Read-only.
"""

from __future__ import annotations

from collections.abc import Sequence

from immich_thumbnail_exporter.sources.postgres import PostgresSource


async def assets_present(pg: PostgresSource, asset_ids: Sequence[str], timeout: float) -> set[str]:
    """The ids among ``asset_ids`` that are rows of the asset table now."""
    if not asset_ids:
        return set()
    schema = await pg.schema()
    table = schema.assets.replace('"', '""')
    async with pg.connection() as conn:
        rows = await conn.fetch(
            f'SELECT id::text AS id FROM "{table}" WHERE id = ANY($1::uuid[])', list(asset_ids), timeout=timeout
        )
    return {str(r["id"]) for r in rows}
