"""``--web.config.file``: TLS, basic auth, extra headers and rate limiting for the HTTP server.

The file format is the one of the Prometheus exporter-toolkit (``docs/web-configuration.md``), so that a
``web-config.yml`` written for node_exporter works here too::

    tls_server_config:
      cert_file: server.crt           # relative paths resolve against this file's directory
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert
      client_ca_file: ca.crt
      min_version: TLS12              # the default
    http_server_config:
      headers:
        X-Frame-Options: deny
    basic_auth_users:
      prometheus: $2y$10$...          # bcrypt, e.g. ``htpasswd -nBC 10 "" | tr -d ':\\n'``
    rate_limit:
      interval: 1s
      burst: 20

Where Python's ``ssl`` module cannot do what Go's ``crypto/tls`` does, the file is refused with a message
saying so rather than served with a silently different policy:

* ``client_auth_type: RequireAnyClientCert`` (and its old name ``RequireClientCert``): OpenSSL through
  Python cannot require a client certificate without verifying it.
* ``curve_preferences`` with more than one curve: Python can restrict the key exchange to one curve only.
* ``client_allowed_sans`` needs a verified client certificate, so it needs ``VerifyClientCertIfGiven`` or
  ``RequireAndVerifyClientCert``; the check runs on each request (403) rather than in the handshake.

Mapped rather than refused: ``RequestClientCert`` (Go asks for a certificate and never checks it) serves
without asking; TLS 1.3 names in ``cipher_suites`` are accepted and ignored, as Go ignores them;
``http2`` is accepted but aiohttp only speaks HTTP/1.1; ``min_version`` below TLS12 also lowers OpenSSL's
security level to 0, because OpenSSL 3 refuses TLS 1.0 and 1.1 otherwise.

Certificates, keys and the client CA file are re-read when they change on disk (checked at each
handshake), so a rotated certificate is served without a restart, as with the toolkit. The rest of the
file is read once, at start.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import difflib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import ssl
import tempfile
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import bcrypt
import yaml
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = ["RateLimit", "TLSServerConfig", "WebConfig", "WebConfigError", "load_web_config"]

log = logging.getLogger(__name__)


class WebConfigError(Exception):
    """A problem with the web configuration file; the message is one line naming the file."""


class _Problem(Exception):
    """Internal: one problem, without the file name (added by the caller)."""


# --------------------------------------------------------------------------------------------------------
# Vocabulary of the exporter-toolkit format

_TOP_KEYS: Final = ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit")
_TLS_KEYS: Final = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "cipher_suites",
    "curve_preferences",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
    "client_allowed_sans",
)
_HTTP_KEYS: Final = ("http2", "headers")
_RATE_LIMIT_KEYS: Final = ("interval", "burst")

TLS_VERSIONS: Final[Mapping[str, ssl.TLSVersion]] = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TLS_VERSION_NAMES: Final = {v: k for k, v in TLS_VERSIONS.items()}

# Go's client auth policy name -> Python verify mode; None: cannot be honoured by Python's ssl module.
CLIENT_AUTH_TYPES: Final[Mapping[str, ssl.VerifyMode | None]] = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,  # Go asks and never checks: no observable difference
    "RequireAnyClientCert": None,
    "RequireClientCert": None,  # the toolkit's old name for RequireAnyClientCert
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_VERIFYING_AUTH_TYPES: Final = ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert")

# The names Go's tls.CipherSuites() returns (the toolkit accepts exactly these), in OpenSSL spelling.
# None: a TLS 1.3 suite; Go ignores those in cipher_suites and so do we (TLS 1.3 suites are always on).
CIPHER_SUITES: Final[Mapping[str, str | None]] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}

# Go curve name -> OpenSSL group name.
CURVES: Final[Mapping[str, str]] = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}

# The only headers the toolkit lets a user set, with their allowed values (None: any value).
ALLOWED_HEADERS: Final[Mapping[str, tuple[str, ...] | None]] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
_ALLOWED_HEADERS_LOWER: Final = {name.lower(): name for name in ALLOWED_HEADERS}

_BCRYPT_RE: Final = re.compile(r"\$2[abxy]\$(\d\d)\$[./A-Za-z0-9]{53}")
_BCRYPT_MAX_PASSWORD: Final = 72  # bcrypt only looks at the first 72 bytes; Go truncates, so do we
_AUTH_CACHE_SIZE: Final = 100  # successful verifications remembered, like the toolkit's cache
_BCRYPT_CONCURRENCY: Final = 2  # bcrypt runs at most this many at once (the toolkit: 1)
_MAX_FILE_BYTES: Final = 4 * 1024 * 1024  # the config, certificate, key and CA files are small
DEFAULT_AUTH_TIMEOUT: Final = 10.0  # seconds a request may wait for its bcrypt verification

_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS: Final[Mapping[str, float]] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


# --------------------------------------------------------------------------------------------------------
# The parsed configuration


@dataclass(frozen=True)
class TLSServerConfig:
    """``tls_server_config``, validated and with file paths made absolute."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    cert: str | None = field(default=None, repr=False)
    key: str | None = field(default=None, repr=False)
    client_ca: str | None = field(default=None, repr=False)
    client_auth_type: str = "NoClientCert"
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    cipher_suites: tuple[str, ...] = ()  # Go names, as written
    curve_preferences: tuple[str, ...] = ()  # Go names, as written
    prefer_server_cipher_suites: bool = True
    client_allowed_sans: tuple[str, ...] | None = None

    @property
    def verify_mode(self) -> ssl.VerifyMode:
        mode = CLIENT_AUTH_TYPES[self.client_auth_type]
        assert mode is not None  # refused at load time
        return mode

    @property
    def openssl_ciphers(self) -> tuple[str, ...]:
        """The TLS <= 1.2 suites of ``cipher_suites`` in OpenSSL spelling (TLS 1.3 ones left out)."""
        return tuple(n for n in (CIPHER_SUITES[c] for c in self.cipher_suites) if n is not None)

    @property
    def watched_files(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p)


