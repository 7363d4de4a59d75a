"""Configuration: one YAML file, then the environment, then flags (later wins).

Every section is a frozen dataclass. The loader walks the dataclass fields, so a key that is not a field
is an error, and each error names its dotted path (``database.port: expected an integer, got 'x'``).
Errors are collected, not raised one at a time, so ``check-config`` can list every problem at once.

Immich's own environment variable names are accepted so that an Immich ``.env`` can be reused as is.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from immich_thumbnail_exporter.vocabulary import KINDS, REASONS


class ConfigError(Exception):
    """One or more configuration problems; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Secret:
    """A secret given inline or as a file path.

    The file is read again on every ``get()`` so that a rotated password or key takes effect on the next
    reconnect without a restart. ``repr`` and ``str`` never show the value.
    """

    __slots__ = ("_file", "_value")

    def __init__(self, value: str | None = None, file: str | None = None) -> None:
        self._value = value
        self._file = file

    @property
    def file(self) -> str | None:
        return self._file

    def get(self) -> str:
        if self._file is not None:
            try:
                return Path(self._file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError([f"cannot read secret file {self._file}: {exc.strerror or exc}"]) from None
        return self._value or ""

    def check(self) -> str | None:
        """Return a problem line when the secret's file cannot be read, else None."""
        try:
            self.get()
        except ConfigError as exc:
            return exc.problems[0]
        return None

    def __bool__(self) -> bool:
        return self._file is not None or bool(self._value)

    def __repr__(self) -> str:
        return f"Secret(file={self._file!r})" if self._file else "Secret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self._value, self._file) == (other._value, other._file)

    def __hash__(self) -> int:
        return hash((self._value, self._file))


_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h|d))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Prometheus-style durations (``15s``, ``5m``, ``1h30m``) or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 15s or 5m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.match(value.strip()):
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(value.strip()))
    else:
        raise ValueError(f"expected a duration like 15s or 5m, got {value!r}")
    if seconds <= 0:
        raise ValueError(f"expected a positive duration, got {value!r}")
    return seconds


class Duration(float):
    """Marker type: a float of seconds parsed from a Prometheus-style duration."""


@dataclass(frozen=True)
class DatabaseConfig:
    url: Secret | None = None
    host: str = "database"
    port: int = 5432
    user: str = "postgres"
    password: Secret | None = None
    name: str = "immich"
    sslmode: str | None = None
    # Two connections: one streams the file rows, the other answers the small queries.
    pool_size: int = 2
    connect_timeout: Duration = Duration(10.0)
    statement_timeout: Duration = Duration(120.0)
    # Rows fetched per round trip from the server-side cursor: memory stays flat with library size.
    fetch_size: int = 5000


@dataclass(frozen=True)
class MediaConfig:
    # Where this process sees Immich's media folder (the volume Immich mounts at /data).
    root: str | None = None
    # The prefix stored in the database; "auto" reads system_metadata.MediaLocation.
    location: str = "auto"


@dataclass(frozen=True)
class RedisConfig:
    url: Secret | None = None
    host: str | None = None
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: Secret | None = None
    socket: str | None = None
    prefix: str = "immich_bull"
    timeout: Duration = Duration(5.0)
    # Waiting/active jobs checked against the database per queue and round for orphaned jobs.
    orphan_sample: int = 200

    @property
    def enabled(self) -> bool:
        return bool(self.url) or self.host is not None or self.socket is not None


@dataclass(frozen=True)
class ImmichConfig:
    url: str | None = None
    api_key: Secret | None = None
    timeout: Duration = Duration(10.0)

    @property
    def enabled(self) -> bool:
        return self.url is not None


@dataclass(frozen=True)
class IntervalsConfig:
    queues: Duration = Duration(15.0)
    inventory: Duration = Duration(300.0)
    files: Duration = Duration(900.0)


@dataclass(frozen=True)
class ChecksConfig:
    # Read the first bytes of every thumbnail and compare them with the extension (jpeg, webp, avif).
    verify_headers: bool = False
    # Check that each eligible asset's original file still exists (regeneration cannot fix those).
    check_originals: bool = False
    # ``lstat`` every thumbnail: its size (``immich_thumbnail_bytes``, orphaned bytes) and empty files
    # (``file_empty``). Off, the walk reads directory entries only: about half the file check's CPU at a
    # million assets, without those series. ``verify_headers`` reads every file, so it keeps sizes.
    file_sizes: bool = True


