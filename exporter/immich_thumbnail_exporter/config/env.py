"""Immich's environment variables, so that an Immich ``.env`` file can be reused as it is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from immich_thumbnail_exporter.config.secret import Secret

# Variable -> dotted configuration key. Secrets also come as ``<VAR>_FILE``: the path of a file holding them.
ENV_MAP: Final[Mapping[str, str]] = {
    "DB_URL": "database.url",
    "DB_HOSTNAME": "database.host",
    "DB_PORT": "database.port",
    "DB_USERNAME": "database.user",
    "DB_PASSWORD": "database.password",
    "DB_DATABASE_NAME": "database.name",
    "REDIS_URL": "redis.url",
    "REDIS_HOSTNAME": "redis.host",
    "REDIS_PORT": "redis.port",
    "REDIS_DBINDEX": "redis.db",
    "REDIS_USERNAME": "redis.username",
    "REDIS_PASSWORD": "redis.password",
    "REDIS_SOCKET": "redis.socket",
    "IMMICH_URL": "immich.url",
    "IMMICH_API_KEY": "immich.api_key",
    "IMMICH_MEDIA_ROOT": "media.root",
}
_SECRET_KEYS: Final = ("password", "api_key", "url")


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The dotted keys ``environ`` sets (empty variables set nothing; ``*_FILE`` wins over the value)."""
    out: dict[str, Any] = {}
    for var, dotted in ENV_MAP.items():
        if environ.get(var, "") != "":
            out[dotted] = environ[var]
        file_var = f"{var}_FILE"
        if environ.get(file_var, "") != "" and dotted.rsplit(".", 1)[1] in _SECRET_KEYS:
            out[dotted] = Secret(file=environ[file_var])
    return out


def database_variables() -> tuple[str, ...]:
    """The variables naming a database (``DB_URL``, ``DB_HOSTNAME`` ...), for "not configured" messages."""
    return tuple(var for var, dotted in ENV_MAP.items() if dotted.startswith("database."))