@dataclass(frozen=True)
class RateLimit:
    """``rate_limit``: a token bucket refilled with one request every ``interval`` seconds."""

    interval: float
    burst: int


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
            return _reloading_context(self.tls)
        except _Problem as exc:
            raise _error(self.path, str(exc)) from None

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
        headers = self.headers
        users = _BasicAuth(self.basic_auth_users, auth_timeout) if self.basic_auth_users else None
        bucket = _TokenBucket(self.rate_limit) if self.rate_limit is not None else None
        allowed_sans = None
        if self.tls is not None and self.tls.client_allowed_sans is not None:
            allowed_sans = frozenset(_normalise_san(s) for s in self.tls.client_allowed_sans)

        async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
            if allowed_sans is not None and not _client_san_allowed(request, allowed_sans):
                return web.Response(status=403, text="Forbidden\n")
            if request.path in open_paths:
                return await handler(request)
            if bucket is not None and not bucket.allow():
                return web.Response(status=429, text="Too Many Requests\n")
            if users is not None:
                credentials = _basic_credentials(request)
                try:
                    ok = credentials is not None and await users.check(*credentials)
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


def load_web_config(path: str | None) -> WebConfig:
    """Read and validate a web configuration file; None or "" gives plain HTTP without auth."""
    if not path:
        return WebConfig()
    try:
        return _load(path)
    except _Problem as exc:
        raise _error(path, str(exc)) from None
    except RecursionError:
        raise _error(path, "the YAML is nested too deeply") from None


# --------------------------------------------------------------------------------------------------------
# Loading


