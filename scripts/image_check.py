"""Build the container image and run it as the manifests do: ``make image-check``.

Checks, with podman (or docker): ``--help``; the image's user is 10001, not root; ``check-config`` with
no database exits 2 with one line; ``demo`` (whose extra the image does not have) exits 2 with one line;
``serve`` with deploy/compose's hardening (read-only root, no capabilities, no new privileges, the media
folder read-only) against a seeded PostgreSQL and Valkey from the demo's embedded servers, until
``/readyz``, with every source up and the seeded counts on ``/metrics``, then a clean stop on SIGTERM.

With no registry in reach, ``--stand-in-base`` first makes a local ``python:3.11-slim`` from Debian's
packages (debootstrap, as root), so that the Dockerfile itself is built unmodified. Needs the project's
``[demo]`` extra for the embedded servers (``make image-check`` installs the test extra).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from immich_thumbnail_exporter.demo.embedded import EmbeddedPostgres, EmbeddedValkey, free_port
from immich_thumbnail_exporter.demo.seed import Expected, Plan, create_database, seed

ROOT = Path(__file__).resolve().parent.parent
BASE = "docker.io/library/python:3.11-slim"
TAG = "localhost/immich-thumbnail-exporter:image-check"
NOT_CONFIGURED = (
    "error: database: not configured; set it in the database section of the configuration file (--config.file), "
    "or with Immich's variables DB_URL or DB_HOSTNAME (and DB_PORT, DB_USERNAME, DB_PASSWORD, DB_DATABASE_NAME)"
)
NO_DEMO_EXTRA = (
    "error: the demo needs the [demo] extra (bullmq is not installed): pip install 'immich-thumbnail-exporter[demo]'"
)
# deploy/compose/docker-compose.yml's hardening, as `run` flags.
HARDENED = ("--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
# Where the default OCI runtime cannot start a container (crun on a cgroup v1/v2 hybrid; a sandbox that
# refuses podman's default rlimits), these make podman start one; said when used.
FALLBACK_GLOBAL = ("--runtime", "runc")
FALLBACK_RUN = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")


class Failed(Exception):
    pass


class Engine:
    def __init__(self, exe: str) -> None:
        self.exe = exe
        self.podman = Path(exe).name == "podman"
        self.global_flags: tuple[str, ...] = ()
        self.run_flags: tuple[str, ...] = ("--no-healthcheck",) if self.podman else ()

    def cmd(self, *args: str) -> list[str]:
        return [self.exe, *self.global_flags, *args]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd("run", "--rm", *self.run_flags, *args), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def probe(self) -> None:
        """Start a trivial container of the base image (which the build runs its steps in too); fall back
        to runc and lower rlimits where the defaults cannot."""
        if self.run("--entrypoint", "true", BASE).returncode == 0:
            return
        if not self.podman:
            raise Failed(f"{self.exe} cannot start a container: {self.run('--entrypoint', 'true', BASE).stderr}")
        self.global_flags, self.run_flags = FALLBACK_GLOBAL, (*self.run_flags, *FALLBACK_RUN)
        res = self.run("--entrypoint", "true", BASE)
        if res.returncode != 0:
            raise Failed(f"podman cannot start a container, even with {' '.join(FALLBACK_GLOBAL + FALLBACK_RUN)}: "
                         f"{res.stderr.strip()}")
        print(f"note: podman needed {' '.join(FALLBACK_GLOBAL + FALLBACK_RUN)} to start containers here")


def step(name: str) -> None:
    print(f"-- {name}", flush=True)


def expect(ok: bool, what: str, detail: str = "") -> None:
    if not ok:
        raise Failed(f"{what}{': ' + detail if detail else ''}")
    print(f"   ok: {what}")


def make_stand_in_base(engine: Engine) -> None:
    """A Debian bookworm userland with python3.11, venv and pip, imported as ``python:3.11-slim``."""
    if subprocess.run(engine.cmd("image", "exists" if engine.podman else "inspect", BASE),
                      capture_output=True, check=False).returncode == 0:
        return
    step(f"stand-in {BASE} from Debian packages (debootstrap)")
    if shutil.which("debootstrap") is None:
        raise Failed("debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="image-check-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase",
                        "--include=python3,python3-venv,python3-pip,ca-certificates,python-is-python3",
                        "bookworm", str(rootfs), "http://deb.debian.org/debian"],
                       check=True, stdout=subprocess.DEVNULL)
        # pip inside the build reaches the index as this machine's pip does (same CA bundle).
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
        (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], check=True)
        subprocess.run(engine.cmd("import", "--change", 'CMD ["python3"]', str(tarball), BASE),
                       check=True, stdout=subprocess.DEVNULL)


def build(engine: Engine) -> None:
    step(f"build {TAG} from {ROOT / 'Dockerfile'}")
    args = ["build", "-t", TAG]
    if engine.podman:
        # docker format keeps the HEALTHCHECK (OCI images have none); host network for pip in RUN steps.
        args += ["--format", "docker", "--network", "host"]
    res = subprocess.run(engine.cmd(*args, str(ROOT)), capture_output=True, text=True, check=False)
    expect(res.returncode == 0, "the Dockerfile builds", res.stdout[-3000:] + res.stderr[-3000:])
    warnings = [line for line in (res.stdout + res.stderr).splitlines() if "warn" in line.lower()]
    expect(warnings == [], "no warning while building", "\n".join(warnings))


def one_shot_commands(engine: Engine) -> None:
    step("one-shot commands")
    res = engine.run(TAG, "--help")
    expect(res.returncode == 0 and res.stdout.startswith("usage: immich-thumbnail-exporter"), "--help", res.stderr)
    res = engine.run("--entrypoint", "id", TAG, "-u")
    expect(res.stdout.strip() == "10001", "runs as uid 10001, not root", res.stdout + res.stderr)
    res = engine.run(TAG, "check-config")
    expect(res.returncode == 2 and res.stderr.splitlines() == [NOT_CONFIGURED],
           "check-config with no database: exit 2, one line", f"exit {res.returncode}\n{res.stderr}")
    res = engine.run(TAG, "demo")
    expect(res.returncode == 2 and res.stderr.splitlines() == [NO_DEMO_EXTRA],
           "demo without its extra: exit 2, one line", f"exit {res.returncode}\n{res.stderr}")


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def gauges(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def serve(engine: Engine, workdir: Path) -> None:
    step("serve, hardened as deploy/compose runs it, on a seeded PostgreSQL and Valkey")
    pg, vk = EmbeddedPostgres(workdir / "postgres"), EmbeddedValkey()
    name = f"image-check-{os.getpid()}"
    try:
        pg.start()
        vk.start()
        asyncio.run(create_database(pg.dsn, "immich"))
        media = workdir / "media"
        expected: Expected = asyncio.run(seed(pg.dsn_for("immich"), str(media), "v1.136+", Plan(assets=60)))
        # Immich writes its media world-readable; uid 10001 must get through the folders above it too.
        for folder in (workdir, media):
            folder.chmod(0o755)
        port = free_port()
        res = subprocess.run(engine.cmd(
            "run", "-d", "--name", name, *engine.run_flags, *HARDENED, "--network", "host",
            "-v", f"{media}:/data:ro", "-e", f"DB_URL={pg.dsn_for('immich')}", "-e", f"REDIS_URL={vk.url}",
            "-e", "IMMICH_MEDIA_ROOT=/data", TAG, "serve", f"--web.listen-address=127.0.0.1:{port}",
        ), capture_output=True, text=True, check=False)
        expect(res.returncode == 0, "the container starts", res.stderr)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while fetch(f"{base}/readyz")[0] != 200:
            if time.monotonic() > deadline:
                logs = subprocess.run(engine.cmd("logs", name), capture_output=True, text=True, check=False)
                raise Failed(f"/readyz not 200 within 120 s\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
            time.sleep(0.5)
        expect(fetch(f"{base}/healthz")[0] == 200, "/healthz and /readyz answer 200")
        status, text = fetch(f"{base}/metrics")
        expect(status == 200, "/metrics answers 200")
        got = gauges(text)
        for source in ("postgres", "redis", "filesystem"):
            up = got.get(("immich_exporter_source_up", (("source", source),)))
            expect(up == 1, f"source {source} is up", str(up))
        for asset_type, count in expected.assets.items():
            value = got.get(("immich_assets", (("asset_type", asset_type),)))
            expect(value == count, f"immich_assets{{asset_type={asset_type!r}}} is the seeded {count}", str(value))
        for kind, count in expected.files.items():
            value = got.get(("immich_thumbnail_files", (("kind", kind),)))
            expect(value == count, f"immich_thumbnail_files{{kind={kind!r}}} is the {count} files on disk", str(value))
        res = subprocess.run(engine.cmd("stop", "-t", "20", name), capture_output=True, text=True, check=False)
        code = subprocess.run(engine.cmd("inspect", "-f", "{{.State.ExitCode}}", name),
                              capture_output=True, text=True, check=False).stdout.strip()
        expect(res.returncode == 0 and code == "0", "stops cleanly on SIGTERM (exit 0)", f"exit {code} {res.stderr}")
    finally:
        subprocess.run(engine.cmd("rm", "-f", name), capture_output=True, check=False)
        pg.cleanup()
        vk.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default=shutil.which("podman") or shutil.which("docker") or "",
                        help="podman or docker (default: podman where installed)")
    parser.add_argument("--stand-in-base", action="store_true",
                        help=f"make a local {BASE} from Debian packages when it is not there (needs root)")
    args = parser.parse_args(argv)
    if not args.engine:
        print("error: neither podman nor docker is installed (apt-get install podman)", file=sys.stderr)
        return 2
    engine = Engine(args.engine)
    try:
        if args.stand_in_base:
            make_stand_in_base(engine)
        engine.probe()
        build(engine)
        one_shot_commands(engine)
        with tempfile.TemporaryDirectory(prefix="image-check-") as tmp:
            serve(engine, Path(tmp))
    except (Failed, subprocess.CalledProcessError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("image check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
