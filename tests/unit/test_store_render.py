"""The store and ``/metrics``: results and source states in, the exposition a scrape gets out.

Driven by a fake wall clock; rendered through the HTTP handler's own registry and encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from immich_thumbnail_exporter import __version__
from immich_thumbnail_exporter import store as store_module
from immich_thumbnail_exporter.metrics import gauge
from immich_thumbnail_exporter.store import Part, Result, Store
from tests.unit.expo import render_store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(store_module, "time", c)
    return c


DB = frozenset({"postgres"})
DB_DISK = frozenset({"postgres", "filesystem"})
NO_RECORD = Part(DB, (gauge("immich_asset_files_missing", [(("thumbnail", "no_record"), 2.0)]),
                      gauge("immich_assets_thumbhash_missing", [((), 3.0)])))
ON_DISK = Part(DB_DISK, (gauge("immich_asset_files_missing", [(("thumbnail", "file_missing"), 5.0)]),))
# A value that depends on the time of the scrape: computed at render time, from the scrape's clock.
AGE = Part(DB, dynamic=lambda now: [gauge("immich_queue_oldest_job_age_seconds",
                                          [(("thumbnailGeneration", "waiting"), now - 40.0)])])

HEAD = f"""\
# HELP immich_exporter_build_info Build information of the exporter.
# TYPE immich_exporter_build_info gauge
immich_exporter_build_info{{version="{__version__}"}} 1.0
"""
SOURCES_HELP = """\
# HELP immich_exporter_source_up 1 when the exporter can use the source.
# TYPE immich_exporter_source_up gauge
"""
SUCCESS_HELP = """\
# HELP immich_exporter_collection_success 1 when the collection's last run succeeded.
# TYPE immich_exporter_collection_success gauge
"""
DURATION_HELP = """\
# HELP immich_exporter_collection_duration_seconds How long the collection's last run took.
# TYPE immich_exporter_collection_duration_seconds gauge
"""
LAST_HELP = """\
# HELP immich_exporter_collection_last_success_timestamp_seconds Unix time of the collection's last successful run.
# TYPE immich_exporter_collection_last_success_timestamp_seconds gauge
"""
MISSING_HELP = """\
# HELP immich_asset_files_missing Eligible assets whose thumbnail-type file is missing or broken, by kind and reason.
# TYPE immich_asset_files_missing gauge
"""
THUMBHASH_HELP = """\
# HELP immich_assets_thumbhash_missing Eligible assets with no thumbhash.
# TYPE immich_assets_thumbhash_missing gauge
"""


def nothing_yet(store: Store, clock: Clock) -> None:
    pass


def both_up(store: Store, clock: Clock) -> None:
    store.publish(Result("inventory", True, 0.5, 110.0, (NO_RECORD, AGE)), {"postgres": True})
    store.publish(Result("files", True, 2.0, 120.0, (ON_DISK,)), {"postgres": True, "filesystem": True})
    clock.now = 130.0


def disk_down(store: Store, clock: Clock) -> None:
    both_up(store, clock)
    store.publish(Result("files", False, 1.0, 140.0, (), "filesystem: media root is gone"),
                  {"filesystem": "media root is gone"})


def back_after_the_round(store: Store, clock: Clock) -> None:
    """The disk failed, came back at 150; the files round of 120 predates that: not shown as current."""
    both_up(store, clock)
    store.set_source("filesystem", False, "gone")
    clock.now = 150.0
    store.set_source("filesystem", True)


def database_down(store: Store, clock: Clock) -> None:
    both_up(store, clock)
    store.set_source("postgres", False, "connection refused")


UP_UP = (SOURCES_HELP + 'immich_exporter_source_up{source="postgres"} 1.0\n'
         'immich_exporter_source_up{source="filesystem"} 1.0\n')
META_BOTH = (
    SUCCESS_HELP + 'immich_exporter_collection_success{collection="inventory"} 1.0\n'
    'immich_exporter_collection_success{collection="files"} 1.0\n'
    + DURATION_HELP + 'immich_exporter_collection_duration_seconds{collection="inventory"} 0.5\n'
    'immich_exporter_collection_duration_seconds{collection="files"} 2.0\n'
    + LAST_HELP + 'immich_exporter_collection_last_success_timestamp_seconds{collection="inventory"} 110.0\n'
    'immich_exporter_collection_last_success_timestamp_seconds{collection="files"} 120.0\n'
)
INVENTORY_DATA = THUMBHASH_HELP + "immich_assets_thumbhash_missing 3.0\n"
AGE_DATA = """\
# HELP immich_queue_oldest_job_age_seconds Age of the oldest waiting or active job at scrape time.
# TYPE immich_queue_oldest_job_age_seconds gauge
immich_queue_oldest_job_age_seconds{queue="thumbnailGeneration",state="waiting"} {age}
"""


def age(now: float) -> str:
    return AGE_DATA.replace("{age}", str(now - 40.0))


CASES: list[tuple[str, Callable[[Store, Clock], None], bool, str]] = [
    ("nothing-yet", nothing_yet, False,
     HEAD + SOURCES_HELP + 'immich_exporter_source_up{source="postgres"} 0.0\n'
     'immich_exporter_source_up{source="filesystem"} 0.0\n' + SUCCESS_HELP + DURATION_HELP + LAST_HELP),
    # Two collections feed one family: one HELP, the samples of both, in collection order.
    ("both-up", both_up, True,
     HEAD + UP_UP + META_BOTH + MISSING_HELP
     + 'immich_asset_files_missing{kind="thumbnail",reason="no_record"} 2.0\n'
     'immich_asset_files_missing{kind="thumbnail",reason="file_missing"} 5.0\n'
     + INVENTORY_DATA + age(130.0)),
    # The failed round: success 0, its duration, the last success kept; its series gone with the disk.
    ("disk-down", disk_down, True,
     HEAD + SOURCES_HELP + 'immich_exporter_source_up{source="postgres"} 1.0\n'
     'immich_exporter_source_up{source="filesystem"} 0.0\n'
     + SUCCESS_HELP + 'immich_exporter_collection_success{collection="inventory"} 1.0\n'
     'immich_exporter_collection_success{collection="files"} 0.0\n'
     + DURATION_HELP + 'immich_exporter_collection_duration_seconds{collection="inventory"} 0.5\n'
     'immich_exporter_collection_duration_seconds{collection="files"} 1.0\n'
     + LAST_HELP + 'immich_exporter_collection_last_success_timestamp_seconds{collection="inventory"} 110.0\n'
     'immich_exporter_collection_last_success_timestamp_seconds{collection="files"} 120.0\n'
     + MISSING_HELP + 'immich_asset_files_missing{kind="thumbnail",reason="no_record"} 2.0\n'
     + INVENTORY_DATA + age(130.0)),
    ("back-after-the-round", back_after_the_round, True,
     HEAD + UP_UP + META_BOTH + MISSING_HELP
     + 'immich_asset_files_missing{kind="thumbnail",reason="no_record"} 2.0\n' + INVENTORY_DATA + age(150.0)),
    # PostgreSQL down: every series that needs it vanishes, the exporter's own stay.
    ("database-down", database_down, True,
     HEAD + SOURCES_HELP + 'immich_exporter_source_up{source="postgres"} 0.0\n'
     'immich_exporter_source_up{source="filesystem"} 1.0\n' + META_BOTH),
]


@pytest.mark.parametrize(("build", "ready", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_store_renders(clock: Clock, build: Callable[[Store, Clock], None], ready: bool, expected: str) -> None:
    store = Store(["inventory", "files"], ["postgres", "filesystem"])
    build(store, clock)
    assert store.ready is ready
    assert render_store(store) == expected


def test_recovery_wakes_listeners_once(clock: Clock) -> None:
    store = Store(["files"], ["postgres", "filesystem"])
    woken: list[str] = []
    store.on_recover(woken.append)
    store.set_source("filesystem", True)
    store.set_source("filesystem", True)  # no change, no second wake-up
    store.set_source("filesystem", False, "gone")
    store.set_source("filesystem", True)
    store.set_source("redis", True)  # not a source of this store: ignored
    assert woken == ["filesystem", "filesystem"]
    assert "redis" not in store.sources
