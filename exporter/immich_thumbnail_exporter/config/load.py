"""Loading: one YAML file, then the environment, then flags (later wins), then validation.

Every problem is collected, not raised one at a time, so that ``check-config`` (and every other command)
lists them all at once: unknown keys, bad values, secret files that cannot be read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml
from pydantic import TypeAdapter, ValidationError

from immich_thumbnail_exporter.config import strict_yaml
from immich_thumbnail_exporter.config.env import database_variables, env_overrides
from immich_thumbnail_exporter.config.errors import ConfigError, key_text, problems_of
from immich_thumbnail_exporter.config.secret import Secret
from immich_thumbnail_exporter.config.sections import SECTIONS, Config, secret_fields

T = TypeVar("T")

_ADAPTERS: Final[dict[str, TypeAdapter[Any]]] = {name: TypeAdapter(cls) for name, cls in SECTIONS.items()}


def _not_configured() -> str:
    first, second, *rest = database_variables()
    return (
        "database: not configured; set it in the database section of the configuration file (--config.file), "
        f"or with Immich's variables {first} or {second} (and {', '.join(rest)})"
    )


NOT_CONFIGURED: Final = _not_configured()


@dataclass(frozen=True)
class Loaded:
    """What loading found: the configuration when there is no problem, and each section that is valid."""

    config: Config | None
    problems: list[str]
    sections: Mapping[str, Any] = field(default_factory=dict)

    def section(self, name: str, cls: type[T]) -> T | None:
        """The section ``name`` if it is valid on its own (also when another section is not)."""
        value = self.sections.get(name)
        return value if isinstance(value, cls) else None


def load_config(
    path: str | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    require_database: bool = False,
) -> Config:
    """Build the configuration from YAML, then environment, then flag overrides (dotted keys).

    Raises ConfigError listing every problem. With ``require_database``, naming no database at all (no
    ``database`` section, no ``DB_*`` variable, no ``database.*`` flag) is one of them.
    """
    loaded = collect(path, environ, overrides, require_database=require_database)
    if loaded.config is None:
        raise ConfigError(loaded.problems)
    return loaded.config


def collect(
    path: str | None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    require_database: bool = False,
) -> Loaded:
    """``load_config`` without raising: the problems, and the sections valid on their own."""
    problems: list[str] = []
    try:
        data: dict[str, Any] = read_yaml(path) if path else {}
        named = bool(data.get("database"))
    except ConfigError as exc:
        # The environment and flags are still checked (they may name the web configuration file), but
        # whether the file names a database cannot be told.
        problems.extend(exc.problems)
        data, named = {}, True
    env = env_overrides(os.environ if environ is None else environ)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    named = named or any(k.startswith("database.") for k in (*env, *flags))
    if require_database and not named:
        problems.append(NOT_CONFIGURED)
    tree = _merge(_merge(data, _tree(env)), _tree(flags))
    tree = _secret_file_keys(tree, problems)
    sections: dict[str, Any] = {}
    known = ", ".join(SECTIONS)
    problems.extend(f"{key_text(k)}: unknown key (known keys: {known})" for k in tree if k not in SECTIONS)
    for name, adapter in _ADAPTERS.items():
        try:
            sections[name] = adapter.validate_python(tree.get(name))
        except ValidationError as exc:
            problems.extend(problems_of(exc, SECTIONS[name], (name,)))
    problems.extend(_across_sections(sections))
    problems.extend(_unreadable_secrets(tree))
    config = None if problems else Config(**sections)
    return Loaded(config, problems, sections)


def read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: configuration file is not UTF-8 text"]) from None
    try:
        data = strict_yaml.load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: {strict_yaml.describe(exc)}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return data


def _tree(dotted_values: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in dotted_values.items():
        _set_path(tree, dotted, value)
    return tree


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


def _secret_file_keys(tree: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """``<secret>_file: path`` keys become file-backed secrets; ``_file`` on anything else is refused."""
    out = dict(tree)
    for name, cls in SECTIONS.items():
        section = tree.get(name)
        if not isinstance(section, Mapping):
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        secrets = secret_fields(cls)
        converted: dict[Any, Any] = {}
        for key, value in section.items():
            base = key[: -len("_file")] if isinstance(key, str) and key.endswith("_file") else None
            if base is None or base not in fields:
                converted[key] = value
                continue
            where = f"{name}.{key_text(key)}"
            if base not in secrets:
                problems.append(f"{where}: unknown key (only secrets can be read from files)")
            elif not isinstance(value, str) or not value:
                problems.append(f"{where}: expected a file path")
            elif base in section:
                problems.append(f"{where}: give either {base} or {key}, not both")
            else:
                converted[base] = Secret(file=value)
        out[name] = converted
    return out


def _across_sections(sections: Mapping[str, Any]) -> list[str]:
    """Checks spanning sections, for the sections that are valid on their own."""
    remediation, immich = sections.get("remediation"), sections.get("immich")
    if remediation is not None and immich is not None and remediation.enabled and not immich.enabled:
        return ["remediation.enabled: needs immich.url and immich.api_key (regeneration goes via the API)"]
    return []


def _unreadable_secrets(tree: Mapping[str, Any]) -> list[str]:
    """A line per secret file that cannot be read, wherever the rest of its section stands."""
    problems: list[str] = []
    for name, cls in SECTIONS.items():
        section = tree.get(name)
        if not isinstance(section, Mapping):
            continue
        for key in secret_fields(cls):
            secret = section.get(key)
            if isinstance(secret, Secret):
                problem = secret.check()
                if problem:
                    problems.append(f"{name}.{key}: {problem}")
    return problems
