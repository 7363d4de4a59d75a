"""What may be shown of a configuration: URLs without their passwords, every secret redacted."""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from urllib.parse import quote, urlsplit

from immich_thumbnail_exporter.config.secret import Secret

_SECRET_PARAMS = ("password", "sslpassword", "pass", "passwd", "secret", "token", "api_key", "apikey")
_KEYWORD_SECRET = re.compile(r"(?i)\b((?:ssl)?password|pass|passwd)(\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def redact_url(url: str) -> str:
    """Hide the password in a URL (``postgres://user:***@host/db``), also when it is a query parameter
    (``?password=...``, which libpq and asyncpg accept), and in a keyword/value connection string
    (``host=db password=...``)."""
    if "://" not in url:
        # Not a URL: maybe a libpq keyword/value string. Hide every password=... in it.
        return _KEYWORD_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}***", url)
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = quote(parts.username or "", safe="")
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            netloc = f"{user}:***@{host}"
    except ValueError:
        return "<unparseable URL>"
    query = parts.query
    if query:
        pairs = query.split("&")
        query = "&".join(
            f"{p.partition('=')[0]}=***" if p.partition("=")[0].lower() in _SECRET_PARAMS else p for p in pairs
        )
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    return out + ("#***" if parts.fragment else "")


def describe(config: Any) -> dict[str, Any]:
    """The effective configuration as plain data with every secret redacted (for check-config and /)."""

    def walk(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: walk(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Secret):
            return f"<from file {obj.file}>" if obj.file else "<redacted>"
        if isinstance(obj, tuple):
            return list(obj)
        return obj

    out = walk(config)
    assert isinstance(out, dict)
    return out
