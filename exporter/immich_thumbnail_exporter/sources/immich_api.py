"""Immich's HTTP API, with an API key (header ``x-api-key``).

Used for queue depth and pause state when Redis is not reachable from the exporter, for the server
version, and, only when asked, to request thumbnail regeneration. Every request has a timeout. A wrong
key (401) or a key without the needed permission (403) is an ``ApiAuthError``: the caller logs it once
and reports the source down instead of retrying in a storm.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from immich_thumbnail_exporter import __version__
from immich_thumbnail_exporter.config import ImmichConfig
from immich_thumbnail_exporter.sources.postgres import SourceError
from immich_thumbnail_exporter.vocabulary import QUEUE_STATES

log = logging.getLogger(__name__)

SOURCE = "immich_api"


class ApiError(SourceError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(SOURCE, message)
        self.status = status


class ApiAuthError(ApiError):
    """401/403: retrying will not help until someone fixes the key or its permissions."""


class ApiNotFound(ApiError):
    """404: the endpoint does not exist on this Immich version."""




@dataclass(frozen=True)
class QueueStats:
    """One queue as Immich's API reports it (``GET /api/queues`` or the older ``GET /api/jobs``)."""

    name: str
    paused: bool
    counts: dict[str, int] = field(default_factory=dict)


def _counts(doc: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(doc, dict):
        for state in QUEUE_STATES:
            value = doc.get(state)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[state] = int(value)
    return out


def parse_queues(doc: Any) -> list[QueueStats]:
    """``GET /api/queues`` (v2.4+): ``[{name, isPaused, statistics: {active, waiting, ...}}]``."""
    if not isinstance(doc, list):
        raise ApiError("GET /api/queues: unexpected answer (expected a list)")
    out = []
    for item in doc:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            out.append(QueueStats(item["name"], bool(item.get("isPaused")), _counts(item.get("statistics"))))
    return out


def parse_jobs(doc: Any) -> list[QueueStats]:
    """``GET /api/jobs`` (before v2.4): ``{queue: {jobCounts: {...}, queueStatus: {isActive, isPaused}}}``."""
    if not isinstance(doc, dict):
        raise ApiError("GET /api/jobs: unexpected answer (expected an object)")
    out = []
    for name, item in doc.items():
        if isinstance(item, dict):
            status = item.get("queueStatus")
            paused = bool(status.get("isPaused")) if isinstance(status, dict) else False
            out.append(QueueStats(str(name), paused, _counts(item.get("jobCounts"))))
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def format_version(doc: Any) -> str:
    """``GET /api/server/version``: ``{major, minor, patch}``, and from v3.0 ``prerelease`` (a release
    candidate's number, or null)."""
    if not isinstance(doc, dict) or not all(_number(doc.get(k)) for k in ("major", "minor", "patch")):
        raise ApiError("GET /api/server/version: unexpected answer")
    text = f"v{doc['major']}.{doc['minor']}.{doc['patch']}"
    prerelease = doc.get("prerelease")
    return f"{text}-rc.{prerelease}" if _number(prerelease) else text


def _message(body: str) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body.strip()[:200]
    if isinstance(doc, dict):
        msg = doc.get("message")
        if isinstance(msg, list):
            msg = "; ".join(str(m) for m in msg)
        return str(msg or doc.get("error") or "")[:200]
    return ""


class ImmichApi:
    def __init__(self, config: ImmichConfig) -> None:
        if config.url is None:
            raise ValueError("immich.url is not set")
        self.config = config
        self.base = config.url.rstrip("/")
        if self.base.endswith("/api"):
            self.base = self.base[: -len("/api")]
        self._session: aiohttp.ClientSession | None = None
        # "queues" (v2.4+) or "jobs" (older), once known.
        self.queues_endpoint: str | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"immich-thumbnail-exporter/{__version__}"}
        if self.config.api_key:
            # Read on every request so a rotated key file takes effect at once.
            headers["x-api-key"] = self.config.api_key.get()
        return headers

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout, connect=min(5.0, self.config.timeout))
            self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=4))
        return self._session

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        url = f"{self.base}/api/{path.lstrip('/')}"
        try:
            async with self.session().request(method, url, json=body, headers=self._headers()) as resp:
                text = await resp.text()
                if resp.status in (401, 403):
                    what = "API key rejected" if resp.status == 401 else "API key lacks the permission for"
                    detail = _message(text)
                    suffix = f": {detail}" if detail else ""
                    raise ApiAuthError(
                        f"{what} {method} /api/{path.lstrip('/')} (HTTP {resp.status}{suffix})", resp.status
                    )
                if resp.status == 404:
                    raise ApiNotFound(f"{method} /api/{path.lstrip('/')}: not found (HTTP 404)", 404)
                if resp.status >= 400:
                    detail = _message(text)
                    raise ApiError(
                        f"{method} /api/{path.lstrip('/')}: HTTP {resp.status}{': ' + detail if detail else ''}",
                        resp.status,
                    )
                if not text:
                    return None
                try:
                    return json.loads(text)
                except ValueError:
                    raise ApiError(f"{method} /api/{path.lstrip('/')}: answer is not JSON", resp.status) from None
        except ApiError:
            raise
        except TimeoutError:
            raise ApiError(f"{method} /api/{path.lstrip('/')}: no answer within {self.config.timeout:.0f}s") from None
        except aiohttp.ClientError as exc:
            raise ApiError(f"cannot reach {self.base}: {exc}") from None

    async def ping(self) -> None:
        doc = await self.request("GET", "server/ping")
        if not isinstance(doc, dict) or doc.get("res") != "pong":
            raise ApiError(f"{self.base} does not answer like Immich (GET /api/server/ping)")

    async def version(self) -> str:
        """The server's version as Immich itself shows it: ``v3.1.0``, or ``v3.2.0-rc.1`` for a release
        candidate (v3's ``prerelease`` field, rendered as Immich's web UI does). The same text as
        ``version_history`` gives ``immich_server_info{version}``."""
        return format_version(await self.request("GET", "server/version"))

    async def queues(self) -> list[QueueStats]:
        """Every queue's job counts and pause state (needs an admin key, permission ``queue.read``).

        Uses ``GET /api/queues`` (v2.4+) and falls back to ``GET /api/jobs`` when the server answers 404,
        as servers before v2.4 do; the endpoint that worked is remembered."""
        if self.queues_endpoint != "jobs":
            try:
                doc = await self.request("GET", "queues")
            except ApiNotFound:
                if self.queues_endpoint == "queues":
                    raise
                log.info("%s has no GET /api/queues (Immich before v2.4): using GET /api/jobs", self.base)
                self.queues_endpoint = "jobs"
            else:
                self.queues_endpoint = "queues"
                return parse_queues(doc)
        return parse_jobs(await self.request("GET", "jobs"))

    async def regenerate_thumbnails(self, asset_ids: Sequence[str]) -> None:
        """Ask Immich to regenerate these assets' thumbnails. Immich answers 204 when it *accepted* the
        request: that says nothing about whether a worker will ever process it."""
        await self.request("POST", "assets/jobs", {"name": "regenerate-thumbnail", "assetIds": list(asset_ids)})

    async def set_feature_face(self, person_id: str, asset_id: str) -> None:
        """Have Immich remake a person's face thumbnail: ``PUT /api/people/{id}`` with
        ``featureFaceAssetId`` (permission ``person.update``; the asset must hold a face of that person).
        Immich's person.service.ts queues ``PersonGenerateThumbnail {id}`` whenever the field is given,
        even when it names the face already featured, so passing the current feature face's asset remakes
        the thumbnail without changing which face is shown (docs/permissions.md). The answer (the person)
        says nothing about the job: only the queue and the file do."""
        # Ids are checked as UUIDs here: a path segment from the database is never sent unchecked.
        await self.request("PUT", f"people/{uuid.UUID(person_id)}", {"featureFaceAssetId": str(uuid.UUID(asset_id))})

    async def me(self) -> str:
        """The id of the user the API key belongs to (``GET /api/users/me``, permission ``user.read``).

        Immich lets a key regenerate only its own user's assets: ``POST /api/assets/jobs`` checks
        ``asset.update`` access, which is ownership, for every id, admin or not."""
        doc = await self.request("GET", "users/me")
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            raise ApiError("GET /api/users/me: unexpected answer")
        return str(doc["id"])

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._session.close(), 2)
        self._session = None
