"""What an API key may do per Immich release (sources/immich_access.py), from made-up keys: a table test,
and the exporter's table checked against the simulated Immich's (demo/simulation/releases.py)."""

from __future__ import annotations

import pytest

from immich_thumbnail_exporter.demo.simulation.releases import RELEASES, granted, release_for, required, routes
from immich_thumbnail_exporter.sources.immich_access import FACES, QUEUE_FALLBACK, REGENERATION, allowed

V1_132, V1_135, V1_137, V2_4, V2_7, V3_1, V3_2 = (1, 132, 3), (1, 135, 3), (1, 137, 3), (2, 4, 1), (2, 7, 5), \
    (3, 1, 0), (3, 2, 0)


@pytest.mark.parametrize(("version", "permissions", "admin", "feature", "expected", "missing"), [
    # regeneration: any key before v1.136; "all" from v1.136 to v3.1; job.create from v3.2
    (V1_132, None, None, REGENERATION, True, None),
    (V1_135, ("asset.read",), False, REGENERATION, True, None),
    (V1_137, ("job.create", "asset.update"), True, REGENERATION, False, "all"),
    (V2_4, ("all",), False, REGENERATION, True, None),
    (V2_7, ("job.create",), False, REGENERATION, False, "all"),
    (V3_1, ("job.create",), False, REGENERATION, False, "all"),
    (V3_1, None, None, REGENERATION, None, None),
    (V3_2, ("job.create",), False, REGENERATION, True, None),
    (V3_2, ("asset.update", "job.read"), False, REGENERATION, False, "job.create"),
    # face thumbnails: person.update everywhere; unknown where the key cannot read its permissions
    (V1_135, None, True, FACES, None, None),
    (V2_4, ("person.update",), False, FACES, True, None),
    (V3_2, ("person.read", "asset.read"), False, FACES, False, "person.update"),
    # queue fallback: admin-only; GET /api/jobs declares nothing before v1.136, job.read from v1.137,
    # GET /api/queues (queue.read) from v2.4
    (V1_132, None, True, QUEUE_FALLBACK, True, None),
    (V1_132, None, False, QUEUE_FALLBACK, False, "admin"),
    (V1_135, None, None, QUEUE_FALLBACK, None, None),
    (V1_137, ("job.read",), True, QUEUE_FALLBACK, True, None),
    (V2_4, ("job.read",), True, QUEUE_FALLBACK, False, "queue.read"),
    (V2_4, ("queue.read",), False, QUEUE_FALLBACK, False, "admin"),
    (V3_2, ("queue.read",), None, QUEUE_FALLBACK, None, None),
    (V3_2, ("all",), True, QUEUE_FALLBACK, True, None),
])
def test_allowed(version: tuple[int, int, int], permissions: tuple[str, ...] | None, admin: bool | None,
                 feature: str, expected: bool | None, missing: str | None) -> None:
    found = next(f for f in allowed(version, permissions, admin) if f.name == feature)
    assert (found.allowed, found.missing) == (expected, missing)
    assert found.line.startswith(f"{feature}: ")
    if missing and missing != "admin":
        assert f"lacks permission {missing}" in found.line
    assert "v{}.{}.{}".format(*version) in found.line


def test_one_line_per_feature() -> None:
    assert [f.name for f in allowed(V3_2, ("all",), True)] == [REGENERATION, FACES, QUEUE_FALLBACK]


def test_exporter_table_agrees_with_the_simulation() -> None:
    for rel in RELEASES:
        by_name = {r.name: r for r in routes(rel)}
        queue_route = by_name["queues"] if rel.queues_route else by_name["jobs"]
        for perms in (("all",), ("job.create",), ("asset.update",), ("queue.read",), ("job.read",),
                      ("person.update",), ()):
            features = {f.name: f for f in allowed(rel.version, perms, True)}
            assert features[REGENERATION].allowed is granted(perms, required(rel, by_name["asset_jobs"])), rel.tag
            assert features[FACES].allowed is granted(perms, required(rel, by_name["person_update"])), rel.tag
            assert features[QUEUE_FALLBACK].allowed is granted(perms, required(rel, queue_route)), (rel.tag, perms)


def test_release_table_has_the_sdk_queue_counts() -> None:
    # SDK QueueName: 17 in 2.4.0, 18 in 2.7.5 (editor), 19 from 3.0 (integrityCheck); 15 before 2.4.
    assert {r.tag: len(r.queues) for r in RELEASES} == {
        "v1.132.3": 15, "v1.135.3": 15, "v1.136.0": 15, "v1.137.3": 15, "v2.4.1": 17, "v2.7.5": 18,
        "v3.0.0": 19, "v3.1.0": 19, "v3.2.2": 19}


@pytest.mark.parametrize(("asked", "tag"), [
    ("v1.132", "v1.132.3"), ((1, 136, 0), "v1.136.0"), ((1, 135, 9), "v1.135.3"), ("2.5.0", "v2.4.1"),
    ("v3.2.0-rc.1", "v3.2.2"), ((1, 137, 3), "v1.137.3"),
])
def test_release_for(asked: str | tuple[int, int, int], tag: str) -> None:
    assert release_for(asked).tag == tag
