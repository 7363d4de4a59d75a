"""What an API key may do on the Immich release it talks to, known before anything is sent.

``allowed(version, permissions, is_admin)`` is pure: the release's route rules (docs/permissions.md,
with the Immich sources for each row) applied to what ``GET /api/api-keys/me`` (the key's permissions,
v2.4+; older releases cannot tell a key its permissions) and ``GET /api/users/me`` (whether its user is
an admin) said. ``key_access(api)`` makes those calls. Three features:

* ``regeneration``: ``POST /api/assets/jobs``. v1.132-v1.135: the route declares no permission and an
  API key is checked only against a declared one, so any key passes. v1.136-v3.1: an undeclared route
  requires ``all`` (PR #20113). v3.2: the route declares ``job.create``. In every release Immich then
  checks owner access per asset (not a key permission).
* ``face thumbnails``: ``PUT /api/people/{id}`` with ``featureFaceAssetId``: ``person.update`` (and read
  access to the asset, which is ownership, not a key permission).
* ``queue fallback``: queue depth from the API when Redis is not reachable: ``GET /api/queues`` (v2.4+,
  admin, ``queue.read``) or ``GET /api/jobs`` (admin; ``job.read`` from v1.137, ``all`` on v1.136, no
  permission before).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from immich_thumbnail_exporter.config import ImmichConfig
from immich_thumbnail_exporter.sources.immich_api import ApiAuthError, ApiError, ApiNotFound, ImmichApi

Version = tuple[int, int, int]

REGENERATION = "regeneration"
FACES = "face thumbnails"
QUEUE_FALLBACK = "queue fallback"


@dataclass(frozen=True)
class Feature:
    name: str
    allowed: bool | None  # None: cannot tell
    missing: str | None  # the permission the key lacks, or "admin" for a non-admin user
    line: str


def regeneration_permission(version: Version) -> str | None:
    """The API-key permission ``POST /api/assets/jobs`` requires (None: any valid key)."""
    if version < (1, 136, 0):
        return None
    if version < (3, 2, 0):
        return "all"
    return "job.create"


def queue_route(version: Version) -> tuple[str, str | None]:
    """The queue-status route and the permission it requires (both are admin-only)."""
    if version >= (2, 4, 0):
        return "GET /api/queues", "queue.read"
    if version >= (1, 137, 0):
        return "GET /api/jobs", "job.read"
    if version >= (1, 136, 0):
        return "GET /api/jobs", "all"
    return "GET /api/jobs", None


def _has(permissions: Sequence[str], wanted: str | None) -> bool:
    return wanted is None or "all" in permissions or wanted in permissions


def _release(version: Version) -> str:
    return "Immich v{}.{}.{}".format(*version)


def allowed(version: Version, permissions: Sequence[str] | None, is_admin: bool | None) -> list[Feature]:
    """One ``Feature`` per feature: allowed, refused (with the missing permission) or unknown."""
    rel = _release(version)
    out: list[Feature] = []

    def feature(name: str, route: str, need: str | None, admin: bool = False) -> None:
        needs = f"{route} needs {need} on {rel}" if need else f"{route} needs no key permission on {rel}"
        if admin:
            needs += ", and an admin user"
        if need is not None and permissions is not None and not _has(permissions, need):
            out.append(Feature(name, False, need, f"{name}: refused: the API key lacks permission {need} ({needs})"))
        elif admin and is_admin is False:
            out.append(Feature(name, False, "admin", f"{name}: refused: the API key's user is not an admin ({needs})"))
        elif (need is not None and permissions is None) or (admin and is_admin is None):
            why = ("this Immich cannot tell a key its permissions (no GET /api/api-keys/me before v2.4)"
                   if need is not None and permissions is None else "the key may not read GET /api/users/me")
            out.append(Feature(name, None, None, f"{name}: cannot tell: {why} ({needs})"))
        else:
            out.append(Feature(name, True, None, f"{name}: allowed ({needs})"))

    feature(REGENERATION, "POST /api/assets/jobs", regeneration_permission(version))
    feature(FACES, "PUT /api/people/{id}", "person.update")
    route, need = queue_route(version)
    feature(QUEUE_FALLBACK, route, need, admin=True)
    return out


@dataclass(frozen=True)
class KeyAccess:
    version: Version
    shown: str  # the version as Immich shows it (v3.2.0-rc.1)
    permissions: tuple[str, ...] | None
    is_admin: bool | None
    features: list[Feature]

    def feature(self, name: str) -> Feature:
        return next(f for f in self.features if f.name == name)


def parse_version(doc: object) -> Version:
    if isinstance(doc, dict):
        parts = [doc.get(k) for k in ("major", "minor", "patch")]
        if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in parts):
            return parts[0], parts[1], parts[2]  # type: ignore[return-value]
    raise ApiError("GET /api/server/version: unexpected answer")


async def key_access(api: ImmichApi) -> KeyAccess:
    """Ask Immich (three GETs, nothing changed) what the configured key may do. A rejected key
    (401) raises ``ApiAuthError``; a route the key may not read leaves that part unknown."""
    from immich_thumbnail_exporter.sources.immich_api import format_version

    doc = await api.request("GET", "server/version")
    version = parse_version(doc)
    shown = format_version(doc)
    permissions: tuple[str, ...] | None = None
    try:
        mine = await api.request("GET", "api-keys/me")
    except ApiAuthError as exc:
        if exc.status == 401:
            raise
    except (ApiNotFound, ApiError) as exc:
        # Before v2.4 "me" is taken for a key id: 400 "id must be a UUID". Anything else is news.
        if exc.status not in (400, 404):
            raise
    else:
        perms = mine.get("permissions") if isinstance(mine, dict) else None
        if isinstance(perms, list) and all(isinstance(p, str) for p in perms):
            permissions = tuple(perms)
    is_admin: bool | None = None
    try:
        me = await api.request("GET", "users/me")
    except ApiAuthError as exc:
        if exc.status == 401:
            raise
    except ApiNotFound:
        pass
    else:
        if isinstance(me, dict) and isinstance(me.get("isAdmin"), bool):
            is_admin = me["isAdmin"]
    return KeyAccess(version, shown, permissions, is_admin, allowed(version, permissions, is_admin))


def describe_permissions(permissions: tuple[str, ...] | None) -> str:
    if permissions is None:
        return "permissions not readable"
    listed = ", ".join(sorted(permissions)) or "none"
    return "permissions " + (listed if len(listed) <= 120 else listed[:120] + "...")


async def preflight(config: ImmichConfig, feature: str = REGENERATION) -> tuple[list[str], str | None]:
    """Before ``regenerate --apply`` sends anything: the key's feature lines, and the one line to stop on
    when the key cannot do ``feature`` on this release (a rejected key included). When Immich cannot
    be asked, nothing is decided here: the run reports that error itself."""
    import asyncio

    api = ImmichApi(config)
    try:
        access = await asyncio.wait_for(key_access(api), float(config.timeout) * 3 + 2)
    except ApiAuthError as exc:
        return [], f"immich: {exc}"
    except (ApiError, TimeoutError) as exc:
        return [f"note: the API key was not checked first: {exc or 'no answer'}"], None
    finally:
        await api.close()
    lines = [f"immich {access.shown}: API key with {describe_permissions(access.permissions)}"]
    lines += [f.line for f in access.features]
    wanted = access.feature(feature)
    return lines, (wanted.line if wanted.allowed is False else None)
