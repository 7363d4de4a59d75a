"""Configuration problems: one line each, named by dotted path (``database.port: expected an integer``).

pydantic reports every problem of a validation at once; this module words its errors as the rest of the
exporter words them, and never shows the value of a secret (secret fields raise their own errors, which
carry no input).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

# Errors our own validators raise: the message is the whole problem.
OWN_ERROR: Final = "config"
_SHOWN_MAX: Final = 80


class ConfigError(Exception):
    """One or more configuration problems; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def problem(text: str) -> PydanticCustomError:
    """An error for a validator to raise; ``text`` is shown as it is, after the field's path."""
    return PydanticCustomError(OWN_ERROR, "{problem}", {"problem": text})


def shown(value: object) -> str:
    """A value as a problem line shows it: its repr, on one line, cut when long."""
    text = repr(value)
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


def key_text(key: object) -> str:
    """A key as typed, or quoted when it holds anything odd, so that one problem stays one line."""
    name = str(key)
    return name if name and name.isprintable() and name.strip() == name else repr(name)


def dotted(parts: Sequence[object]) -> str:
    return ".".join(key_text(p) for p in parts)


def problems_of(exc: ValidationError, root: type[Any], prefix: Sequence[str] = ()) -> list[str]:
    """One line per error of ``exc``, raised while validating the dataclass ``root`` found at ``prefix``."""
    return [_line(error, root, tuple(prefix)) for error in exc.errors()]


def _line(error: ErrorDetails, root: type[Any], prefix: tuple[str, ...]) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    value = error.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
        parent = _dataclass_at(root, loc[:-1])
        known = ", ".join(sorted(f.name for f in dataclasses.fields(parent))) if parent else ""
        return f"{dotted(prefix + loc)}: unknown key" + (f" (known keys: {known})" if known else "")
    # Positions in a list are left out: "remediation.kinds: ..." names the field, the message the item.
    where = dotted(prefix + tuple(p for p in loc if isinstance(p, str)))
    head = f"{where}: " if where else ""
    if kind == OWN_ERROR:
        return head + str(error.get("ctx", {}).get("problem", error["msg"]))
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"{head}expected an integer, got {shown(value)}"
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"{head}expected a number, got {shown(value)}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{head}expected true or false, got {shown(value)}"
    if kind in ("string_type", "string_unicode"):
        return f"{head}expected a string, got {shown(value)}"
    if kind in ("dataclass_type", "dataclass_args_type", "dict_type", "model_type"):
        return f"{head}expected a mapping, got {shown(value)}"
    if kind in ("tuple_type", "list_type", "iterable_type"):
        return f"{head}expected a list, got {shown(value)}"
    if kind == "literal_error":
        expected = str(error.get("ctx", {}).get("expected", "")).replace("'", "").replace(" or ", ", ")
        return f"{head}expected one of {expected}, got {shown(value)}"
    return head + error["msg"]


def _dataclass_at(root: type[Any], loc: tuple[int | str, ...]) -> type[Any] | None:
    cls: type[Any] | None = root
    for part in loc:
        if cls is None or not isinstance(part, str):
            return None
        hints = typing.get_type_hints(cls)
        cls = _bare(hints[part]) if part in hints else None
    return cls if cls is not None and dataclasses.is_dataclass(cls) else None


def _bare(tp: Any) -> type[Any] | None:
    """The class inside ``X | None`` or ``Annotated[X, ...]``, when it is a class."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) else None