def _error(path: str | None, problem: str) -> WebConfigError:
    line = " ".join(problem.split())  # one line, whatever the cause said
    return WebConfigError(f"{path}: {line}" if path else line)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses duplicate keys, as Go's ``yaml.UnmarshalStrict`` does."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable: construct_mapping below reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load(path: str) -> WebConfig:
    try:
        with open(path, "rb") as f:
            content = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _Problem(f"cannot read web configuration file: {exc.strerror or exc}") from None
    if len(content) > _MAX_FILE_BYTES:
        raise _Problem(f"the file is larger than {_MAX_FILE_BYTES} bytes; is it the right file?")
    try:
        data = yaml.load(content, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise _Problem(f"malformed YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _Problem(f"expected a mapping at the top level, got {_kind(data)}")
    _check_keys(data, _TOP_KEYS, "")

    base_dir = os.path.dirname(os.path.abspath(path))
    tls = _parse_tls(_section(data, "tls_server_config"), base_dir)
    http2, headers = _parse_http(_section(data, "http_server_config"))
    users = _parse_users(data.get("basic_auth_users"))
    rate_limit = _parse_rate_limit(_section(data, "rate_limit"))
    return WebConfig(path=path, tls=tls, http2=http2, headers=headers, basic_auth_users=users, rate_limit=rate_limit)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _check_keys(data: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key in allowed:
            continue
        name = f"{where}.{key}" if where else str(key)
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                hint = f" (did you mean {close[0]!r}?)"
        raise _Problem(f"unknown key {name!r}{hint}; allowed here: {', '.join(allowed)}")


def _section(data: Mapping[str, Any], name: str) -> dict[Any, Any]:
    value = data.get(name)
    if value is None:  # absent or empty: the defaults, as in Go
        return {}
    if not isinstance(value, dict):
        raise _Problem(f"{name}: expected a mapping, got {_kind(value)}")
    return value


def _opt_str(data: Mapping[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Problem(f"{where}.{key}: expected a string, got {_kind(value)}")
    return value


def _opt_bool(data: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _Problem(f"{where}.{key}: expected true or false, got {_kind(value)}")
    return value


def _opt_str_list(data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Problem(f"{where}.{key}: expected a list of strings, got {_kind(value)}")
    for item in value:
        if not isinstance(item, str):
            raise _Problem(f"{where}.{key}: expected a list of strings, found {_kind(item)}")
    return tuple(value)


def _join_dir(base_dir: str, path: str | None) -> str | None:
    if not path:
        return None
    return os.path.normpath(os.path.join(base_dir, path))  # an absolute path stays as it is


def _parse_tls(data: Mapping[str, Any], base_dir: str) -> TLSServerConfig | None:
    w = "tls_server_config"
    _check_keys(data, _TLS_KEYS, w)

    versions: dict[str, ssl.TLSVersion] = {}
    for vkey, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = _opt_str(data, vkey, w) or default
        if name not in TLS_VERSIONS:
            raise _Problem(f"{w}.{vkey}: unknown TLS version {name!r}; expected one of {', '.join(TLS_VERSIONS)}")
        versions[vkey] = TLS_VERSIONS[name]
    if versions["min_version"] > versions["max_version"]:
        raise _Problem(
            f"{w}: min_version {_TLS_VERSION_NAMES[versions['min_version']]} is above "
            f"max_version {_TLS_VERSION_NAMES[versions['max_version']]}"
        )

    auth_type = _opt_str(data, "client_auth_type", w)
    if auth_type is not None and auth_type not in CLIENT_AUTH_TYPES:
        raise _Problem(
            f"{w}.client_auth_type: unknown value {auth_type!r}; expected one of "
            + ", ".join(k for k in CLIENT_AUTH_TYPES if k != "RequireClientCert")
        )
    if auth_type is not None and CLIENT_AUTH_TYPES[auth_type] is None:
        raise _Problem(
            f"{w}.client_auth_type: {auth_type} cannot be honoured here: Python's ssl module cannot require "
            "a client certificate without verifying it; use RequireAndVerifyClientCert with client_ca_file"
        )

    cipher_suites = _opt_str_list(data, "cipher_suites", w) or ()
    for name in cipher_suites:
        if name not in CIPHER_SUITES:
            raise _Problem(
                f"{w}.cipher_suites: unknown or insecure cipher suite {name!r}; use Go names such as "
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (see Go's tls.CipherSuites())"
            )
    curves = _opt_str_list(data, "curve_preferences", w) or ()
    for name in curves:
        if name not in CURVES:
            raise _Problem(f"{w}.curve_preferences: unknown curve {name!r}; expected one of {', '.join(CURVES)}")
    if len(curves) > 1:
        raise _Problem(
            f"{w}.curve_preferences: Python's ssl module can restrict the key exchange to one curve only, "
            f"not an ordered list; keep one of {', '.join(curves)}"
        )
    prefer = _opt_bool(data, "prefer_server_cipher_suites", w, True)
    sans = _opt_str_list(data, "client_allowed_sans", w)

    cert_file, key_file, ca_file = (_opt_str(data, k, w) for k in ("cert_file", "key_file", "client_ca_file"))
    cert_text, key_text, ca_text = (_opt_str(data, k, w) for k in ("cert", "key", "client_ca"))
    # The toolkit's rule: TLS is on as soon as one of these is set; otherwise plain HTTP.
    if not any((cert_file, key_file, ca_file, cert_text, key_text, ca_text, auth_type)):
        return None

    for inline, file in (("cert", "cert_file"), ("key", "key_file"), ("client_ca", "client_ca_file")):
        if data.get(inline) and data.get(file):
            raise _Problem(f"{w}: set either {inline} or {file}, not both")
    if not (cert_text or cert_file):
        raise _Problem(f"{w}: missing one of cert or cert_file")
    if not (key_text or key_file):
        raise _Problem(f"{w}: missing one of key or key_file")
    auth_type = auth_type or "NoClientCert"
    if (ca_text or ca_file) and CLIENT_AUTH_TYPES[auth_type] == ssl.CERT_NONE and auth_type != "RequestClientCert":
        raise _Problem(
            f"{w}: client_ca_file or client_ca is set but client_auth_type is {auth_type}; "
            "set client_auth_type: RequireAndVerifyClientCert"
        )
    if sans is not None:
        if not sans:
            raise _Problem(f"{w}.client_allowed_sans: the list is empty, so no client could connect")
        if auth_type not in _VERIFYING_AUTH_TYPES:
            raise _Problem(
                f"{w}.client_allowed_sans needs a verified client certificate: set client_auth_type to "
                "RequireAndVerifyClientCert or VerifyClientCertIfGiven"
            )

    tls = TLSServerConfig(
        cert_file=_join_dir(base_dir, cert_file),
        key_file=_join_dir(base_dir, key_file),
        client_ca_file=_join_dir(base_dir, ca_file),
        cert=cert_text,
        key=key_text,
        client_ca=ca_text,
        client_auth_type=auth_type,
        min_version=versions["min_version"],
        max_version=versions["max_version"],
        cipher_suites=cipher_suites,
        curve_preferences=curves,
        prefer_server_cipher_suites=prefer,
        client_allowed_sans=sans,
    )
    if cipher_suites and not tls.openssl_ciphers and tls.min_version < ssl.TLSVersion.TLSv1_3:
        raise _Problem(
            f"{w}.cipher_suites: lists only TLS 1.3 suites, which leaves TLS 1.2 and below with no cipher; "
            "add TLS 1.2 suites or set min_version: TLS13"
        )
    _build_context(tls)  # the certificate, key, CA, ciphers and curve must load now, not at first scrape
    return tls


def _parse_http(data: Mapping[str, Any]) -> tuple[bool, tuple[tuple[str, str], ...]]:
    w = "http_server_config"
    _check_keys(data, _HTTP_KEYS, w)
    http2 = _opt_bool(data, "http2", w, True)
    raw = data.get("headers")
    if raw is None:
        return http2, ()
    if not isinstance(raw, dict):
        raise _Problem(f"{w}.headers: expected a mapping of header names to values, got {_kind(raw)}")
    headers: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise _Problem(f"{w}.headers: header names must be strings, got {_kind(name)}")
        canonical = _ALLOWED_HEADERS_LOWER.get(name.lower())
        if canonical is None:
            raise _Problem(
                f"{w}.headers: HTTP header {name!r} cannot be configured; allowed: {', '.join(ALLOWED_HEADERS)}"
            )
        if canonical in headers:
            raise _Problem(f"{w}.headers: {canonical} is set twice")
        if value is None or value == "":
            continue  # "unset if blank"
        if not isinstance(value, str):
            raise _Problem(f"{w}.headers.{canonical}: expected a string, got {_kind(value)}")
        if any(c in value for c in "\r\n\0"):
            raise _Problem(f"{w}.headers.{canonical}: the value contains a line break or NUL")
        allowed = ALLOWED_HEADERS[canonical]
        if allowed is not None and value not in allowed:
            raise _Problem(f"{w}.headers.{canonical}: invalid value {value!r}; expected one of {', '.join(allowed)}")
        headers[canonical] = value
    return http2, tuple(headers.items())


def _parse_users(raw: Any) -> tuple[tuple[str, str], ...]:
    w = "basic_auth_users"
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise _Problem(f"{w}: expected a mapping of user names to bcrypt hashes, got {_kind(raw)}")
    users: list[tuple[str, str]] = []
    for name, hashed in raw.items():
        if not isinstance(name, str):
            raise _Problem(f"{w}: user name {name!r} must be a string (quote it)")
        if not isinstance(hashed, str) or not _valid_bcrypt(hashed):
            raise _Problem(
                f"{w}.{name}: the password is not a bcrypt hash (expected something like $2y$10$ followed by "
                "53 characters, as printed by htpasswd -nBC 10 \"\" | tr -d ':\\n')"
            )
        users.append((name, hashed))
    return tuple(users)


def _valid_bcrypt(hashed: str) -> bool:
    match = _BCRYPT_RE.fullmatch(hashed)
    if match is None or not 4 <= int(match.group(1)) <= 31:
        return False
    # Let the bcrypt library decode the salt, at the cheapest cost (about a millisecond).
    try:
        bcrypt.hashpw(b"", f"$2b$04${hashed[7:29]}".encode())
    except ValueError:
        return False
    return True


def _parse_rate_limit(data: Mapping[str, Any]) -> RateLimit | None:
    w = "rate_limit"
    _check_keys(data, _RATE_LIMIT_KEYS, w)
    interval = _parse_duration(data.get("interval"), f"{w}.interval")
    burst = data.get("burst")
    if burst is None:
        burst = 0
    if isinstance(burst, bool) or not isinstance(burst, int):
        raise _Problem(f"{w}.burst: expected a whole number, got {_kind(burst)}")
    if burst < 0:
        raise _Problem(f"{w}.burst: must not be negative")
    if interval == 0:
        return None  # "set to 0 to disable rate limiter"
    if burst == 0:
        raise _Problem(f"{w}.burst: must be at least 1 when an interval is set, or no request would pass")
    return RateLimit(interval=interval, burst=burst)


def _parse_duration(value: Any, where: str) -> float:
    """Seconds from a Go duration (``1m30s``) or a whole number of nanoseconds, as Go's yaml.v2 reads it."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Problem(f"{where}: expected a duration such as 1s or 500ms, got {_kind(value)}")
    if isinstance(value, int):
        seconds = value * 1e-9
    else:
        text = value[1:] if value[:1] in "+-" else value
        seconds = 0.0
        if text != "0":
            pos = 0
            for match in _DURATION_RE.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
                pos = match.end()
            if pos == 0 or pos != len(text):
                raise _Problem(f"{where}: invalid duration {value!r}; expected e.g. 1s, 500ms, 1m30s")
        if value.startswith("-"):
            seconds = -seconds
    if seconds < 0:
        raise _Problem(f"{where}: must not be negative")
    return seconds


# --------------------------------------------------------------------------------------------------------
# TLS


def _read_pem(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _Problem(f"tls_server_config.{what}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_FILE_BYTES:
        raise _Problem(f"tls_server_config.{what}: {path} is larger than {_MAX_FILE_BYTES} bytes")
    return data


@contextmanager
def _pem_files(tls: TLSServerConfig) -> Iterator[tuple[str, str]]:
    """Paths of the certificate and key as PEM files, writing inline values to a private temporary dir."""
    cert_what = "cert_file" if tls.cert_file else "cert"
    key_what = "key_file" if tls.key_file else "key"
    cert = _read_pem(tls.cert_file, cert_what) if tls.cert_file else (tls.cert or "").encode()
    key = _read_pem(tls.key_file, key_what) if tls.key_file else (tls.key or "").encode()
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise _Problem(f"tls_server_config.{cert_what}: no PEM certificate (-----BEGIN CERTIFICATE-----) found")
    if b"PRIVATE KEY-----" not in key:
        raise _Problem(f"tls_server_config.{key_what}: no PEM private key (-----BEGIN ... PRIVATE KEY-----) found")
    if b"ENCRYPTED" in key:
        raise _Problem(f"tls_server_config.{key_what}: the private key is encrypted; a passphrase is not supported")
    with tempfile.TemporaryDirectory(prefix="webconfig-") as tmp:
        # Load exactly the bytes checked above, from files only this process can read.
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            p = os.path.join(tmp, name)
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(p)
        yield paths[0], paths[1]


def _no_passphrase() -> bytes:
    return b""  # never let OpenSSL prompt on the terminal


def _build_context(tls: TLSServerConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 / TLSv1_1, when asked for
        ctx.minimum_version = tls.min_version
        ctx.maximum_version = tls.max_version

    ciphers = ":".join(tls.openssl_ciphers)
    for go_name in tls.cipher_suites:
        ossl = CIPHER_SUITES[go_name]
        if ossl is None:
            continue
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ossl)
        except ssl.SSLError:
            raise _Problem(
                f"tls_server_config.cipher_suites: {go_name} ({ossl}) is not available in this OpenSSL build"
            ) from None
    if tls.min_version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 only negotiates TLS 1.0/1.1 at security level 0; the file asked for them.
        ctx.set_ciphers((ciphers or "DEFAULT") + ":@SECLEVEL=0")
    elif ciphers:
        ctx.set_ciphers(ciphers)
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    for go_name in tls.curve_preferences:
        try:
            ctx.set_ecdh_curve(CURVES[go_name])
        except (ValueError, ssl.SSLError):
            raise _Problem(
                f"tls_server_config.curve_preferences: {go_name} is not available in this OpenSSL build"
            ) from None
    ctx.set_alpn_protocols(["http/1.1"])

    with _pem_files(tls) as (cert_path, key_path):
        try:
            ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)
        except ssl.SSLError as exc:
            cert_what = f"cert_file {tls.cert_file}" if tls.cert_file else "cert"
            key_what = f"key_file {tls.key_file}" if tls.key_file else "key"
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise _Problem(f"tls_server_config: {key_what} does not match {cert_what}") from None
            raise _Problem(f"tls_server_config: cannot load {cert_what} with {key_what}: {exc.reason or exc}") from None

    ctx.verify_mode = tls.verify_mode
    if tls.verify_mode != ssl.CERT_NONE:
        if tls.client_ca_file:
            ca = _read_pem(tls.client_ca_file, "client_ca_file")
            what = f"client_ca_file {tls.client_ca_file}"
        elif tls.client_ca:
            ca = tls.client_ca.encode()
            what = "client_ca"
        else:
            ca = b""
            what = ""
        if what:
            if b"-----BEGIN CERTIFICATE-----" not in ca:
                raise _Problem(f"tls_server_config: {what} contains no PEM certificate")
            try:
                ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise _Problem(f"tls_server_config: cannot load {what}: {reason}") from None
        else:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)  # Go's behaviour: the system roots
    return ctx


def _fingerprint(paths: tuple[str, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    result: list[tuple[int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
            result.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            result.append(None)
    return tuple(result)


def _reloading_context(tls: TLSServerConfig) -> ssl.SSLContext:
    """A context that, at each handshake, switches to a fresh one if the watched files have changed."""
    watched = tls.watched_files
    seen = _fingerprint(watched)
    base = _build_context(tls)
    if not watched:
        return base
    state: dict[str, Any] = {"seen": seen, "current": base}

    def on_client_hello(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        try:
            fp = _fingerprint(watched)
            if fp != state["seen"]:
                state["seen"] = fp  # retry on the next change, not on every handshake
                try:
                    state["current"] = _build_context(tls)
                    log.info("TLS certificate files changed; reloaded them")
                except _Problem as exc:
                    log.warning("TLS certificate files changed but cannot be loaded, keeping the old ones: %s", exc)
            if state["current"] is not base:
                sslobj.context = state["current"]
        except Exception:  # a failure here must not break the handshake
            log.exception("TLS certificate reload failed")

    base.sni_callback = on_client_hello
    return base


def _normalise_san(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return value


def _client_san_allowed(request: web.Request, allowed: frozenset[str]) -> bool:
    transport = request.transport
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:  # no certificate, or one that was not verified
        return False
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI") and value in allowed:
            return True
        if kind == "IP Address" and _normalise_san(value) in allowed:
            return True
    return False


# --------------------------------------------------------------------------------------------------------
# HTTP


def _set_headers(response: web.StreamResponse, headers: tuple[tuple[str, str], ...]) -> None:
    if response.prepared:  # already sent (a streamed response): too late
        return
    for name, value in headers:
        response.headers[name] = value


def _basic_credentials(request: web.Request) -> tuple[bytes, bytes] | None:
    header = request.headers.get("Authorization")
    if not header:
        return None
    scheme, _, param = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(param.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


class _TokenBucket:
    def __init__(self, limit: RateLimit) -> None:
        self._rate = 1.0 / limit.interval
        self._capacity = float(limit.burst)
        self._tokens = float(limit.burst)
        self._last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def _bcrypt_check(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
    except ValueError:
        return False


class _BasicAuth:
    """bcrypt verification without blocking the event loop and without telling users apart by timing.

    An unknown user name is checked against a dummy hash of the highest configured cost, so it costs as
    much as a wrong password. Successful checks are remembered (keyed by a keyed hash of user, stored
    hash and password, never the password itself) so that each scrape does not pay for bcrypt.
    Identical checks in flight at the same time share one bcrypt run.
    """

    def __init__(self, users: tuple[tuple[str, str], ...], timeout: float) -> None:
        self._users = [(name.encode(), hashed.encode()) for name, hashed in users]
        cost = max(int(hashed[4:6]) for _, hashed in users)
        # A well-formed hash nobody's password matches: a real salt of that cost and a zero digest.
        self._dummy = bcrypt.gensalt(cost) + b"." * 31
        self._timeout = timeout
        self._key = secrets.token_bytes(32)
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[bool]] = {}
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def _cache_key(self, user: bytes, hashed: bytes, password: bytes) -> bytes:
        h = hashlib.blake2b(key=self._key, digest_size=32)
        for part in (user, hashed, password):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()

    async def check(self, user: bytes, password: bytes) -> bool:
        """True when ``password`` is ``user``'s; raises TimeoutError when bcrypt takes too long."""
        match: bytes | None = None
        for name, hashed in self._users:  # no early exit: the time does not depend on the position
            if hmac.compare_digest(name, user) and match is None:
                match = hashed
        hashed = match if match is not None else self._dummy
        key = self._cache_key(user, hashed, password)
        if key in self._cache:  # only successful checks are cached
            self._cache.move_to_end(key)
            return True
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._verify(password, hashed))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        ok = await asyncio.wait_for(asyncio.shield(task), self._timeout)
        if ok and match is not None:
            self._cache[key] = None
            while len(self._cache) > _AUTH_CACHE_SIZE:
                self._cache.popitem(last=False)
            return True
        return False

    async def _verify(self, password: bytes, hashed: bytes) -> bool:
        loop = asyncio.get_running_loop()
        sem = self._semaphores.get(loop)
        if sem is None:
            sem = self._semaphores[loop] = asyncio.Semaphore(_BCRYPT_CONCURRENCY)
        async with sem:
            return await asyncio.to_thread(_bcrypt_check, password, hashed)
