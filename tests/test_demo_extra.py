"""``demo`` without the demo extra: one line saying how to install it, exit 2, no traceback; and the
simulated Immich's modules import without bullmq (it is needed only once one is started)."""

from __future__ import annotations

import os
import subprocess
import sys

# Makes bullmq unimportable (as in an install without the [demo] extra), then runs the CLI.
WRAPPER = """
import sys
sys.modules["bullmq"] = None
{body}
"""


def _run(body: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "REDIS_", "IMMICH_"))}
    return subprocess.run([sys.executable, "-c", WRAPPER.format(body=body), *args], capture_output=True, text=True,
                          timeout=60, env=env, check=False)


def test_demo_without_bullmq_says_how_to_install_it() -> None:
    proc = _run("from immich_thumbnail_exporter.cli.main import main\nsys.exit(main(sys.argv[1:]))", "demo")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: the demo needs the demo extra: pip install 'immich-thumbnail-exporter[demo]'"]


def test_simulation_modules_import_without_bullmq() -> None:
    proc = _run("import immich_thumbnail_exporter.demo.simulation.api\n"
                "import immich_thumbnail_exporter.demo.simulation.worker\n"
                "import immich_thumbnail_exporter.demo.run\n"
                "try:\n"
                "    immich_thumbnail_exporter.demo.simulation.api.SimulatedApi(None, 'redis://127.0.0.1:1', {})\n"
                "except ImportError:\n"
                "    print('needs bullmq')\n")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "needs bullmq\n", "")
