"""Render metric families exactly as ``/metrics`` does, for the unit tests' expected texts."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from immich_thumbnail_exporter.exposition.http import build_registry
from immich_thumbnail_exporter.store import Store


class _Fixed(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render(families: Iterable[Metric]) -> str:
    """Families through prometheus_client's text encoder, the one the HTTP handler picks by default."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    encoder, _ = choose_encoder("")
    return encoder(registry).decode()


def render_store(store: Store) -> str:
    """A store through the HTTP handler's registry and encoder; the process' own metrics left out."""
    encoder, _ = choose_encoder("")
    text = encoder(build_registry(store)).decode()
    return "".join(line + "\n" for line in text.splitlines() if not name(line).startswith(("process_", "python_")))


def name(line: str) -> str:
    """The metric a line of an exposition is about: a HELP/TYPE line's or a sample's."""
    return line.split(" ")[2] if line.startswith("#") else line.split("{")[0].split(" ")[0]


def lines(text: str) -> list[str]:
    """The sample lines only (no HELP or TYPE), in order."""
    return [line for line in text.splitlines() if line and not line.startswith("#")]
