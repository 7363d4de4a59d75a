"""The one duration parser: the configuration file, the web configuration file and duration flags.

A duration is a sequence of ``<number><unit>`` (``15s``, ``1h30m``, ``1.5h``, ``250ms``), the grammar
Prometheus and Go's ``time.ParseDuration`` share, with the units of both (``ns`` ... ``h``, and ``d``).
What a bare number means differs by file, so the caller says: seconds in our configuration, whole
nanoseconds in the exporter-toolkit web configuration (that is how Go's yaml.v2 reads a
``time.Duration``).
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Any, Final, Literal

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from immich_thumbnail_exporter.config.errors import problem

_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")
_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
EXAMPLES: Final = "15s, 1m30s or 500ms"
# For the configuration's JSON Schema: a positive duration string (number-unit pairs).
PATTERN: Final = r"^\s*\+?((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d))+\s*$"


class Duration(float):
    """A float of seconds, parsed from a duration: a configuration field of this type takes a duration."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate, serialization=core_schema.plain_serializer_function_ser_schema(format_duration)
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {
            "anyOf": [
                {"type": "string", "pattern": PATTERN},
                {"type": "number", "exclusiveMinimum": 0, "description": "seconds"},
            ],
            "description": f"a duration like {EXAMPLES}, or a number of seconds",
        }


def _validate(value: Any) -> Duration:
    if isinstance(value, Duration):
        return value
    try:
        return Duration(parse_duration(value))
    except ValueError as exc:
        raise problem(str(exc)) from None


def parse_duration(
    value: object,
    *,
    zero: bool = False,
    numbers: Literal["seconds", "nanoseconds"] = "seconds",
) -> float:
    """Seconds in ``value``: a duration string, or a number of ``numbers``.

    Raises ValueError with a one-line reason. Negative durations are refused; zero only when ``zero``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration like {EXAMPLES}, got {value!r}")
    if isinstance(value, str):
        seconds = _parse_text(value)
    elif numbers == "nanoseconds":
        if not isinstance(value, int):
            raise ValueError(f"expected a duration like {EXAMPLES} or whole nanoseconds, got {value!r}")
        seconds = value * 1e-9
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"expected a duration like {EXAMPLES}, got {value!r}")
    if seconds < 0:
        raise ValueError(f"must not be negative, got {value!r}")
    if seconds == 0 and not zero:
        raise ValueError(f"expected a positive duration, got {value!r}")
    return seconds


def _parse_text(value: str) -> float:
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    if text[:1] in "+-":
        text = text[1:]
    if text == "0":
        return 0.0
    seconds, pos = 0.0, 0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        seconds += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(text):
        raise ValueError(f"expected a duration like {EXAMPLES}, got {value!r}")
    return sign * seconds


def format_duration(seconds: float) -> str | float:
    """``seconds`` in the largest unit that divides it (``300.0`` -> ``5m``), else as a number."""
    for unit in ("d", "h", "m", "s", "ms"):
        count = seconds / _UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return seconds


def duration_argument(text: str) -> float:
    """``type=`` for an argparse flag taking a duration (positive, bare numbers in seconds)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
