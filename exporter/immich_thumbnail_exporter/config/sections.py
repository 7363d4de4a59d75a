"""The configuration's sections: frozen pydantic dataclasses, each field with its type, default and docs.

A key that is not a field is an error; the field docstrings become the published JSON Schema's
descriptions (``immich-thumbnail-exporter config-schema``). A secret field ``x`` may also be given as
``x_file``, the path of a file holding it (the loader turns that key into a file-backed ``Secret``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Annotated, Any, Final

from pydantic import AfterValidator, ConfigDict, model_validator
from pydantic.dataclasses import dataclass

from immich_thumbnail_exporter.config.durations import Duration
from immich_thumbnail_exporter.config.secret import Secret
from immich_thumbnail_exporter.config.types import (
    Between,
    Integer,
    Number,
    OneOf,
    SecretValue,
    Switch,
    absolute_path,
    auto_or_absolute_path,
    http_url,
)
from immich_thumbnail_exporter.vocabulary import PROBLEM_KINDS, REASONS

LOG_LEVELS: Final = ("debug", "info", "warn", "error")
LOG_FORMATS: Final = ("logfmt", "json")

Port = Annotated[Integer, Between(1, 65535, "expected a TCP port, got {value}")]


def secret_fields(cls: type[Any]) -> tuple[str, ...]:
    """The fields of a section that hold a ``Secret`` (and so may be given as ``<name>_file``)."""
    hints = typing.get_type_hints(cls)
    return tuple(f.name for f in dataclasses.fields(cls) if Secret in typing.get_args(hints[f.name]))


def _file_keys(schema: dict[str, Any], cls: type[Any]) -> None:
    for name in secret_fields(cls):
        schema["properties"][f"{name}_file"] = {
            "type": "string",
            "description": f"A file holding {name}, read again on each reconnect (instead of {name}).",
        }


_SECTION: Final = ConfigDict(
    extra="forbid",
    use_attribute_docstrings=True,
    coerce_numbers_to_str=True,
    json_schema_extra=_file_keys,
)


class _Section:
    """Behaviour shared by the sections: an empty YAML section (``database:``) means the defaults."""

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        return {} if data is None else data


@dataclass(frozen=True, config=_SECTION)
class DatabaseConfig(_Section):
    """Immich's PostgreSQL (Immich's DB_* variables work too)."""

    url: SecretValue | None = None
    """A connection URL (postgresql://user:pass@host:5432/immich); wins over the keys below."""
    host: str = "database"
    port: Port = 5432
    user: str = "postgres"
    password: SecretValue | None = None
    name: str = "immich"
    """The database name."""
    sslmode: str | None = None
    pool_size: Annotated[Integer, Between(1, 10, "expected 1 to 10")] = 2
    """Connections: one streams the file rows, the other answers the small queries."""
    connect_timeout: Duration = Duration(10.0)
    statement_timeout: Duration = Duration(120.0)
    fetch_size: Annotated[Integer, Between(100, 100_000, "expected 100 to 100000")] = 5000
    """Rows fetched per round trip from the server-side cursor: memory stays flat with library size."""


@dataclass(frozen=True, config=_SECTION)
class MediaConfig(_Section):
    """Immich's media folder."""

    root: Annotated[str | None, AfterValidator(absolute_path)] = None
    """Where this process sees Immich's media folder (the volume Immich mounts at /data); mount it read-only."""
    location: Annotated[str, AfterValidator(auto_or_absolute_path)] = "auto"
    """The prefix stored in the database; "auto" reads system_metadata.MediaLocation."""


@dataclass(frozen=True, config=_SECTION)
class RedisConfig(_Section):
    """Immich's Redis or Valkey, for the BullMQ job queues (optional)."""

    url: SecretValue | None = None
    host: str | None = None
    port: Port = 6379
    db: Integer = 0
    username: str | None = None
    password: SecretValue | None = None
    socket: str | None = None
    """A Unix socket path, instead of host and port."""
    prefix: str = "immich_bull"
    """BullMQ's key prefix, as Immich sets it."""
    timeout: Duration = Duration(5.0)
    orphan_sample: Integer = 200
    """Waiting/active jobs checked against the database per queue and round for orphaned jobs."""

    @property
    def enabled(self) -> bool:
        return bool(self.url) or self.host is not None or self.socket is not None


@dataclass(frozen=True, config=_SECTION)
class ImmichConfig(_Section):
    """Immich's API (optional): the queue fallback and regeneration."""

    url: Annotated[str | None, AfterValidator(http_url)] = None
    """Immich's server, e.g. http://immich-server:2283."""
    api_key: SecretValue | None = None
    """An API key: an admin's for queue statistics, the asset owner's for regeneration."""
    timeout: Duration = Duration(10.0)

    @property
    def enabled(self) -> bool:
        return self.url is not None


@dataclass(frozen=True, config=_SECTION)
class IntervalsConfig(_Section):
    """How often each collection runs under serve (never at scrape time)."""

    queues: Duration = Duration(15.0)
    inventory: Duration = Duration(300.0)
    files: Duration = Duration(900.0)


@dataclass(frozen=True, config=_SECTION)
class ChecksConfig(_Section):
    """What the file check looks at."""

    verify_headers: Switch = False
    """Read the first bytes of every thumbnail and compare them with the extension (jpeg, webp, avif)."""
    check_originals: Switch = False
    """Check that each eligible asset's original file still exists (regeneration cannot fix those)."""
    file_sizes: Switch = True
    """lstat every thumbnail: its size (immich_thumbnail_bytes, orphaned bytes) and empty files (file_empty).
    Off, the walk reads directory entries only: about half the file check's CPU at a million assets, without
    those series. verify_headers reads every file, so it keeps sizes."""


@dataclass(frozen=True, config=_SECTION)
class RemediationConfig(_Section):
    """Opt-in: let serve ask Immich's API to regenerate what it finds."""

    enabled: Switch = False
    """Needs immich.url and immich.api_key: regeneration goes through Immich's API only."""
    kinds: Annotated[tuple[str, ...], OneOf("kind", PROBLEM_KINDS)] = ("thumbnail", "preview", "fullsize")
    """Kinds of problem remediation may act on; add person for face thumbnails (PUT /api/people/{id})."""
    batch_size: Annotated[Integer, Between(1, 1000, "expected 1 to 1000")] = 50
    """Assets per request."""
    max_per_round: Annotated[Integer, Between(1, None, "expected 1 or more")] = 500
    requests_per_second: Annotated[Number, Between(0, None, "expected a positive number", exclusive_low=True)] = 2.0
    verify_after: Duration = Duration(300.0)
    """How long after a request the files are checked again."""
    max_attempts: Annotated[Integer, Between(1, None, "expected 1 or more")] = 3
    state_dir: str = "/var/lib/immich-thumbnail-exporter"
    """Where the ledger of requests is kept."""
    reasons: Annotated[tuple[str, ...], OneOf("reason", REASONS)] = (
        "no_record",
        "file_missing",
        "file_empty",
        "file_corrupt",
    )
    """Reasons remediation may act on. file_unreadable is left out by default: the exporter cannot read the
    file (permissions, a symlink out of the media folder), which regeneration does not change."""
    interval: Duration = Duration(60.0)
    """How often a remediation round runs under serve (verify earlier requests, submit new ones)."""
    confirm_within: Duration = Duration(10.0)
    """After each accepted request, how long to look for a job naming each asset before calling it
    not_queued (Immich v3.0.0 answered 204 and queued nothing)."""


@dataclass(frozen=True, config=_SECTION)
class WebSettings(_Section):
    """The HTTP server (also --web.listen-address and --web.config.file)."""

    listen_address: str = ":9813"
    config_file: str | None = None
    """TLS, basic auth and rate limiting, in the Prometheus exporter-toolkit format."""


@dataclass(frozen=True, config=_SECTION)
class LogSettings(_Section):
    """Logging on stderr (also --log.level and --log.format)."""

    level: Annotated[str, OneOf("", LOG_LEVELS)] = "info"
    format: Annotated[str, OneOf("", LOG_FORMATS)] = "logfmt"


@dataclass(frozen=True, config=_SECTION)
class CollectorSwitches(_Section):
    """Collections to run (also --[no-]collector.<name>)."""

    inventory: Switch = True
    files: Switch = True
    queues: Switch = True


@dataclass(frozen=True, config=ConfigDict(extra="forbid", use_attribute_docstrings=True))
class Config:
    """The exporter's configuration file (immich-thumbnail-exporter --config.file)."""

    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    """Required here or as Immich's DB_URL / DB_HOSTNAME ... variables."""
    media: MediaConfig = field(default_factory=MediaConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    immich: ImmichConfig = field(default_factory=ImmichConfig)
    intervals: IntervalsConfig = field(default_factory=IntervalsConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    remediation: RemediationConfig = field(default_factory=RemediationConfig)
    web: WebSettings = field(default_factory=WebSettings)
    log: LogSettings = field(default_factory=LogSettings)
    collectors: CollectorSwitches = field(default_factory=CollectorSwitches)


# Section name -> its class, in the order problems are listed.
SECTIONS: Final[dict[str, type[Any]]] = typing.get_type_hints(Config)
