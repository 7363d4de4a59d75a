"""Immich's Redis/Valkey (BullMQ), read-only.

The exporter only ever sends read commands (LLEN, ZCARD, LRANGE, ZRANGE, LPOS, ZRANK, ZSCORE, HGET, HMGET,
EXISTS, SCAN, XRANGE, XREVRANGE, XREAD, XINFO, CLIENT LIST, PING) plus MULTI/EXEC around reads, and the
connection set-up of the client library (AUTH/HELLO, SELECT, CLIENT SETNAME on its own connection). It
never writes a key, never creates a consumer group and never touches a connection other than its own.

Connection settings follow Immich's ``REDIS_*`` variables (see ``RedisConfig``): a URL, a unix socket, or
host/port/db with optional username and password. The password (or the whole URL) can come from a file:
it is read again whenever a connection is made, and the client is thrown away after any connection
error or timeout, so the next round reconnects from scratch with the current secret.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # redis-py 7+: no "maintenance notifications" handshake (a managed-cloud feature) on our connections
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

from immich_thumbnail_exporter.config import RedisConfig, redact_url
from immich_thumbnail_exporter.sources.postgres import SourceError

log = logging.getLogger(__name__)

SOURCE = "redis"
CLIENT_NAME = "immich-thumbnail-exporter"
# The one connection that follows BullMQ's event streams (a blocking XREAD), named apart from the pooled
# ones so that an operator (and a test) can count it in CLIENT LIST.
EVENTS_CLIENT_NAME = f"{CLIENT_NAME}:events"
T = TypeVar("T")


class _SecretCredentials(CredentialProvider):
    """Reads the password on every new connection, so a rotated password file takes effect at once."""

    def __init__(self, config: RedisConfig, username: str | None) -> None:
        self.config = config
        self.username = username

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self.config.password.get() if self.config.password else ""
        if self.username:
            return (self.username, password)
        return (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def describe_redis_error(exc: BaseException) -> str:
    """One line for a Redis problem, without secrets."""
    if isinstance(exc, asyncio.TimeoutError | TimeoutError | RedisTimeoutError):
        return "timed out"
    if isinstance(exc, AuthenticationError):
        return "authentication failed (check redis.password / REDIS_PASSWORD)"
    if isinstance(exc, NoPermissionError | AuthorizationError):
        return f"permission denied: {_first_line(exc)}"
    if isinstance(exc, ResponseError):
        text = _first_line(exc)
        if text.upper().startswith("NOAUTH"):
            return "the server requires a password (set redis.password / REDIS_PASSWORD)"
        if text.upper().startswith("WRONGPASS"):
            return "authentication failed (check redis.password / REDIS_PASSWORD)"
        return text
    if isinstance(exc, RedisConnectionError):
        text = _first_line(exc)
        lowered = text.lower()
        errno = re.match(r"error (\d+) connecting", lowered)
        if errno:
            return os.strerror(int(errno.group(1))).lower()
        if "connection refused" in lowered:
            return "connection refused"
        if "name or service not known" in lowered or "nodename nor servname" in lowered:
            return "unknown host"
        if "no such file" in lowered:
            return "socket not found"
        if "closed by server" in lowered or "connection reset" in lowered:
            return "connection closed by the server"
        return text or "connection error"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return _first_line(exc) or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def is_permission_error(exc: BaseException) -> bool:
    """The server refuses a command (ACL, renamed or disabled command, managed Redis)."""
    if isinstance(exc, NoPermissionError | AuthorizationError):
        return True
    if isinstance(exc, ResponseError):
        text = str(exc).lower()
        return "noperm" in text or "unknown command" in text or "not allowed" in text or "disabled" in text
    return False


class RedisSource:
    """The one way the exporter talks to Redis: a lazily built asyncio client with timeouts on everything,
    rebuilt after any connection error (so a rotated password file takes effect).

    Use ``await source.run(what, fn, timeout)``: ``fn`` gets the client; backend trouble comes back as
    ``SourceError("redis", one line)``, a refused command as ``ResponseError``. Short-lived users write
    ``async with RedisSource(config) as source: ...``.
    """

    name = SOURCE

    def __init__(self, config: RedisConfig, connections: int = 4, name: str = CLIENT_NAME) -> None:
        self.config = config
        # At most this many connections at once (a blocking XREAD needs one of its own: ``connections=1``).
        self.connections = connections
        self.name = name
        self._client: aioredis.Redis | None = None
        self._on_close: list[Callable[[], Awaitable[None]]] = []

    def on_close(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` when this source is closed: what was built on it (a subscription) ends with it."""
        self._on_close.append(hook)

    async def __aenter__(self) -> RedisSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def timeout(self) -> float:
        return float(self.config.timeout)

    @property
    def target(self) -> str:
        """Where we connect, for logs: never includes the password."""
        cfg = self.config
        if cfg.url:
            try:
                url = cfg.url.get()
            except Exception:
                return "<redis.url>"
            # redact_url also hides ?password=... and anything it cannot parse.
            return redact_url(url)
        if cfg.socket:
            return f"unix:{cfg.socket} db {cfg.db}"
        user = f"{cfg.username}@" if cfg.username else ""
        return f"{user}{cfg.host}:{cfg.port}/{cfg.db}"

    def _build(self) -> aioredis.Redis:
        cfg = self.config
        common: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            # A pooled connection idle for longer than this is PINGed before use, so a restarted server
            # is noticed on the connection rather than half-way through a pipeline.
            "health_check_interval": 10,
            # One immediate retry for a connection that went stale; never the library's backoff, which
            # would hide an outage behind several seconds of sleeping.
            # The asyncio client's own Retry: redis-py 8 warns about the synchronous one.
            "retry": Retry(NoBackoff(), 1),
            "client_name": self.name,
            "decode_responses": True,
            "encoding_errors": "replace",
            "protocol": 2,
            "max_connections": self.connections,
        }
        if MaintNotificationsConfig is not None:
            common["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        if cfg.url:
            url = cfg.url.get()
            kwargs = dict(common)
            parts = urlsplit(url)
            if cfg.password and not parts.password:
                # REDIS_URL without a password plus REDIS_PASSWORD(_FILE): the password file is read on
                # every connection; the URL's user name, if any, goes with it.
                username = unquote(parts.username) if parts.username else cfg.username
                url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
                kwargs["credential_provider"] = _SecretCredentials(cfg, username)
            return aioredis.Redis.from_url(url, **kwargs)
        kwargs = dict(common)
        if cfg.password or cfg.username:
            kwargs["credential_provider"] = _SecretCredentials(cfg, cfg.username)
        if cfg.socket:
            return aioredis.Redis(unix_socket_path=cfg.socket, db=cfg.db, **kwargs)
        return aioredis.Redis(host=cfg.host or "localhost", port=cfg.port, db=cfg.db, **kwargs)

    def client(self) -> aioredis.Redis:
        if self._client is None:
            try:
                self._client = self._build()
            except (ValueError, RedisError) as exc:
                problem = f"invalid connection settings for {self.target}: {_first_line(exc)}"
                raise SourceError(SOURCE, problem) from None
        return self._client

    async def run(self, what: str, fn: Callable[[aioredis.Redis], Awaitable[T]], timeout: float | None = None) -> T:
        """Run ``fn`` on the client under a deadline; turn every backend problem into a SourceError.

        After a connection error or a timeout the client is thrown away, so the next call reconnects
        (and re-reads the password). A command the server refuses is re-raised as is (ResponseError), for
        the caller to decide (CLIENT LIST may be disabled on managed servers).
        """
        client = self.client()
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        try:
            return await asyncio.wait_for(fn(client), max(0.05, limit))
        except asyncio.CancelledError:
            # Cancelled half-way through a command: the connection's state is unknown.
            self._discard()
            raise
        except (TimeoutError, RedisTimeoutError):
            self._discard()
            raise SourceError(SOURCE, f"{self.target}: no answer to {what} within {limit:.1f}s") from None
        except (AuthenticationError, AuthorizationError) as exc:
            self._discard()
            raise SourceError(SOURCE, f"{self.target}: {describe_redis_error(exc)}") from None
        except RedisConnectionError as exc:
            self._discard()
            raise SourceError(SOURCE, f"cannot connect to {self.target}: {describe_redis_error(exc)}") from None
        except ResponseError as exc:
            text = str(exc).upper()
            if text.startswith(("NOAUTH", "WRONGPASS", "LOADING", "MASTERDOWN", "BUSY")):
                self._discard()
                raise SourceError(SOURCE, f"{self.target}: {describe_redis_error(exc)}") from None
            raise
        except OSError as exc:
            self._discard()
            raise SourceError(SOURCE, f"cannot connect to {self.target}: {describe_redis_error(exc)}") from None

    async def ping(self, timeout: float | None = None) -> None:
        async def _ping(client: aioredis.Redis) -> None:
            await client.ping()

        try:
            await self.run("PING", _ping, timeout)
        except ResponseError as exc:
            raise SourceError(SOURCE, f"{self.target}: {describe_redis_error(exc)}") from None

    async def server_version(self, timeout: float | None = None) -> str:
        """``valkey 8.1.0`` / ``redis 7.2.4``, from INFO server."""

        async def _info(client: aioredis.Redis) -> dict[str, Any]:
            return dict(await client.info("server"))

        try:
            info = await self.run("INFO server", _info, timeout)
        except ResponseError:
            return "unknown"
        if "valkey_version" in info:
            return f"valkey {info['valkey_version']}"
        return f"redis {info.get('redis_version', 'unknown')}"

    def _discard(self) -> None:
        """Drop the client without waiting: its connections are closed in the background."""
        client, self._client = self._client, None
        if client is not None:
            task = asyncio.get_running_loop().create_task(_close_quietly(client))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    async def reset(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _close_quietly(client)

    async def close(self) -> None:
        hooks, self._on_close = self._on_close, []
        for hook in hooks:
            await hook()
        await self.reset()


_BACKGROUND: set[asyncio.Task[None]] = set()


async def _close_quietly(client: aioredis.Redis) -> None:
    try:
        await asyncio.wait_for(client.aclose(), 2)
    except Exception:  # closing a broken client: nothing useful to report
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            try:
                await asyncio.wait_for(pool.disconnect(inuse_connections=True), 1)
            except Exception:
                log.debug("could not close a Redis connection pool cleanly")
