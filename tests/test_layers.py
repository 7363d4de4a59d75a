"""The package's layers, as the README's Architecture section draws them, checked on every import.

Data flows one way: sources return plain data, scan and remediation work on it, collectors turn it into
metric families, the store holds them, exposition and reports render them. A module that imports from a
layer below its own (a source building metric families, the store reaching into a collection) fails here
with the file, the line and the rule it breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "immich_thumbnail_exporter"
ROOT = Path(__file__).resolve().parent.parent / "exporter" / PACKAGE

# Usable from anywhere: plain words, plain data, settings, logging, metric definitions and the store's parts.
BASE = frozenset({"__init__", "vocabulary", "findings", "logs", "config", "metrics", "store", "timing"})
# What each layer may import besides BASE and its own folder.
# Every module may read the package's ``__version__`` (``__init__``).
ALLOWED: dict[str, frozenset[str]] = {
    "vocabulary": frozenset({"__init__"}),
    "findings": frozenset({"__init__", "vocabulary"}),
    "timing": frozenset({"__init__"}),
    "metrics": frozenset({"__init__", "vocabulary"}),
    "store": frozenset({"__init__", "vocabulary", "metrics"}),
    "logs": frozenset({"__init__"}),
    "config": frozenset({"__init__", "vocabulary"}),
    "sources": BASE,
    "scan": BASE | {"sources"},
    "remediation": BASE | {"sources", "scan"},
    "collectors": BASE | {"sources", "scan", "remediation"},
    "exposition": BASE | {"scan.run", "remediation"},
    "output": BASE | {"scan.run", "remediation"},
    "runtime": BASE | {"sources", "scan", "remediation", "collectors", "exposition"},
    "app": BASE | {"sources", "scan", "remediation", "collectors", "exposition", "runtime"},
    "cli": BASE | {"sources", "scan", "remediation", "collectors", "exposition", "output", "runtime", "app",
                   "__main__"},
    "__main__": frozenset({"__init__", "cli"}),
    "__init__": frozenset(),
}
# The one command that starts the demo may import it; nothing else that ships in serve or scan does.
DEMO_ENTRY = "cli/demo.py"


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _is_module(name: str) -> bool:
    return (ROOT / f"{name}.py").is_file() or (ROOT / name).is_dir()


def imports(path: Path) -> list[tuple[int, str]]:
    """Every ``immich_thumbnail_exporter.X`` this file imports (at any depth, lazily or not), as ``X``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == PACKAGE:
                # ``from immich_thumbnail_exporter import __version__`` is the package's own __init__.
                found.extend((node.lineno, a.name if _is_module(a.name) else "__init__") for a in node.names)
            elif node.module.startswith(PACKAGE + "."):
                found.append((node.lineno, node.module.removeprefix(PACKAGE + ".")))
        elif isinstance(node, ast.Import):
            found.extend(
                (node.lineno, a.name.removeprefix(PACKAGE + "."))
                for a in node.names if a.name.startswith(PACKAGE + ".")
            )
    return found


def allowed(layer: str, target: str) -> bool:
    top = target.split(".")[0]
    if top == layer:
        return True
    rules = ALLOWED[layer]
    return any(target == rule or target.startswith(rule + ".") or top == rule for rule in rules)


MODULES = sorted(p for p in ROOT.rglob("*.py") if layer_of(p) != "demo")


def test_every_layer_has_a_rule() -> None:
    assert {layer_of(p) for p in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path: Path) -> None:
    layer = layer_of(path)
    rel = str(path.relative_to(ROOT))
    bad = []
    for line, target in imports(path):
        if target.split(".")[0] == "demo":
            if rel != DEMO_ENTRY:
                bad.append(f"{rel}:{line} imports {target}: only {DEMO_ENTRY} may start the demo")
        elif not allowed(layer, target):
            bad.append(f"{rel}:{line} imports {target}: {layer} may import {sorted(ALLOWED[layer])}")
    assert bad == []


def test_the_rule_catches_a_source_building_metrics(tmp_path: Path) -> None:
    """The check itself can fail: a source importing the exposition layer is caught."""
    assert not allowed("sources", "exposition.http")
    assert not allowed("exposition", "collectors.queues")
    assert not allowed("scan", "remediation.check")
    assert not allowed("collectors", "exposition.http")
    assert allowed("collectors", "metrics")
    assert allowed("sources", "store")
    assert allowed("scan", "sources.paths")
