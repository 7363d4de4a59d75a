"""The HTTP server: ``/metrics``, ``/healthz``, ``/readyz``, ``/problems`` and a small status page.

Every handler reads the store and nothing else: no handler waits on PostgreSQL, Redis, the API or the
disk, so a scrape answers in milliseconds whatever the backends are doing. Access logs are off unless
the log level is debug, like Prometheus' own exporters.
"""

from __future__ import annotations

import gzip
import html
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder

from immich_thumbnail_exporter import __version__
from immich_thumbnail_exporter.exposition.webconfig import WebConfig
from immich_thumbnail_exporter.findings import ProblemFeed
from immich_thumbnail_exporter.store import Store, StoreCollector
from immich_thumbnail_exporter.vocabulary import PROBLEM_KINDS, REASONS

log = logging.getLogger(__name__)

STORE: web.AppKey[Store] = web.AppKey("store", Store)
# None when the file check is off: /problems then says so.
PROBLEMS: web.AppKey[ProblemFeed | None] = web.AppKey("problems")
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry", CollectorRegistry)
MAX_PAGE = 10_000


def build_registry(store: Store) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(store))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


# A rendered exposition is sent again, for up to this long, to requests that ask for the same format
# while nothing in the store has changed: fifty scrapers a second cost one render (about a millisecond
# of the event loop), not fifty. Values computed at render time (the process's CPU and memory, the age
# of the oldest job) are at most this old; anything a collection publishes shows at once.
RENDER_TTL = 1.0


@dataclass
class _Rendered:
    format: tuple[str, bool]
    state: tuple[Any, ...]
    expires: float
    body: bytes
    headers: dict[str, str]


RENDERED: web.AppKey[list[_Rendered]] = web.AppKey("rendered", list)


def _state(store: Store) -> tuple[Any, ...]:
    """What a render depends on: the store replaces these objects whenever it changes."""
    return (store.sources, *(store.result(c) for c in store.collections))


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    fmt = (content_type, "gzip" in request.headers.get("Accept-Encoding", ""))
    state = _state(request.app[STORE])
    now = time.monotonic()
    cache = request.app[RENDERED]
    for hit in cache:
        if (hit.format == fmt and hit.expires > now and len(hit.state) == len(state)
                and all(a is b for a, b in zip(hit.state, state, strict=True))):
            return web.Response(body=hit.body, headers=hit.headers)
    body = encoder(registry)
    headers = {"Content-Type": content_type}
    if fmt[1]:
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    cache[:] = [h for h in cache if h.format != fmt and h.expires > now][:3]
    cache.append(_Rendered(fmt, state, now + RENDER_TTL, body, headers))
    return web.Response(body=body, headers=headers)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    if request.app[STORE].ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="first collection round not finished yet\n")


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def problems(request: web.Request) -> web.Response:
    """The last file check's problem rows (``Problem.to_dict``). A face thumbnail's row has ``kind``
    ``person`` and the same fields, read for the person: ``asset_id`` is the person's id, ``asset_type``
    ``person``, ``path`` its ``thumbnailPath``, ``original_*`` the original of its feature face's asset."""
    store = request.app[STORE]
    query = request.query
    kind, reason = query.get("kind"), query.get("reason")
    if kind is not None and kind not in PROBLEM_KINDS:
        return _bad_request(f"kind must be one of {', '.join(PROBLEM_KINDS)}")
    if reason is not None and reason not in REASONS:
        return _bad_request(f"reason must be one of {', '.join(REASONS)}")
    try:
        limit = int(query.get("limit", "1000"))
        offset = int(query.get("offset", "0"))
    except ValueError:
        return _bad_request("limit and offset must be integers")
    if not 0 < limit <= MAX_PAGE or offset < 0:
        return _bad_request(f"limit must be 1 to {MAX_PAGE}, offset 0 or more")
    feed = request.app[PROBLEMS]
    if feed is None:
        return web.json_response(
            {"error": "the file check is off: set media.root (and leave --collector.files on) to list problems"},
            status=404,
        )
    snapshot = feed.latest()
    if snapshot is None:
        result = store.result("files")
        error = f"the last file check failed: {result.error}" if result else "no file check has finished yet"
        return web.json_response({"error": error}, status=503)
    items = snapshot.problems
    selected = [p for p in items if (kind is None or p.kind == kind) and (reason is None or p.reason == reason)]
    page = [p.to_dict() for p in selected[offset : offset + limit]]
    headers = {
        "X-Total-Count": str(len(selected)),
        "X-Scan-Finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snapshot.finished_at)),
    }
    if snapshot.truncated:
        headers["X-Problems-Truncated"] = str(snapshot.total)
    return web.json_response(page, headers=headers, dumps=lambda o: json.dumps(o, separators=(",", ":")))


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


async def index(request: web.Request) -> web.Response:
    store = request.app[STORE]
    rows = []
    for name, source in store.sources.items():
        status = "up" if source.up else f"down: {source.error or 'unknown'}"
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(status)}</td></tr>")
    colls = []
    for name in store.collections:
        res = store.result(name)
        if res is None:
            colls.append(f"<tr><td>{name}</td><td>not run yet</td><td></td><td></td></tr>")
            continue
        state = "ok" if res.success else f"failed: {res.error}"
        colls.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(state)}</td>"
            f"<td>{res.duration:.2f}s</td><td>{_when(store.last_success(name))}</td></tr>"
        )
    feed = request.app[PROBLEMS]
    snapshot = feed.latest() if feed is not None else None
    summary = ""
    if snapshot is not None:
        summary = (
            f"<p>Last file check: {_when(snapshot.finished_at)}, {snapshot.total} problem "
            f"file(s), {snapshot.orphaned_files} orphaned file(s). "
            f"<a href='problems'>List the problems</a>.</p>"
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Immich thumbnail exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 12px;text-align:left}}</style></head>
<body><h1>Immich thumbnail exporter</h1>
<p>Version {html.escape(__version__)}. <a href="metrics">Metrics</a> · <a href="healthz">Health</a> ·
<a href="readyz">Readiness</a> · <a href="problems">Problems (JSON)</a></p>
{summary}
<h2>Sources</h2><table><tr><th>source</th><th>state</th></tr>{''.join(rows)}</table>
<h2>Collections</h2><table><tr><th>collection</th><th>last run</th><th>took</th><th>last success</th></tr>
{''.join(colls)}</table>
</body></html>
"""
    return web.Response(text=page, content_type="text/html")


def build_app(store: Store, web_config: WebConfig, feed: ProblemFeed | None = None) -> web.Application:
    app = web.Application(middlewares=[web_config.middleware(frozenset({"/healthz"}))])
    app[STORE] = store
    app[PROBLEMS] = feed
    app[REGISTRY] = build_registry(store)
    app[RENDERED] = []
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/problems", problems)
    app.router.add_get("/", index)
    return app


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """``:9813``, ``0.0.0.0:9813``, ``[::1]:9813`` -> (host or None for all, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--web.listen-address: expected host:port, got {address!r}")
    host = host.strip("[]")
    return (host or None), int(port)
