"""Immich's PostgreSQL database, read-only.

A small asyncpg pool whose sessions are read-only by default (``default_transaction_read_only``), with a
``statement_timeout`` so that no query of ours can hold locks Immich needs for long, and timeouts on
connect and acquire. The pool is built lazily and thrown away on any connection error, so the next use
reconnects and re-reads the password file (rotation works without a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from immich_thumbnail_exporter.config import DatabaseConfig, redact_url
from immich_thumbnail_exporter.sources.schema import Schema, detect

log = logging.getLogger(__name__)

APPLICATION_NAME = "immich-thumbnail-exporter"


class SourceError(Exception):
    """A backend could not be used; the message is one line fit for a log and for check-config."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        super().__init__(message)


class QueryError(SourceError):
    """The server is there but refused or failed a query (permission denied, statement_timeout, a table
    that is not there): one line, no traceback. Not an outage: the probe keeps ``source_up`` truthful."""


# PostgreSQL's SSLRequest: length 8, code 80877103.
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)

# The server ended the session (pg_terminate_backend, a restart, a crash): like a lost connection.
_SESSION_ENDED = (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.CannotConnectNowError)


def describe_error(exc: BaseException) -> str:
    """One line for an exception from a backend, without a traceback and without secrets."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return "password authentication failed"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"database does not exist: {exc}"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return text if text.startswith("permission denied") else f"permission denied: {text}"
    if isinstance(exc, asyncpg.QueryCanceledError):
        return "query cancelled by statement_timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text


class PostgresSource:
    name = "postgres"

    def __init__(self, config: DatabaseConfig) -> None:
        self.config = config
        self._pool: asyncpg.Pool | None = None
        self._schema: Schema | None = None
        self._lock = asyncio.Lock()

    @property
    def target(self) -> str:
        """Where we connect, for logs: never includes the password."""
        if self.config.url:
            try:
                url = self.config.url.get()
            except Exception:
                return "<database.url>"
            if not url.lower().startswith(("postgresql://", "postgres://")):
                # Not a URL asyncpg takes (a keyword string, or a password pasted into DB_URL): its text
                # may hold a secret anywhere, so none of it is shown.
                return "<database.url: not a postgresql:// URL>"
            return redact_url(url)
        return f"{self.config.user}@{self.config.host}:{self.config.port}/{self.config.name}"

    def _connect_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        settings = {
            "application_name": APPLICATION_NAME,
            # Read-only by construction: every transaction of ours starts read-only.
            "default_transaction_read_only": "on",
            "statement_timeout": str(int(cfg.statement_timeout * 1000)),
            # Never queue behind Immich's DDL or bulk writes: give up quickly instead.
            "lock_timeout": "2000",
            "idle_in_transaction_session_timeout": str(int(cfg.statement_timeout * 2000)),
            "jit": "off",
        }
        kwargs: dict[str, Any] = {
            "min_size": 0,
            "max_size": cfg.pool_size,
            "timeout": cfg.connect_timeout,
            "command_timeout": cfg.statement_timeout + 5,
            "server_settings": settings,
            # Connections are recycled so a rotated password is picked up within minutes.
            "max_inactive_connection_lifetime": 300.0,
        }
        if cfg.url:
            kwargs["dsn"] = cfg.url.get()
        else:
            kwargs.update(host=cfg.host, port=cfg.port, user=cfg.user, database=cfg.name)
            if cfg.password:
                secret = cfg.password
                # asyncpg calls this on each new connection: the password file is re-read every time.
                kwargs["password"] = secret.get
        if cfg.sslmode:
            kwargs["ssl"] = cfg.sslmode
        return kwargs

    async def pool(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                try:
                    self._pool = await asyncio.wait_for(
                        asyncpg.create_pool(**self._connect_kwargs()), self.config.connect_timeout + 1
                    )
                except Exception as exc:
                    raise SourceError(self.name, f"cannot connect to {self.target}: {describe_error(exc)}") from None
            return self._pool

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        pool = await self.pool()
        try:
            conn = await asyncio.wait_for(pool.acquire(), self.config.connect_timeout + 1)
        except Exception as exc:
            await self.reset()
            raise SourceError(self.name, f"cannot connect to {self.target}: {describe_error(exc)}") from None
        async with self._using(pool, conn):
            yield conn

    @contextlib.asynccontextmanager
    async def spare_connection(self, wait: float = 1.0) -> AsyncIterator[asyncpg.Connection | None]:
        """A further connection from the pool if one is free (or can be opened) within ``wait`` seconds,
        else None: for work that can also be done one step at a time on the connection already held."""
        pool = await self.pool()
        conn = None
        if pool.get_size() < pool.get_max_size() or pool.get_idle_size() > 0:  # else none will come soon
            try:
                conn = await pool.acquire(timeout=wait)
            except Exception as exc:
                log.debug("no spare connection: %s", describe_error(exc))
        if conn is None:
            yield None
            return
        async with self._using(pool, conn):
            yield conn

    @contextlib.asynccontextmanager
    async def _using(self, pool: asyncpg.Pool, conn: asyncpg.Connection) -> AsyncIterator[None]:
        try:
            yield
        except (
            asyncpg.PostgresConnectionError, ConnectionError, OSError, asyncpg.InterfaceError, *_SESSION_ENDED
        ) as exc:
            # The connection is unusable: drop the pool so the next round reconnects from scratch.
            with contextlib.suppress(Exception):
                conn.terminate()
            await self.reset()
            raise SourceError(self.name, f"lost connection to {self.target}: {describe_error(exc)}") from None
        except asyncpg.PostgresError as exc:
            raise QueryError(self.name, describe_error(exc)) from None
        except TimeoutError:
            # A timed-out query leaves the connection in an unknown state: never give it back.
            with contextlib.suppress(Exception):
                conn.terminate()
            await self.reset()
            raise
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.release(conn), 2)

    async def schema(self) -> Schema:
        if self._schema is None:
            async with self.connection() as conn:
                self._schema = await detect(conn, timeout=self.config.statement_timeout)
        return self._schema

    def saturated(self) -> bool:
        """True when every connection the pool may open is in use: a query now would wait behind the
        long ones (a file check holds its connections for minutes). False before the first use."""
        pool = self._pool
        return pool is not None and pool.get_size() >= self.config.pool_size and pool.get_idle_size() == 0

    async def probe(self) -> None:
        await self.pool()
        if self.saturated():
            # Every connection is busy with a collection: waiting for a free one would call a merely busy
            # database down, and a frozen server would go unnoticed until a collection's deadline (minutes).
            # Ask the server itself whether it answers, without opening a session.
            await self.ping_server(self.config.connect_timeout)
            return
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1", timeout=self.config.connect_timeout)

    def _server_address(self) -> tuple[str, int] | str | None:
        """Where the server listens: (host, port), a unix socket path, or None when we cannot tell."""
        cfg = self.config
        host: str | None = cfg.host
        port = cfg.port
        if cfg.url:
            try:
                parts = urlsplit(cfg.url.get())
                host, port = parts.hostname, parts.port or 5432
                query = parse_qs(parts.query)
            except Exception:
                return None
            if not host and query.get("host"):
                host = query["host"][0]
            if "port" in query:
                try:
                    port = int(query["port"][0])
                except ValueError:
                    return None
        if not host or "," in host:
            return None  # a default socket or several hosts: leave it to the collections' deadlines
        if host.startswith("/"):
            return f"{host}/.s.PGSQL.{port}"
        return host, port

    async def ping_server(self, timeout: float) -> None:
        """An SSLRequest, which the server answers at once ('S' or 'N'), before any authentication and
        without a session (nothing in pg_stat_activity). TimeoutError when it does not answer."""
        addr = self._server_address()
        if addr is None:
            return
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                if isinstance(addr, str):
                    reader, writer = await asyncio.open_unix_connection(addr)
                else:
                    reader, writer = await asyncio.open_connection(*addr)
                writer.write(_SSL_REQUEST)
                await reader.readexactly(1)
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise SourceError(self.name, f"cannot connect to {self.target}: {describe_error(exc)}") from None
        finally:
            if writer is not None:
                writer.close()

    async def reset(self) -> None:
        """Forget the pool and schema (after an error); the next use reconnects."""
        pool, self._pool, self._schema = self._pool, None, None
        if pool is not None:
            pool.terminate()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()
