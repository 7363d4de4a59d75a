"""The one way an exception becomes a source's state, and the one way that state is logged.

Every collection meets the same backend failures; each used to word and log them on its own. Here:

* ``classify`` turns an exception into a ``Failure``: the round's one-line error, and the source it shows
  to be down, if any. A server that answered but refused a query (``QueryError``: a missing GRANT, a
  statement timeout) fails the round without calling its source down: the probe says whether it is.
* ``SourceStates`` keeps each source's last state and logs only when it changes: a warning when a source
  goes down (or fails in a new way), an info line when it is back. An outage of an hour is two lines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from immich_thumbnail_exporter.sources.postgres import QueryError, SourceError, describe_error
from immich_thumbnail_exporter.sources.schema import SchemaError

State = bool | str


@dataclass(frozen=True)
class Failure:
    # The round's one line ("redis: connection refused").
    error: str
    # The source the failure shows to be down, with its state line; None when no source is down.
    source: str | None = None
    state: str | None = None
    # Not a backend problem: a bug, to be logged with its traceback.
    unexpected: bool = False


def classify(exc: BaseException, timeout: str = "did not finish in time") -> Failure:
    """What an exception raised by a source says about the round and about the source."""
    if isinstance(exc, QueryError):
        return Failure(f"{exc.source}: {exc}")
    if isinstance(exc, SourceError):
        return Failure(f"{exc.source}: {exc}", exc.source, str(exc))
    if isinstance(exc, SchemaError):
        return Failure(f"postgres: unsupported schema: {exc}")
    if isinstance(exc, TimeoutError):
        return Failure(timeout)
    return Failure(f"internal error: {describe_error(exc)}", unexpected=True)


class SourceStates:
    """Each source's last state (True, or the line saying why it is not usable), logged on change."""

    def __init__(self, logger: logging.Logger, context: str) -> None:
        self._log = logger
        self._context = context
        self._states: dict[str, State] = {}

    def set(self, source: str, state: State) -> State:
        previous = self._states.get(source)
        self._states[source] = state
        if state is True:
            if previous not in (None, True):
                self._log.info("%s: %s is back", self._context, source)
        elif previous != state:
            self._log.warning("%s: %s not usable: %s", self._context, source, state)
        return state

    def failed(self, exc: BaseException, timeout: str = "did not finish in time") -> Failure:
        """Classify ``exc``, record the source it shows down, and log as the state changes."""
        failure = classify(exc, timeout)
        if failure.source is not None and failure.state is not None:
            self.set(failure.source, failure.state)
        elif failure.unexpected:
            self._log.error("%s failed unexpectedly: %s", self._context, failure.error, exc_info=exc)
        return failure

    def get(self, source: str) -> State | None:
        return self._states.get(source)

    def snapshot(self) -> dict[str, State]:
        return dict(self._states)
