"""What every collection is: a named round under a deadline that yields an ``Outcome``.

Each collection runs in its own loop (``runtime.py``) under its own deadline and publishes an
immutable result. A collection never raises for a backend problem: it reports which sources it found
down, and its series disappear until that source is back. Each declares the sources it reads
(``sources``): the runner wakes it when one of them recovers, and ``serve`` derives the list of sources
it reports from the enabled collections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from immich_thumbnail_exporter.store import Part


@dataclass
class Outcome:
    parts: tuple[Part, ...] = ()
    # Each source the run touched: True when it worked, else a one-line error.
    sources: dict[str, bool | str] = field(default_factory=dict)
    # Set when the run failed in part: the parts it did produce are still published.
    error: str | None = None


class Collection(Protocol):
    name: str
    interval: float
    timeout: float
    # The sources this collection reads; a recovery of one wakes its loop.
    sources: frozenset[str]

    async def collect(self) -> Outcome: ...

    async def close(self) -> None: ...
