"""Configuration: one YAML file, then the environment, then flags (later wins).

``sections`` declares the sections (pydantic dataclasses: a key that is not a field is an error),
``types`` what each field accepts, ``env`` Immich's variable names, ``strict_yaml`` the one YAML reader
(duplicate keys refused; the web configuration uses it too), ``load`` the merge and the validation (every
problem listed at once), ``errors`` the problem lines (each named by its dotted path), ``secret``
file-backed secrets, ``durations`` the one duration parser, ``redact`` what may be shown, ``schema`` the
published JSON Schema.
"""

from immich_thumbnail_exporter.config.durations import Duration, duration_argument, parse_duration
from immich_thumbnail_exporter.config.env import ENV_MAP, env_overrides
from immich_thumbnail_exporter.config.errors import ConfigError
from immich_thumbnail_exporter.config.load import NOT_CONFIGURED, Loaded, collect, load_config, read_yaml
from immich_thumbnail_exporter.config.redact import describe, redact_url
from immich_thumbnail_exporter.config.schema import config_schema
from immich_thumbnail_exporter.config.secret import Secret
from immich_thumbnail_exporter.config.sections import (
    LOG_FORMATS,
    LOG_LEVELS,
    ChecksConfig,
    CollectorSwitches,
    Config,
    DatabaseConfig,
    ImmichConfig,
    IntervalsConfig,
    LogSettings,
    MediaConfig,
    RedisConfig,
    RemediationConfig,
    WebSettings,
)

__all__ = [
    "ENV_MAP",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "NOT_CONFIGURED",
    "ChecksConfig",
    "CollectorSwitches",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "Duration",
    "ImmichConfig",
    "IntervalsConfig",
    "Loaded",
    "LogSettings",
    "MediaConfig",
    "RedisConfig",
    "RemediationConfig",
    "Secret",
    "WebSettings",
    "collect",
    "config_schema",
    "describe",
    "duration_argument",
    "env_overrides",
    "load_config",
    "parse_duration",
    "read_yaml",
    "redact_url",
]
