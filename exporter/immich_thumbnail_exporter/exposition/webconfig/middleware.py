"""The aiohttp middleware applying a web configuration to every request."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from immich_thumbnail_exporter.exposition.webconfig.auth import BasicAuth, basic_credentials
from immich_thumbnail_exporter.exposition.webconfig.parts import RateLimit
from immich_thumbnail_exporter.exposition.webconfig.tls import client_san_allowed, normalise_san
from immich_thumbnail_exporter.timing import RateLimiter

log = logging.getLogger(__name__)


def build_middleware(
    *,
    headers: tuple[tuple[str, str], ...],
    users: tuple[tuple[str, str], ...],
    rate_limit: RateLimit | None,
    client_allowed_sans: tuple[str, ...] | None,
    open_paths: frozenset[str],
    auth_timeout: float,
) -> Middleware:
    """In order: the client certificate's SANs (403, every path), then for paths not in ``open_paths`` the
    rate limit (429) and basic auth (401 with ``WWW-Authenticate: Basic``; 503 when the bcrypt check does
    not finish within ``auth_timeout`` seconds). ``headers`` are set on every response, errors included."""
    auth = BasicAuth(users, auth_timeout) if users else None
    # One bucket shared by every guarded request: the exporter-toolkit's limiter is global, not per client.
    bucket = RateLimiter(1.0 / rate_limit.interval, rate_limit.burst) if rate_limit is not None else None
    allowed_sans = None
    if client_allowed_sans is not None:
        allowed_sans = frozenset(normalise_san(s) for s in client_allowed_sans)

    async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        if allowed_sans is not None and not client_san_allowed(request, allowed_sans):
            return web.Response(status=403, text="Forbidden\n")
        if request.path in open_paths:
            return await handler(request)
        if bucket is not None and not bucket.allow():
            return web.Response(status=429, text="Too Many Requests\n")
        if auth is not None:
            credentials = basic_credentials(request)
            try:
                ok = credentials is not None and await auth.check(*credentials)
            except TimeoutError:
                log.warning("basic auth: bcrypt verification took longer than %ss", auth_timeout)
                return web.Response(status=503, text="Service Unavailable\n")
            if not ok:
                return web.Response(status=401, text="Unauthorized\n", headers={"WWW-Authenticate": "Basic"})
        return await handler(request)

    @web.middleware
    async def web_config_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await guarded(request, handler)
        except web.HTTPException as exc:
            _set_headers(exc, headers)
            raise
        _set_headers(response, headers)
        return response

    return web_config_middleware


def _set_headers(response: web.StreamResponse, headers: tuple[tuple[str, str], ...]) -> None:
    if response.prepared:  # already sent (a streamed response): too late
        return
    for name, value in headers:
        response.headers[name] = value
