"""The latest results of every collection, and how a scrape turns them into an exposition.

Data flows one way: collections publish immutable results here, a scrape reads them. A scrape never
waits on a backend and never runs a query.

Results name the sources they depend on. A result is shown only while all of those sources are up
*and* it was produced after each of them last came back: a value from before an outage is never shown
as current. Collections whose inputs recover are woken at once so their series return quickly.

"After" is decided by the store's own event counter (every publication and every change of a source
takes the next number), never by a clock: a wall clock stepped back by NTP used to hide every series
until it caught up again, one stepped forward could have shown a stale one. The wall clock only gives
the ``*_timestamp_seconds`` values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from immich_thumbnail_exporter import __version__
from immich_thumbnail_exporter.metrics import gauge, merge

# Every source, in the order ``immich_exporter_source_up`` and the status page list them.
SOURCES = ("postgres", "filesystem", "redis", "immich_api")


@dataclass(frozen=True)
class Part:
    """Families fed by a set of sources: hidden as soon as any of them is down."""

    needs: frozenset[str]
    families: tuple[Metric, ...] = ()
    # Families whose values depend on the time of the scrape (job ages): built at render time.
    dynamic: Callable[[float], Iterable[Metric]] | None = None


@dataclass(frozen=True)
class Result:
    collection: str
    success: bool
    duration: float
    finished_at: float
    parts: tuple[Part, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class SourceState:
    up: bool
    # The store's event number at which the source last went up or down.
    since: int
    error: str | None = None


class Store:
    """Holds the latest result per collection and the state of every source.

    Written only from the event loop; every update replaces a dict rather than mutating it, so a
    render that holds the old one sees a consistent view.
    """

    def __init__(self, collections: Iterable[str], sources: Iterable[str]) -> None:
        self.collections = tuple(collections)
        self._results: dict[str, Result] = {}
        # The event number each collection's latest result was published at.
        self._produced: dict[str, int] = {}
        self._events = 0
        self._last_success: dict[str, float] = {}
        self._sources: dict[str, SourceState] = {s: SourceState(False, 0, "not checked yet") for s in sources}
        self._listeners: list[Callable[[str], None]] = []
        self.started_at = time.time()

    # -- writers ---------------------------------------------------------------------------------
    def on_recover(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def set_source(self, source: str, up: bool, error: str | None = None) -> None:
        if source not in self._sources:
            return
        old = self._sources[source]
        if old.up == up and old.error == error:
            return
        if old.up != up:
            self._events += 1
        since = self._events if old.up != up else old.since
        self._sources = {**self._sources, source: SourceState(up, since, None if up else error)}
        if up and not old.up:
            for listener in self._listeners:
                listener(source)

    def publish(self, result: Result, sources: Mapping[str, bool | str | None] | None = None) -> None:
        """Store a result; ``sources`` maps each source the run touched to True, or an error line."""
        for source, state in (sources or {}).items():
            if state is True:
                self.set_source(source, True)
            else:
                self.set_source(source, False, state if isinstance(state, str) else "unavailable")
        self._events += 1
        self._produced = {**self._produced, result.collection: self._events}
        self._results = {**self._results, result.collection: result}
        if result.success:
            self._last_success = {**self._last_success, result.collection: result.finished_at}

    # -- readers ---------------------------------------------------------------------------------
    @property
    def sources(self) -> Mapping[str, SourceState]:
        return self._sources

    def result(self, collection: str) -> Result | None:
        return self._results.get(collection)

    def last_success(self, collection: str) -> float | None:
        return self._last_success.get(collection)

    @property
    def ready(self) -> bool:
        """True once every enabled collection has finished one round, whatever its outcome."""
        return all(c in self._results for c in self.collections)

    def produced(self, collection: str) -> int | None:
        """The event number the collection's latest result was published at."""
        return self._produced.get(collection)

    def visible(self, part: Part, produced: int) -> bool:
        """Every source of ``part`` is up and came up before the result (event ``produced``) was published."""
        for source in part.needs:
            state = self._sources.get(source)
            if state is None or not state.up or produced < state.since:
                return False
        return True

    def families(self, now: float | None = None) -> list[Metric]:
        now = time.time() if now is None else now
        sources, results, produced = self._sources, self._results, self._produced
        out: list[Metric] = [
            gauge("immich_exporter_build_info", [((__version__,), 1.0)]),
            gauge("immich_exporter_source_up", [((s,), 1.0 if st.up else 0.0) for s, st in sources.items()]),
        ]
        names = [c for c in self.collections]
        out.append(gauge("immich_exporter_collection_success", [
            ((c,), 1.0 if results[c].success else 0.0) for c in names if c in results
        ]))
        out.append(gauge("immich_exporter_collection_duration_seconds", [
            ((c,), results[c].duration) for c in names if c in results
        ]))
        out.append(gauge("immich_exporter_collection_last_success_timestamp_seconds", [
            ((c,), self._last_success[c]) for c in names if c in self._last_success
        ]))
        data: list[Metric] = []
        for name in names:
            result = results.get(name)
            if result is None:
                continue
            for part in result.parts:
                if not self.visible(part, produced[name]):
                    continue
                data.extend(part.families)
                if part.dynamic is not None:
                    data.extend(part.dynamic(now))
        out.extend(merge(data))
        return out


class StoreCollector(Collector):
    """Adapter so prometheus_client's encoders can render the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        yield from self.store.families()
