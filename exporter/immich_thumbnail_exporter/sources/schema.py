"""Which Immich schema era a database is in, and the SQL names that era uses.

Detected at run time from the catalogue (``to_regclass``, ``information_schema.columns``), never from a
version string: a restored database can carry a version row that does not match its tables.

| era label  | Immich            | assets / files          | hidden assets              |
|------------|-------------------|-------------------------|----------------------------|
| ``v1.113+``| v1.113 - v1.132   | ``assets``/``asset_files``| ``"isVisible" = false``  |
| ``v1.133+``| v1.133 - v1.135   | ``assets``/``asset_files``| ``visibility = 'hidden'``|
| ``v1.136+``| v1.136 - v2.4     | ``asset``/``asset_file``  | ``visibility = 'hidden'``|
| ``v2.5+``  | v2.5 and later    | as v1.136+, ``asset_file."isEdited"`` | as above     |

The singular names (migration ``1752267649968-StandardizeNames``) and absolute paths
(``1752759108283-ConvertToAbsolutePaths``) both shipped in v1.136.0; see docs/immich-schema.md.

Besides the era, what a release may add on top: ``asset."isEdited"`` (v2.5, with the edited renditions
Immich's "Missing" rule asks for) and Immich v3's own ``integrity_report`` table (1781089983296-
CreateIntegrityReportTable), looked for every round by ``has_integrity_report``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class SchemaError(Exception):
    """The database is not an Immich schema this exporter understands."""


class Queryable(Protocol):
    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]: ...
    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any: ...


@dataclass(frozen=True)
class Schema:
    era: str
    assets: str
    files: str
    # SQL condition, on alias ``a``, for "Immich would show this asset and give it thumbnails".
    visible: str
    has_edited: bool
    # asset."isEdited" (1768757482271-SwitchToIsEdited, v2.5): an edited asset needs an edited fullsize.
    has_edited_assets: bool
    has_job_status: bool
    has_person_thumbnails: bool
    has_version_history: bool
    has_system_metadata: bool
    # Relative paths ("upload/...") were stored before ConvertToAbsolutePaths (v1.136).
    relative_paths_possible: bool

    def eligible(self, alias: str = "a") -> str:
        """Immich's own rule for assets that get thumbnails (``streamForThumbnailJob`` without the
        ``asset_job_status`` join, which ``immich_assets_metadata_pending`` reports on its own)."""
        vis = self.visible.replace("a.", f"{alias}.")
        return f"{alias}.\"deletedAt\" IS NULL AND {vis} AND {alias}.type IN ('IMAGE', 'VIDEO')"


# What the exporter reads of integrity_report; its "path" never leaves the database.
INTEGRITY_REPORT_COLUMNS = frozenset({"type", "createdAt", "assetId", "fileAssetId"})


async def _columns(db: Queryable, table: str, timeout: float) -> set[str]:
    # From pg_attribute, not information_schema.columns: the latter lists only the columns the role may
    # read, so a missing GRANT would look like an unknown schema instead of "permission denied".
    rows = await db.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
        table,
        timeout=timeout,
    )
    return {str(r["attname"]) for r in rows}


async def has_integrity_report(db: Queryable, timeout: float) -> bool:
    """Whether Immich v3's integrity_report is there with the columns we read. Cheap (the catalogue
    only), so it is asked every round: an Immich upgraded to v3 under a running exporter is seen."""
    return INTEGRITY_REPORT_COLUMNS.issubset(await _columns(db, "integrity_report", timeout))


async def _exists(db: Queryable, table: str, timeout: float) -> bool:
    # to_regclass() returns NULL instead of raising when the table is absent.
    return bool(await db.fetchval("SELECT to_regclass($1) IS NOT NULL", table, timeout=timeout))


async def detect(db: Queryable, timeout: float = 10.0) -> Schema:
    """Inspect the catalogue and return the era, or raise SchemaError naming what was found."""
    exists = {t: await _exists(db, t, timeout) for t in (
        "asset", "asset_file", "assets", "asset_files", "asset_job_status", "person",
        "version_history", "system_metadata",
    )}
    common: dict[str, bool] = {
        "has_job_status": exists["asset_job_status"],
        "has_version_history": exists["version_history"],
        "has_system_metadata": exists["system_metadata"],
    }
    person_cols = await _columns(db, "person", timeout) if exists["person"] else set()
    common["has_person_thumbnails"] = "thumbnailPath" in person_cols

    if exists["asset"] and exists["asset_file"]:
        cols = await _columns(db, "asset", timeout)
        fcols = await _columns(db, "asset_file", timeout)
        _require(cols, {"id", "ownerId", "type", "originalPath", "deletedAt", "visibility", "thumbhash"}, "asset")
        _require(fcols, {"assetId", "type", "path"}, "asset_file")
        edited = "isEdited" in fcols
        return Schema(
            era="v2.5+" if edited else "v1.136+",
            assets="asset",
            files="asset_file",
            visible="a.visibility <> 'hidden'",
            has_edited=edited,
            has_edited_assets=edited and "isEdited" in cols,
            relative_paths_possible=False,
            **common,
        )
    if exists["assets"] and exists["asset_files"]:
        cols = await _columns(db, "assets", timeout)
        fcols = await _columns(db, "asset_files", timeout)
        _require(cols, {"id", "ownerId", "type", "originalPath", "deletedAt", "thumbhash"}, "assets")
        _require(fcols, {"assetId", "type", "path"}, "asset_files")
        if "visibility" in cols:
            era, visible = "v1.133+", "a.visibility <> 'hidden'"
        elif "isVisible" in cols:
            era, visible = "v1.113+", 'a."isVisible" = true'
        else:
            raise SchemaError("table assets has neither a visibility nor an isVisible column: unknown Immich schema")
        return Schema(
            era=era,
            assets="assets",
            files="asset_files",
            visible=visible,
            has_edited=False,
            has_edited_assets=False,
            relative_paths_possible=True,
            **common,
        )
    if exists["assets"]:
        cols = await _columns(db, "assets", timeout)
        legacy = sorted(cols & {"previewPath", "thumbnailPath", "resizePath", "webpPath"})
        if legacy:
            raise SchemaError(
                "unsupported Immich schema: table assets has "
                f"{', '.join(legacy)} and there is no asset_files table (Immich v1.112 or older); "
                "upgrade Immich to v1.113 or later"
            )
    found = await db.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
        "ORDER BY table_name LIMIT 12",
        timeout=timeout,
    )
    names = ", ".join(str(r["table_name"]) for r in found) or "no tables"
    raise SchemaError(
        f"not an Immich database this exporter knows: no asset/asset_file or assets/asset_files tables "
        f"(found: {names})"
    )


def _require(have: set[str], need: set[str], table: str) -> None:
    missing = sorted(need - have)
    if missing:
        raise SchemaError(f"unknown Immich schema: table {table} lacks column(s) {', '.join(missing)}")
