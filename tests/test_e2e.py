"""End to end through a real Prometheus and a real Alertmanager (Debian's packages).

A running exporter watches a seeded post-restore Immich whose thumbnail jobs sit in Valkey with no
worker. Prometheus scrapes it every second and evaluates the shipped rules (with their windows and
`for:` durations shortened for the test only); Alertmanager sends to a webhook in this test. We check
that every dashboard panel's query returns data, that the paging alert fires and reaches the webhook,
and that fixing the queue (a worker drains it) resolves the alert. The capacity panels that need
thumbnails being written (throughput, ETA, job run time) are checked once that worker writes them; the
time-to-full panel needs a filesystem that fills: a small tmpfs mounted as encoded-video/ (root only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web

from immich_thumbnail_exporter.demo.embedded import free_port
from immich_thumbnail_exporter.demo.simulation.api import ApiKey, SimulatedApi
from immich_thumbnail_exporter.demo.simulation.worker import SimulatedWorker
from tests.artefact_metrics import dashboard_expressions
from tests.conftest import ROOT, Immich, wait_for
from tests.helpers import running_exporter

pytestmark = [pytest.mark.asyncio, pytest.mark.e2e, pytest.mark.timeout(420)]

RULES = ROOT / "alerts" / "immich-thumbnails.rules.yml"
PREFIX = "immich_bull"
THUMBS = "thumbnailGeneration"
JOB_OPTS: dict[str, Any] = {"attempts": 3, "removeOnComplete": True, "removeOnFail": False}
PAGING = "ImmichThumbnailRegenerationStuck"


def needs_writing(expr: str) -> bool:
    """Dashboard queries that only have data while thumbnail jobs are being written and verified."""
    thumbnail_runs = "immich_job_run_seconds_bucket" in expr and 'queue="thumbnailGeneration"' in expr
    return 'result="written"' in expr or thumbnail_runs


@contextlib.asynccontextmanager
async def filling_tmpfs(path: Path, size_mb: int = 64) -> AsyncIterator[Path]:
    """A small filesystem the test keeps writing to, so its free space shrinks (time to full)."""
    if os.geteuid() != 0:
        raise AssertionError("the end-to-end test mounts a tmpfs (the time-to-full panel): run it as root")
    await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(
        subprocess.run, ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
    stop = asyncio.Event()

    async def fill(chunk: int = 128 << 10, limit: int = (size_mb - 16) << 20) -> None:
        def append() -> None:
            with open(path / "growing.mp4", "ab") as out:
                out.write(os.urandom(chunk))

        written = 0
        while not stop.is_set() and written < limit:
            await asyncio.to_thread(append)
            written += chunk
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    filler = asyncio.create_task(fill())
    try:
        yield path
    finally:
        stop.set()
        await asyncio.wait_for(filler, 10)
        await asyncio.to_thread(subprocess.run, ["umount", str(path)], check=False)


def binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(f"{names[0]} is missing: run ./scripts/install-system-deps.sh (Debian packages)")


def short_rules(text: str) -> str:
    """The shipped rules with test-sized windows: minutes become seconds, the 15-minute age threshold
    becomes 5 seconds. Only durations and that threshold change; every expression keeps its shape."""
    doc = yaml.safe_load(text)
    changed = 0
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "3s"
            expr = str(rule["expr"])
            new = re.sub(r"\[(\d+)[mh]\]", "[30s]", expr)
            new = new.replace("_age_seconds{queue=\"thumbnailGeneration\",state=\"waiting\"} > 900",
                              "_age_seconds{queue=\"thumbnailGeneration\",state=\"waiting\"} > 5")
            if new != expr:
                changed += 1
            rule["expr"] = new
    assert changed, "the rule transform changed nothing: has the rules file changed shape?"
    stuck = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == PAGING)
    assert "> 5" in stuck["expr"], "the paging rule's age threshold was not shortened"
    return yaml.safe_dump(doc)


class Daemon:
    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="immich-e2e-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Webhook:
    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.Response:
        doc = await request.json()
        for alert in doc.get("alerts", []):
            self.alerts.append(alert)
        return web.Response(text="ok")

    def seen(self, name: str, status: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts if a["labels"].get("alertname") == name and a["status"] == status]


@pytest_asyncio.fixture
async def webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()
    app = web.Application()
    app.router.add_post("/alerts", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", hook.port)
    await site.start()
    yield hook
    await runner.cleanup()


async def prom_query(session: aiohttp.ClientSession, base: str, expr: str) -> list[Any]:
    async with session.get(f"{base}/api/v1/query", params={"query": expr}) as resp:
        doc = await resp.json()
    assert doc["status"] == "success", (expr, doc)
    return list(doc["data"]["result"])


async def test_prometheus_alertmanager_end_to_end(
    immich_factory: Any, valkey: Any, webhook: Webhook, workdir: Path
) -> None:
    from bullmq import Queue, Worker

    # Immich's real v3.1.0 schema, so that the integrity report's panels have a table to show.
    imm: Immich = await immich_factory("v3.1.0")
    redis_url = valkey.url

    # Regeneration accepted, then nothing: thumbnail jobs wait with no worker; two name assets the
    # restored database no longer has (the "not found" noise that must not page).
    queue = Queue(THUMBS, {"prefix": PREFIX, "connection": redis_url})
    for asset_id in [*sorted(imm.expected.problem_asset_ids)[:3], str(uuid.uuid4()), str(uuid.uuid4())]:
        await queue.add("AssetGenerateThumbnails", {"id": asset_id}, JOB_OPTS)

    import asyncpg

    conn = await asyncpg.connect(imm.dsn)
    owner = str(await conn.fetchval('SELECT "ownerId" FROM asset ORDER BY id LIMIT 1'))
    # Entries as Immich v3's integrity check writes them: a missing preview, an untracked file.
    await conn.execute("""INSERT INTO integrity_report (type, path, "fileAssetId")
        SELECT 'missing_file', path, id FROM asset_file WHERE type = 'preview' ORDER BY path LIMIT 1""")
    await conn.execute("INSERT INTO integrity_report (type, path) VALUES ('untracked_file', '/data/thumbs/x.webp')")
    await conn.close()
    # The one simulated Immich, as v3.1.0 answers: the key is the owner's, whose assets it may regenerate.
    api = SimulatedApi(imm.dsn, redis_url, {"test-key": ApiKey(owner)}, release="v3.1.0")
    await api.start()
    try:
        key_file = workdir / "api-key"
        key_file.write_text("test-key")
        overrides = {
            "media.root": imm.media,
            "redis.url": redis_url,
            "immich.url": api.url,
            "immich.api_key": str(key_file.read_text()),
            "checks.verify_headers": True,
            "checks.check_originals": True,
            # Queue rounds get a deadline below their interval; 3s leaves room on a busy 2-core CI machine.
            "intervals.queues": "3s",
            "intervals.inventory": "2s",
            "intervals.files": "3s",
            "remediation.enabled": True,
            "remediation.max_per_round": 2,
            "remediation.interval": "2s",
            "remediation.verify_after": "2s",
            "remediation.state_dir": str(workdir / "state"),
        }
        # A worker on another queue gives the job counters and histograms real samples.
        meta = Queue("metadataExtraction", {"prefix": PREFIX, "connection": redis_url})

        async def extract(job: Any, token: str) -> str:
            await asyncio.sleep(0.05)
            if job.data.get("n") == 0:
                raise RuntimeError("exiftool failed")  # a thrown error: outcome "error"
            return "success"

        meta_worker = Worker("metadataExtraction", extract, {"prefix": PREFIX, "connection": redis_url})
        # The queue exists before the exporter starts, as Immich's do (queues are discovered every few minutes).
        await meta.add("AssetExtractMetadata", {"id": str(uuid.uuid4()), "n": -1}, JOB_OPTS)
        async with filling_tmpfs(Path(imm.media) / "encoded-video"), \
                running_exporter(overrides, env=imm.env()) as (exporter, url):
            instance = url.removeprefix("http://")
            # Event counting starts at the stream's end when the queue collection first runs.
            await wait_for(lambda: exporter.store.result("queues") is not None, timeout=30)
            for i in range(5):
                await meta.add("AssetExtractMetadata", {"id": str(uuid.uuid4()), "n": i}, JOB_OPTS)

            am_port, prom_port = free_port(), free_port()
            (workdir / "am.yml").write_text(yaml.safe_dump({
                "route": {"receiver": "test", "group_by": ["alertname"], "group_wait": "1s",
                          "group_interval": "1s", "repeat_interval": "1h"},
                "receivers": [{"name": "test", "webhook_configs": [
                    {"url": f"http://127.0.0.1:{webhook.port}/alerts", "send_resolved": True}]}],
            }))
            (workdir / "rules.yml").write_text(short_rules(RULES.read_text()))
            (workdir / "prom.yml").write_text(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(workdir / "rules.yml")],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                "scrape_configs": [{"job_name": "immich-thumbnail-exporter",
                                    "static_configs": [{"targets": [instance]}]}],
            }))
            am = Daemon([binary("prometheus-alertmanager", "alertmanager"),
                         f"--config.file={workdir / 'am.yml'}", f"--storage.path={workdir / 'am-data'}",
                         f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
                        workdir / "am.log")
            prom = Daemon([binary("prometheus"), f"--config.file={workdir / 'prom.yml'}",
                           f"--storage.tsdb.path={workdir / 'prom-data'}",
                           f"--web.listen-address=127.0.0.1:{prom_port}"], workdir / "prom.log")
            am.start()
            prom.start()
            base = f"http://127.0.0.1:{prom_port}"
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

                    async def target_up() -> bool:
                        try:
                            result = await prom_query(session, base, 'up{job="immich-thumbnail-exporter"} == 1')
                        except (aiohttp.ClientError, AssertionError):
                            return False
                        return bool(result)

                    await wait_for(target_up, timeout=60, interval=0.5)

                    # Every dashboard panel's query returns data through Prometheus' HTTP API.
                    queries = []
                    for expr in dashboard_expressions():
                        for var, val in {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m",
                                         "$instance": instance, "$queue": ".+"}.items():
                            expr = expr.replace(var, val)
                        queries.append(expr)
                    later = [q for q in queries if needs_writing(q)]
                    queries = [q for q in queries if not needs_writing(q)]
                    assert later, "no capacity query waits for written thumbnails: has the dashboard changed?"
                    empty: list[str] = []

                    async def all_answer(queries: list[str] = queries) -> bool:
                        empty.clear()
                        for q in queries:
                            if not await prom_query(session, base, q):
                                empty.append(q)
                        return not empty

                    try:
                        await wait_for(all_answer, timeout=90, interval=2)
                    except AssertionError:
                        raise AssertionError("dashboard queries without data:\n" + "\n".join(empty)) from None

                    # The paging alert fires and reaches Alertmanager's webhook; the orphans page nothing.
                    await wait_for(lambda: webhook.seen(PAGING, "firing"), timeout=90, interval=0.5)
                    firing = webhook.seen(PAGING, "firing")[0]
                    assert firing["labels"]["severity"] == "critical"
                    assert firing["annotations"]["runbook_url"].endswith("#immichthumbnailregenerationstuck")
                    for alert in webhook.alerts:
                        if alert["labels"].get("alertname") == "ImmichQueueOrphanedJobs":
                            assert alert["labels"]["severity"] == "info"
                    # Remediation (opt-in) asked Immich's (fake) API to regenerate, and counted it.
                    await wait_for(lambda: api.accepted >= 1, timeout=60, interval=0.5)
                    await wait_for(lambda: prom_query(
                        session, base, 'immich_regeneration_requests_total{result="accepted"} > 0'), timeout=60)

                    # Fix it: a worker (the simulated Immich's: it writes the files) takes the thumbnail
                    # queue and drains it. The alert resolves.
                    thumb_worker = SimulatedWorker(imm.dsn, imm.media, redis_url, delay=0.05)
                    await thumb_worker.start()
                    try:
                        await wait_for(lambda: webhook.seen(PAGING, "resolved"), timeout=120, interval=0.5)
                        # Throughput, ETA and run time need thumbnails being written: keep asking for
                        # healthy assets' thumbnails (each verified written) until those panels answer.
                        healthy = [a for a in imm.expected.asset_ids if a not in imm.expected.problem_asset_ids]
                        stop_feed = asyncio.Event()

                        async def feed() -> None:
                            i = 0
                            while not stop_feed.is_set():
                                await queue.add("AssetGenerateThumbnails", {"id": healthy[i % len(healthy)]}, JOB_OPTS)
                                i += 1
                                with contextlib.suppress(TimeoutError):
                                    await asyncio.wait_for(stop_feed.wait(), 0.3)

                        feeder = asyncio.create_task(feed())
                        try:
                            await wait_for(lambda: all_answer(later), timeout=90, interval=2)
                        except AssertionError:
                            raise AssertionError("capacity queries without data while thumbnails are written:\n"
                                                 + "\n".join(empty)) from None
                        finally:
                            stop_feed.set()
                            await asyncio.wait_for(feeder, 15)
                    finally:
                        await thumb_worker.stop()
            except BaseException:
                for name in exporter.store.collections:
                    res = exporter.store.result(name)
                    detail = res.error if res else ""
                    print(f"--- collection {name}: {res.error if res else 'not run'} {detail}")
                print({s: (st.up, st.error) for s, st in exporter.store.sources.items()})
                from tests.helpers import fetch as _fetch

                _, text, _ = await _fetch(f"{url}/metrics")
                print("\n".join(line for line in text.splitlines() if "immich_job" in line)[:3000])
                print("--- prometheus\n" + prom.tail() + "\n--- alertmanager\n" + am.tail())
                print(json.dumps(webhook.alerts, indent=1)[:4000])
                raise
            finally:
                prom.stop()
                am.stop()
                await asyncio.wait_for(meta_worker.close(), 15)
                await asyncio.wait_for(meta.close(), 10)
                await asyncio.wait_for(queue.close(), 10)
    finally:
        await api.stop()
