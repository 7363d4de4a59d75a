"""Exception to source state, and logging only on change: one table, no servers."""

from __future__ import annotations

import logging

import pytest

from immich_thumbnail_exporter.sources.health import Failure, SourceStates, classify
from immich_thumbnail_exporter.sources.postgres import QueryError, SourceError
from immich_thumbnail_exporter.sources.schema import SchemaError


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (SourceError("redis", "connection refused"),
         Failure("redis: connection refused", "redis", "connection refused")),
        (QueryError("postgres", "permission denied for table asset"),
         Failure("postgres: permission denied for table asset")),
        (SchemaError("no asset table"), Failure("postgres: unsupported schema: no asset table")),
        (TimeoutError(), Failure("did not finish in time")),
        (ZeroDivisionError("division by zero"), Failure("internal error: division by zero", unexpected=True)),
    ],
    ids=["down", "refused-not-down", "schema", "timeout", "bug"],
)
def test_classify(exc: BaseException, expected: Failure) -> None:
    assert classify(exc) == expected


def test_states_log_only_when_they_change(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    states = SourceStates(logging.getLogger("test"), "queues")
    states.set("redis", True)
    for _ in range(5):
        states.failed(SourceError("redis", "connection refused"))
    states.failed(SourceError("redis", "timed out"))
    for _ in range(3):
        states.set("redis", True)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "queues: redis not usable: connection refused"),
        ("WARNING", "queues: redis not usable: timed out"),
        ("INFO", "queues: redis is back"),
    ]
    assert states.snapshot() == {"redis": True}


def test_a_refused_query_does_not_mark_the_source_down() -> None:
    states = SourceStates(logging.getLogger("test"), "inventory")
    states.set("postgres", True)
    failure = states.failed(QueryError("postgres", "permission denied"))
    assert failure.source is None
    assert states.get("postgres") is True
