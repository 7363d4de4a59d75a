"""The unit tier: made-up data, no servers, seconds in all (``make check``).

The server fixtures of ``tests/conftest.py`` are replaced here by ones that fail at once: a test that
needs PostgreSQL, Valkey or a seeded Immich belongs beside the server tests, not in this folder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def _no_server(name: str) -> Callable[[], Any]:
    @pytest.fixture(name=name)
    def refuse() -> Any:
        pytest.fail(f"tests/unit/ starts no servers: move this test out of tests/unit/ to use {name!r}",
                    pytrace=False)

    return refuse


postgres = _no_server("postgres")
valkey_server = _no_server("valkey_server")
valkey = _no_server("valkey")
immich_factory = _no_server("immich_factory")

