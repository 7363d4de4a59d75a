"""Field types of the configuration: what each accepts, its problem line, and its JSON Schema.

Values arrive from YAML (typed) and from the environment and flags (strings), so numbers and switches
accept their string spelling; a boolean is never taken for a number, nor a number for a switch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from immich_thumbnail_exporter.config.errors import problem, shown
from immich_thumbnail_exporter.config.redact import redact_url
from immich_thumbnail_exporter.config.secret import Secret


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise problem(f"expected a number, got {value!r}")
    return value


def _whole(value: Any) -> Any:
    if isinstance(value, bool | float):
        raise problem(f"expected an integer, got {shown(value)}")
    return value


def _switch(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise problem(f"expected true or false, got {shown(value)}")
    return value


def _secret(value: Any) -> Secret:
    if isinstance(value, Secret):
        return value
    if isinstance(value, str | int) and not isinstance(value, bool):
        return Secret(value=str(value))
    raise problem("expected a string, got <redacted>")


Integer = Annotated[int, BeforeValidator(_whole)]
Number = Annotated[float, BeforeValidator(_no_bool)]
Switch = Annotated[bool, BeforeValidator(_switch)]
SecretValue = Annotated[Secret, PlainValidator(_secret), WithJsonSchema({"type": "string", "writeOnly": True})]


@dataclass(frozen=True)
class Between:
    """A number from ``low`` to ``high`` (either may be open); ``message`` is the problem line's text."""

    low: float | None
    high: float | None
    message: str
    exclusive_low: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        if self.low is not None:
            out["exclusiveMinimum" if self.exclusive_low else "minimum"] = self.low
        if self.high is not None:
            out["maximum"] = self.high
        return out

    def _check(self, value: float) -> float:
        low_ok = self.low is None or (value > self.low if self.exclusive_low else value >= self.low)
        if not low_ok or (self.high is not None and value > self.high):
            raise problem(self.message.format(value=value))
        return value


@dataclass(frozen=True)
class OneOf:
    """A word (or, on a tuple, words) from ``vocabulary``; a string of words may be comma-separated."""

    what: str
    vocabulary: tuple[str, ...]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        inner = handler(source)
        if inner["type"] == "tuple":
            return core_schema.no_info_before_validator_function(
                _split, core_schema.no_info_after_validator_function(self._check_all, inner)
            )
        return core_schema.no_info_after_validator_function(self._check, inner)

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        words = {"enum": list(self.vocabulary)}
        if schema["type"] == "function-before":  # the tuple
            return {"anyOf": [{"type": "array", "items": words}, {"type": "string", "description": "comma-separated"}]}
        return {"type": "string", **words}

    def _check(self, value: str) -> str:
        if value not in self.vocabulary:
            expected = ", ".join(self.vocabulary)
            if self.what:
                raise problem(f"unknown {self.what} {value!r} (expected {expected})")
            raise problem(f"expected one of {expected}, got {value!r}")
        return value

    def _check_all(self, values: Sequence[str]) -> tuple[str, ...]:
        return tuple(self._check(v) for v in values)


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    return value


def _path_check(check: Callable[[str], str | None]) -> Callable[[str | None], str | None]:
    def validate(value: str | None) -> str | None:
        if value is not None:
            message = check(value)
            if message:
                raise problem(message)
        return value

    return validate


def _absolute(value: str) -> str | None:
    return None if os.path.isabs(value) else f"expected an absolute path, got {value!r}"


def _auto_or_absolute(value: str) -> str | None:
    return None if value == "auto" or os.path.isabs(value) else f"expected 'auto' or an absolute path, got {value!r}"


def _http_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.netloc:
            return None
    except ValueError:
        pass
    return f"expected an http(s) URL, got {redact_url(value)!r}"


absolute_path = _path_check(_absolute)
auto_or_absolute_path = _path_check(_auto_or_absolute)
http_url = _path_check(_http_url)