@dataclass(frozen=True)
class RemediationConfig:
    enabled: bool = False
    # Kinds of problem remediation may act on.
    kinds: tuple[str, ...] = ("thumbnail", "preview", "fullsize")
    batch_size: int = 50
    max_per_round: int = 500
    requests_per_second: float = 2.0
    verify_after: Duration = Duration(300.0)
    max_attempts: int = 3
    state_dir: str = "/var/lib/immich-thumbnail-exporter"
    # Reasons remediation may act on. file_unreadable is left out by default: the exporter cannot read
    # the file (permissions, a symlink out of the media folder), which regeneration does not change.
    reasons: tuple[str, ...] = ("no_record", "file_missing", "file_empty", "file_corrupt")
    # How often a remediation round runs under serve (verify earlier requests, submit new ones).
    interval: Duration = Duration(60.0)
    # After each accepted request, how long to look for a job naming each asset before calling it
    # not_queued (Immich v3.0.0 answered 204 and queued nothing).
    confirm_within: Duration = Duration(10.0)


@dataclass(frozen=True)
class WebSettings:
    listen_address: str = ":9813"
    config_file: str | None = None


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "logfmt"


@dataclass(frozen=True)
class CollectorSwitches:
    inventory: bool = True
    files: bool = True
    queues: bool = True


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    immich: ImmichConfig = field(default_factory=ImmichConfig)
    intervals: IntervalsConfig = field(default_factory=IntervalsConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    remediation: RemediationConfig = field(default_factory=RemediationConfig)
    web: WebSettings = field(default_factory=WebSettings)
    log: LogSettings = field(default_factory=LogSettings)
    collectors: CollectorSwitches = field(default_factory=CollectorSwitches)


# Environment variables -> dotted config path. `*_FILE` variants are derived for secrets.
ENV_MAP: dict[str, str] = {
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

_LOG_LEVELS = ("debug", "info", "warn", "error")
_LOG_FORMATS = ("logfmt", "json")


def _type_name(tp: Any) -> str:
    if tp is Duration:
        return "a duration like 15s"
    if tp is Secret:
        return "a string"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path, errors)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            errors.append(f"{path}: expected a list, got {value!r}")
            return None
        return tuple(_coerce(v.strip() if isinstance(v, str) else v, item_tp, path, errors) for v in items)
    if tp is Duration:
        try:
            return Duration(parse_duration(value))
        except ValueError as exc:
            errors.append(f"{path}: {exc}")
            return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif tp is Secret:
        if isinstance(value, Secret):
            return value
        if isinstance(value, str | int):
            return Secret(value=str(value))
    shown = "<redacted>" if tp is Secret else repr(value)
    errors.append(f"{path}: expected {_type_name(tp)}, got {shown}")
    return None


def _build(cls: type[Any], data: Mapping[str, Any], path: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key)
        # Keys are shown as typed, or quoted when they hold anything odd, so one problem stays one line.
        shown = name if name.isprintable() and name.strip() == name and name else repr(name)
        where = f"{path}.{shown}" if path else shown
        if name.endswith("_file") and name[: -len("_file")] in fields:
            base = name[: -len("_file")]
            if _strip_optional(hints[base]) is not Secret:
                errors.append(f"{where}: unknown key (only secrets can be read from files)")
                continue
            if not isinstance(value, str) or not value:
                errors.append(f"{where}: expected a file path")
                continue
            if base in data:
                errors.append(f"{where}: give either {base} or {name}, not both")
                continue
            kwargs[base] = Secret(file=value)
            continue
        if name not in fields:
            known = ", ".join(sorted(fields))
            errors.append(f"{where}: unknown key (known keys: {known})")
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                errors.append(f"{where}: expected a mapping, got {value!r}")
                continue
            kwargs[name] = _build(typing.cast(type[Any], tp), value, where, errors)
        else:
            coerced = _coerce(value, tp, where, errors)
            if coerced is not None or value is None:
                kwargs[name] = coerced
    return cls(**kwargs)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    # An override replaces both the inline and the file form of a secret.
    node.pop(leaf, None)
    node.pop(f"{leaf}_file", None)
    node[leaf] = value


def read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: configuration file is not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{path}: malformed YAML{where}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for var, dotted in ENV_MAP.items():
        if environ.get(var, "") != "":
            _set_path(tree, dotted, environ[var])
        file_var = f"{var}_FILE"
        if environ.get(file_var, "") != "" and dotted.rsplit(".", 1)[1] in ("password", "api_key", "url"):
            _set_path(tree, dotted, Secret(file=environ[file_var]))
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            if not isinstance(value, Mapping):
                out.pop(f"{key}_file", None)
                if key.endswith("_file"):
                    out.pop(key[: -len("_file")], None)
            out[key] = value
    return out


def load_config(
    path: str | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from YAML, then environment, then flag overrides (dotted keys)."""
    data: dict[str, Any] = read_yaml(path) if path else {}
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    flag_tree: dict[str, Any] = {}
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(flag_tree, dotted, value)
    data = _merge(data, flag_tree)
    errors: list[str] = []
    config = typing.cast(Config, _build(Config, data, "", errors))
    errors.extend(validate(config))
    if errors:
        raise ConfigError(errors)
    return config


def validate(config: Config) -> list[str]:
    """Checks across fields that types alone cannot express."""
    errors: list[str] = []
    if config.log.level not in _LOG_LEVELS:
        errors.append(f"log.level: expected one of {', '.join(_LOG_LEVELS)}, got {config.log.level!r}")
    if config.log.format not in _LOG_FORMATS:
        errors.append(f"log.format: expected one of {', '.join(_LOG_FORMATS)}, got {config.log.format!r}")
    if not 1 <= config.database.pool_size <= 10:
        errors.append("database.pool_size: expected 1 to 10")
    if not 100 <= config.database.fetch_size <= 100_000:
        errors.append("database.fetch_size: expected 100 to 100000")
    for name in ("port",):
        port = getattr(config.database, name)
        if not 0 < port < 65536:
            errors.append(f"database.{name}: expected a TCP port, got {port}")
    if not 0 < config.redis.port < 65536:
        errors.append(f"redis.port: expected a TCP port, got {config.redis.port}")
    if config.media.root is not None and not os.path.isabs(config.media.root):
        errors.append(f"media.root: expected an absolute path, got {config.media.root!r}")
    loc = config.media.location
    if loc != "auto" and not os.path.isabs(loc):
        errors.append(f"media.location: expected 'auto' or an absolute path, got {loc!r}")
    if config.immich.url is not None:
        parts = urlsplit(config.immich.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            errors.append(f"immich.url: expected an http(s) URL, got {redact_url(config.immich.url)!r}")
    for kind in config.remediation.kinds:
        if kind not in KINDS:
            errors.append(f"remediation.kinds: unknown kind {kind!r} (expected {', '.join(KINDS)})")
    if config.remediation.enabled and not config.immich.enabled:
        errors.append("remediation.enabled: needs immich.url and immich.api_key (regeneration goes via the API)")
    if config.remediation.requests_per_second <= 0:
        errors.append("remediation.requests_per_second: expected a positive number")
    for reason in config.remediation.reasons:
        if reason not in REASONS:
            errors.append(
                f"remediation.reasons: unknown reason {reason!r} (expected {', '.join(REASONS)})"
            )
    if config.remediation.max_attempts < 1:
        errors.append("remediation.max_attempts: expected 1 or more")
    if config.remediation.max_per_round < 1:
        errors.append("remediation.max_per_round: expected 1 or more")
    if not 1 <= config.remediation.batch_size <= 1000:
        errors.append("remediation.batch_size: expected 1 to 1000")
    for secret_path, secret in (
        ("database.password", config.database.password),
        ("database.url", config.database.url),
        ("redis.password", config.redis.password),
        ("redis.url", config.redis.url),
        ("immich.api_key", config.immich.api_key),
    ):
        if secret is not None:
            problem = secret.check()
            if problem:
                errors.append(f"{secret_path}: {problem}")
    return errors


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


def describe(config: Config) -> dict[str, Any]:
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
