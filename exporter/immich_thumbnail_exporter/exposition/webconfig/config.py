"""``WebConfig``: the parsed file, and what it gives the HTTP server (an SSL context, a middleware)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from aiohttp.typedefs import Middleware

from immich_thumbnail_exporter.exposition.webconfig.auth import DEFAULT_AUTH_TIMEOUT
from immich_thumbnail_exporter.exposition.webconfig.middleware import build_middleware
from immich_thumbnail_exporter.exposition.webconfig.parts import Problem, RateLimit, TLSServerConfig, error
from immich_thumbnail_exporter.exposition.webconfig.tls import reloading_context


@dataclass(frozen=True)
class WebConfig:
    """The web configuration; ``WebConfig()`` (also ``load_web_config(None)``) is plain HTTP, no auth."""

    path: str | None = None
    tls: TLSServerConfig | None = None
    http2: bool = True  # accepted for compatibility; aiohttp serves HTTP/1.1 only
    headers: tuple[tuple[str, str], ...] = ()
    basic_auth_users: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    rate_limit: RateLimit | None = None

    @property
    def auth_enabled(self) -> bool:
        return bool(self.basic_auth_users)

    @property
    def tls_enabled(self) -> bool:
        return self.tls is not None

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server context for ``tls_server_config``, or None when the file configures no TLS.

        Each call builds a new context. The certificate, key and client CA files are watched: when one
        changes, the next handshake uses a context built from the new files (if they load; otherwise
        the previous one stays and a warning is logged).
        """
        if self.tls is None:
            return None
        try:
            return reloading_context(self.tls)
        except Problem as exc:
            raise error(self.path, [str(exc)]) from None

    def middleware(
        self,
        open_paths: frozenset[str] = frozenset({"/healthz"}),
        *,
        auth_timeout: float = DEFAULT_AUTH_TIMEOUT,
    ) -> Middleware:
        """An aiohttp middleware applying this configuration to every request.

        In order: the client certificate's SANs (``client_allowed_sans``, 403, every path), then for
        paths not in ``open_paths`` the rate limit (429) and basic auth (401 with
        ``WWW-Authenticate: Basic``; 503 when the bcrypt check does not finish within ``auth_timeout``
        seconds). The configured headers are set on every response, errors included.
        """
        return build_middleware(
            headers=self.headers,
            users=self.basic_auth_users,
            rate_limit=self.rate_limit,
            client_allowed_sans=self.tls.client_allowed_sans if self.tls is not None else None,
            open_paths=open_paths,
            auth_timeout=auth_timeout,
        )
