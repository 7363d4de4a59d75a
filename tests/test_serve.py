"""``serve`` as a real process: flags, a quiet log, and a clean exit on SIGTERM within seconds."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from immich_thumbnail_exporter.demo.embedded import free_port
from tests.conftest import Immich

# The promise (issue 20): serve exits within 10 seconds of SIGTERM, whatever it was doing.
SIGTERM_DEADLINE = 10.0


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def _wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "exited"
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


@pytest.mark.asyncio
async def test_serve_process_sigterm(immich_factory: Any) -> None:
    imm: Immich = await immich_factory("v1.136+")
    await asyncio.to_thread(_serve_and_stop, imm)


def _serve_and_stop(imm: Immich) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    env.update(imm.env())
    proc = subprocess.Popen(
        [sys.executable, "-m", "immich_thumbnail_exporter", "--web.listen-address", f"127.0.0.1:{port}",
         "--media.root", imm.media],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/healthz", proc)
        deadline = time.monotonic() + 30
        while _get_status(f"{base}/readyz") != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.2)
        for _ in range(20):  # scrapes are not logged: the server is quiet
            status, body = _get(f"{base}/metrics")
            assert status == 200 and "immich_assets{" in body
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(SIGTERM_DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running {SIGTERM_DEADLINE:.0f}s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert code == 0, stderr
    assert "listening on http://127.0.0.1:" in stderr
    assert "shutting down" in stderr
    assert "GET /metrics" not in stderr
    assert "Traceback" not in stderr


def _get_status(url: str) -> int:
    try:
        return _get(url)[0]
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_listen_address_in_use() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "immich_thumbnail_exporter", "serve", "--web.listen-address", f"127.0.0.1:{port}"],
            env={**os.environ, "DB_HOSTNAME": "127.0.0.1", "DB_PORT": str(free_port())},
            capture_output=True, text=True, timeout=30,
        )
    assert res.returncode == 2
    assert "cannot listen on" in res.stderr and "Traceback" not in res.stderr


def test_bad_listen_address() -> None:
    res = subprocess.run([sys.executable, "-m", "immich_thumbnail_exporter", "--web.listen-address", "nonsense"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "--web.listen-address: expected host:port" in res.stderr


def test_version_flag() -> None:
    from immich_thumbnail_exporter import __version__

    res = subprocess.run([sys.executable, "-m", "immich_thumbnail_exporter", "--version"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and __version__ in res.stdout
