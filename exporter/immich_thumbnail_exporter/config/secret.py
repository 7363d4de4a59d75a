"""Secrets: a value given inline or read from a file, never shown."""

from __future__ import annotations

from pathlib import Path

from immich_thumbnail_exporter.config.errors import ConfigError


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
            except UnicodeDecodeError:
                raise ConfigError([f"cannot read secret file {self._file}: not UTF-8 text"]) from None
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
