"""Tests for the shipped monitoring and deployment artefacts.

Alert rules (promtool), runbooks, the generated Grafana dashboard, the generated PrometheusRule, the
kustomize base (rendered and validated against Kubernetes' schemas), the Compose service and the
Dockerfile. (The metric names they use, and the README's table of them, are checked against the
exporter's definitions in tests/test_metric_names.py.)

Needs promtool (Debian package `prometheus`) and the PyPI package `kubernetes-validate`. Without them
the tests that need them are skipped locally and fail under CI (environment variable CI set).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "immich-thumbnails.rules.yml"
RULE_TESTS = sorted((ROOT / "alerts" / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
DASHBOARD = ROOT / "dashboards" / "immich-thumbnails.json"
DASHBOARD_GENERATOR = ROOT / "dashboards" / "generate.py"
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
PROMETHEUSRULE = KUSTOMIZE_DIR / "prometheusrule.yaml"
PROMETHEUSRULE_GENERATOR = KUSTOMIZE_DIR / "generate_prometheusrule.py"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

RUNBOOK_BASE = "https://github.com/immich-thumbnail-exporter/immich-thumbnail-exporter/blob/main/docs/runbooks.md"
SEVERITIES = ("critical", "warning", "info")
PAGING_ALERTS = {"ImmichThumbnailRegenerationStuck"}

IMAGE = "ghcr.io/immich-thumbnail-exporter/immich-thumbnail-exporter:latest"
CONFIG_PATH = "/etc/immich-thumbnail-exporter/config.yml"
STATE_DIR = "/var/lib/immich-thumbnail-exporter"
PORT = 9813

# --- helpers ---------------------------------------------------------------------------------------------


def _missing(what: str) -> None:
    """Skip locally, fail under CI: CI must have every tool these tests need."""
    message = f"{what} is not available"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this is an error)")
    pytest.skip(message)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        _missing("promtool (Debian package `prometheus`)")
        raise AssertionError("unreachable")
    return path


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def artefact_metrics() -> ModuleType:
    return load_module("artefact_metrics", Path(__file__).with_name("artefact_metrics.py"))


def exporter_config() -> ModuleType:
    try:
        import immich_thumbnail_exporter.config as config
    except ImportError:
        sys.path.insert(0, str(ROOT / "exporter"))
        import immich_thumbnail_exporter.config as config
    return config


def rule_groups() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    groups: list[dict[str, Any]] = data["groups"]
    return groups


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_anchors() -> dict[str, str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", RUNBOOKS.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {github_anchor(h): h for h in headings}


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


# --- alert rules -----------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    assert RULE_TESTS, "no rule tests under alerts/tests/"
    result = subprocess.run(
        [promtool(), "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def commented_rules(text: str) -> list[dict[str, Any]]:
    """Example rules kept as comments in the rule file: each block of comment lines from
    ``# - alert:`` to the first comment line that is not indented YAML."""
    rules: list[dict[str, Any]] = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        body = line.strip()
        if body.startswith("# - alert:"):
            block = [body[2:]]
        elif block and body.startswith("#   "):
            block.append(body[2:])
        elif block:
            rules.extend(yaml.safe_load("\n".join(block)))
            block = []
    return rules


def test_commented_example_rules_are_valid(tmp_path: Path) -> None:
    """The example left commented out (no alert on Immich's report disagreeing with ours, by default)
    stays a valid rule for whoever uncomments it."""
    text = RULES.read_text(encoding="utf-8")
    examples = commented_rules(text)
    assert [r["alert"] for r in examples] == ["ImmichIntegrityReportDisagrees"]
    assert "ImmichIntegrityReportDisagrees" not in {a["alert"] for a in alerts()}
    assert examples[0]["labels"]["severity"] == "info"
    path = tmp_path / "examples.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "examples", "rules": examples}]}), encoding="utf-8")
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"
    assert (firing | quiet) - names == set(), "tests name alerts that do not exist"


def test_alert_labels_and_annotations() -> None:
    anchors = runbook_anchors()
    seen: set[str] = set()
    for alert in alerts():
        name = alert["alert"]
        assert name not in seen, f"duplicate alert {name}"
        seen.add(name)
        assert alert.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = alert.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert str(annotations.get(key, "")).strip(), f"{name}: no {key}"
        url = annotations["runbook_url"]
        assert url.startswith(RUNBOOK_BASE + "#"), f"{name}: runbook_url {url}"
        anchor = url.split("#", 1)[1]
        assert anchor in anchors, f"{name}: no heading for #{anchor} in docs/runbooks.md"
        assert anchor == github_anchor(name), f"{name}: runbook anchor should be #{github_anchor(name)}"


def test_every_runbook_section_belongs_to_an_alert() -> None:
    names = {a["alert"] for a in alerts()}
    sections = {h for h in runbook_anchors().values() if h.startswith("Immich")}
    assert sections == names


def test_only_regeneration_stuck_pages_and_orphans_never_do() -> None:
    severity = {a["alert"]: a["labels"]["severity"] for a in alerts()}
    assert {name for name, s in severity.items() if s == "critical"} == PAGING_ALERTS
    orphaned = [a for a in alerts() if "immich_queue_orphaned_jobs" in a["expr"] and "unless" not in a["expr"]]
    assert orphaned, "no alert on orphaned jobs"
    assert all(a["labels"]["severity"] == "info" for a in orphaned)


def test_alerts_wait_before_notifying() -> None:
    for alert in alerts():
        if alert["labels"]["severity"] == "info":
            continue
        assert parse_duration(alert.get("for", "0s")) >= 300, f"{alert['alert']}: `for` under 5m flaps"


def test_job_selector_is_in_one_place() -> None:
    text = RULES.read_text(encoding="utf-8")
    assert len(re.findall(r"\bup\{", text)) == 1, "the scrape-job selector must appear exactly once"


# --- dashboard -------------------------------------------------------------------------------------------


def test_dashboard_matches_generator() -> None:
    generator = load_module("dashboard_generate", DASHBOARD_GENERATOR)
    assert DASHBOARD.read_text(encoding="utf-8") == generator.render(), (
        "dashboards/immich-thumbnails.json is out of date: run python dashboards/generate.py"
    )


@pytest.mark.parametrize(
    "generator", [DASHBOARD_GENERATOR, PROMETHEUSRULE_GENERATOR], ids=["dashboard", "prometheusrule"]
)
def test_generator_check_shows_a_diff_when_stale(generator: Path, tmp_path: Path) -> None:
    """Both generators share one ``--check`` main: 0 when the file is current, else 1 and a diff."""
    committed = DASHBOARD if generator == DASHBOARD_GENERATOR else PROMETHEUSRULE
    fresh = subprocess.run([sys.executable, str(generator), "--check"], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stderr == ""
    stale = tmp_path / committed.name
    lines = committed.read_text(encoding="utf-8").splitlines(keepends=True)
    stale.write_text("".join([*lines[:3], "# edited by hand\n", *lines[3:]]), encoding="utf-8")
    before = stale.read_text(encoding="utf-8")
    res = subprocess.run([sys.executable, str(generator), "--check", "--output", str(stale)],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "-# edited by hand" in res.stderr and f"{stale} (committed)" in res.stderr
    assert "is out of date: run python " in res.stderr
    assert stale.read_text(encoding="utf-8") == before  # --check writes nothing


def test_dashboard_uid_variables_and_units() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "immich-thumbnails"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["query"] == "label_values(immich_exporter_build_info, instance)"
    assert instance["datasource"]["uid"] == "${datasource}"

    ids: set[int] = set()
    for panel in dashboard_panels(dashboard):
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {panel['title']!r} has no unit"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'instance="$instance"' in target["expr"], f"{panel['title']}: query ignores $instance"


def test_dashboard_panels_do_not_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    taken: set[tuple[int, int]] = set()
    for panel in dashboard_panels(dashboard):
        grid = panel["gridPos"]
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def dashboard_queries() -> list[str]:
    """The dashboard's queries with Grafana's variables replaced by plausible values."""
    substitutions = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "1h",
        "$instance": "exporter:9813",
        "$queue": "thumbnailGeneration",
    }
    queries = []
    for expr in artefact_metrics().dashboard_expressions(DASHBOARD):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"unknown variable in {expr}"
        queries.append(expr)
    return queries


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# One exporter exposing every metric the dashboard queries, as Prometheus stores it.
_TARGET = 'job="immich-thumbnail-exporter",instance="exporter:9813"'
_THUMBS = f'{_TARGET},queue="thumbnailGeneration"'
_EXPORTER_SERIES = {
    f'immich_assets{{{_TARGET},asset_type="image"}}': "200x40",
    f'immich_assets{{{_TARGET},asset_type="video"}}': "54x40",
    f'immich_asset_files_missing{{{_TARGET},kind="thumbnail",reason="file_missing"}}': "5x40",
    f'immich_asset_files_missing{{{_TARGET},kind="preview",reason="no_record"}}': "2x40",
    f"immich_assets_thumbhash_missing{{{_TARGET}}}": "1x40",
    f"immich_assets_metadata_pending{{{_TARGET}}}": "3x40",
    f"immich_assets_original_missing{{{_TARGET}}}": "2x40",
    f'immich_thumbnail_files{{{_TARGET},kind="thumbnail"}}': "249x40",
    f'immich_thumbnail_bytes{{{_TARGET},kind="thumbnail"}}': "2500000x40",
    f"immich_thumbnail_orphaned_files{{{_TARGET}}}": "4x40",
    f"immich_thumbnail_orphaned_bytes{{{_TARGET}}}": "40000x40",
    f'immich_person_thumbnails_missing{{{_TARGET},reason="file_missing"}}': "2x40",
    **{
        f'immich_media_filesystem_{what}_bytes{{{_TARGET},folder="{folder}"}}': values
        for folder in ("thumbs", "library")
        for what, values in (("size", "10000000000x40"), ("avail", "5000000000-1000000x40"))
    },
    f'immich_integrity_report_entries{{{_TARGET},type="missing_file",kind="thumbnail"}}': "4x40",
    f'immich_integrity_report_entries{{{_TARGET},type="missing_file",kind="original"}}': "1x40",
    f'immich_integrity_report_entries{{{_TARGET},type="untracked_file",kind="unknown"}}': "6x40",
    f'immich_integrity_report_entries{{{_TARGET},type="checksum_mismatch",kind="original"}}': "0x40",
    f"immich_integrity_report_newest_timestamp_seconds{{{_TARGET}}}": "0+60x40",
    f'immich_queue_jobs{{{_THUMBS},state="waiting"}}': "10x40",
    f'immich_queue_jobs{{{_THUMBS},state="active"}}': "2x40",
    f"immich_queue_paused{{{_THUMBS}}}": "0x40",
    f"immich_queue_workers{{{_THUMBS}}}": "1x40",
    f'immich_queue_oldest_job_age_seconds{{{_THUMBS},state="waiting"}}': "120x40",
    f"immich_queue_stalled_jobs{{{_THUMBS}}}": "0x40",
    f"immich_queue_orphaned_jobs{{{_THUMBS}}}": "0x40",
    f'immich_jobs_accepted_total{{{_THUMBS},job_name="AssetGenerateThumbnails"}}': "0+10x40",
    f'immich_jobs_finished_total{{{_THUMBS},job_name="AssetGenerateThumbnails",outcome="completed"}}': "0+9x40",
    f'immich_jobs_finished_total{{{_THUMBS},job_name="AssetGenerateThumbnails",outcome="failed"}}': "0+1x40",
    f'immich_thumbnail_jobs_verified_total{{{_THUMBS},job_name="AssetGenerateThumbnails",result="written"}}':
        "0+8x40",
    f'immich_thumbnail_jobs_verified_total{{{_THUMBS},job_name="AssetGenerateThumbnails",result="no_effect"}}':
        "0+1x40",
    **{
        f'immich_job_{kind}_seconds_bucket{{{_THUMBS},job_name="AssetGenerateThumbnails",le="{le}"}}': values
        for kind in ("wait", "run")
        for le, values in (("1", "0+4x40"), ("10", "0+9x40"), ("+Inf", "0+10x40"))
    },
    f'immich_regeneration_requests_total{{{_TARGET},result="accepted"}}': "0+2x40",
    f'immich_regeneration_verified_total{{{_TARGET},result="fixed"}}': "0+2x40",
    f'immich_server_info{{{_TARGET},version="v1.137.3",schema="v1.137+"}}': "1x40",
    f'immich_exporter_source_up{{{_TARGET},source="postgres"}}': "1x40",
    f'immich_exporter_collection_success{{{_TARGET},collection="files"}}': "1x40",
    f'immich_exporter_collection_duration_seconds{{{_TARGET},collection="files"}}': "12x40",
    f'immich_exporter_collection_last_success_timestamp_seconds{{{_TARGET},collection="files"}}': "0+60x40",
    f"immich_exporter_queue_events_lost_total{{{_THUMBS}}}": "0x40",
    f'immich_exporter_build_info{{{_TARGET},version="0.1.0"}}': "1x40",
}


def test_dashboard_queries_return_data(tmp_path: Path) -> None:
    """Against an exporter that exposes every metric, every dashboard query returns a series."""
    rules = [
        {"alert": f"DashboardQuery{i}Empty", "expr": f"absent({q})", "annotations": {"query": q}}
        for i, q in enumerate(dashboard_queries())
    ]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    checks = [{"eval_time": "30m", "alertname": r["alert"], "exp_alerts": []} for r in rules]
    series = [{"series": s, "values": v} for s, v in _EXPORTER_SERIES.items()]
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": checks}],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    result = subprocess.run([promtool(), "test", "rules", "test.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- PrometheusRule --------------------------------------------------------------------------------------


def test_prometheusrule_matches_generator() -> None:
    generator = load_module("generate_prometheusrule", PROMETHEUSRULE_GENERATOR)
    assert PROMETHEUSRULE.read_text(encoding="utf-8") == generator.render(RULES), (
        "deploy/kubernetes/prometheusrule.yaml is out of date: run deploy/kubernetes/generate_prometheusrule.py"
    )
    document = yaml.safe_load(PROMETHEUSRULE.read_text(encoding="utf-8"))
    assert document["spec"]["groups"] == rule_groups()


# --- Kubernetes ------------------------------------------------------------------------------------------

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources"}
_POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """Render the subset of kustomize this base uses: resources, namespace, labels (no selectors)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(kustomization) - _KUSTOMIZATION_KEYS
    assert not unknown, f"kustomization.yaml uses {unknown}: teach render_kustomization() first"
    assert kustomization["kind"] == "Kustomization"
    documents: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        text = (directory / resource).read_text(encoding="utf-8")
        documents.extend(d for d in yaml.safe_load_all(text) if d)
    for document in documents:
        metadata = document.setdefault("metadata", {})
        if "namespace" in kustomization:
            metadata["namespace"] = kustomization["namespace"]
        for entry in kustomization.get("labels", []):
            assert not entry.get("includeSelectors"), "includeSelectors is not rendered here"
            metadata.setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates") and document["kind"] in _POD_TEMPLATE_KINDS:
                template = document["spec"]["template"].setdefault("metadata", {})
                template.setdefault("labels", {}).update(entry["pairs"])
    return documents


def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for document in documents:
        assert document["kind"] not in out, f"two {document['kind']} resources"
        out[document["kind"]] = document
    return out


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render_kustomization(KUSTOMIZE_DIR)


def test_kustomize_core_resources_validate(rendered: list[dict[str, Any]]) -> None:
    try:
        kubernetes_validate = importlib.import_module("kubernetes_validate")
    except ImportError:
        _missing("kubernetes-validate (PyPI)")
        return
    latest = importlib.import_module("kubernetes_validate.utils").latest_version()
    for document in rendered:
        if not document["apiVersion"].startswith("monitoring.coreos.com/"):
            for version in ("1.27.0", latest):
                kubernetes_validate.validate(copy.deepcopy(document), version, strict=True)


def test_kustomize_renders_expected_resources(rendered: list[dict[str, Any]]) -> None:
    kinds = by_kind(rendered)
    assert set(kinds) == {"ConfigMap", "Deployment", "Service", "ServiceMonitor", "PrometheusRule"}
    for document in rendered:
        assert document["metadata"]["namespace"] == "immich"
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "immich"
        assert document["metadata"]["name"] == "immich-thumbnail-exporter"


def test_deployment(rendered: list[dict[str, Any]]) -> None:
    deployment = by_kind(rendered)["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert "fsGroup" not in pod["securityContext"], "fsGroup would chown Immich's media"
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["args"] == ["serve", f"--config.file={CONFIG_PATH}"]
    assert container["ports"] == [{"name": "metrics", "containerPort": PORT, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    media = mounts["/data"]
    assert media["readOnly"] is True
    assert volumes[media["name"]]["persistentVolumeClaim"]["readOnly"] is True
    assert "emptyDir" in volumes[mounts[STATE_DIR]["name"]]
    config_mount = mounts[str(Path(CONFIG_PATH).parent)]
    assert volumes[config_mount["name"]]["configMap"]["name"] == by_kind(rendered)["ConfigMap"]["metadata"]["name"]
    assert "config.yml" in by_kind(rendered)["ConfigMap"]["data"]


def test_service_and_servicemonitor_select_the_exporter(rendered: list[dict[str, Any]]) -> None:
    kinds = by_kind(rendered)
    pod_labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("metrics", PORT, "metrics")

    monitor = kinds["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert parse_duration(endpoint["scrapeTimeout"]) < parse_duration(endpoint["interval"])
    # The alert rules' job selector must match the job Prometheus Operator gives: the Service name.
    selector = re.search(r'up\{job=~"([^"]+)"\}', RULES.read_text(encoding="utf-8"))
    assert selector and re.fullmatch(selector.group(1), service["metadata"]["name"])

    rule = kinds["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == rule_groups()


def test_configmap_is_accepted_by_the_config_loader(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    kinds = by_kind(rendered)
    text = kinds["ConfigMap"]["data"]["config.yml"]
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}

    # Every *_file path must be a key of a mounted Secret; point them at temporary files to load it.
    secret_files = re.findall(r"_file:\s*(\S+)", text)
    assert secret_files
    for path in secret_files:
        mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        secret = volumes[mount["name"]]["secret"]
        key = path[len(mount["mountPath"]) + 1 :]
        assert key in {item["path"] for item in secret.get("items", [{"path": key}])}, path
        local = tmp_path / key
        local.write_text("not-a-real-secret\n", encoding="utf-8")
        text = text.replace(path, str(local))
    config_file = tmp_path / "config.yml"
    config_file.write_text(text, encoding="utf-8")

    config = exporter_config().load_config(str(config_file), environ={})
    assert config.media.root == "/data"
    assert config.media.location == "auto"
    assert config.redis.enabled
    assert config.immich.enabled
    assert config.remediation.state_dir == STATE_DIR


def test_kubectl_kustomize_matches_renderer(rendered: list[dict[str, Any]]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; render_kustomization() stands in for it")
    result = subprocess.run([kubectl, "kustomize", str(KUSTOMIZE_DIR)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from_kubectl = by_kind([d for d in yaml.safe_load_all(result.stdout) if d])
    assert from_kubectl == by_kind(rendered)


# --- Docker Compose --------------------------------------------------------------------------------------

IMMICH_ENV = {
    "UPLOAD_LOCATION": "./library",
    "DB_DATA_LOCATION": "./postgres",
    "IMMICH_VERSION": "release",
    "DB_PASSWORD": "postgres",
    "DB_USERNAME": "postgres",
    "DB_DATABASE_NAME": "immich",
}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}."""

    def replace(match: re.Match[str]) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:?-)([^}]*))?\}", replace, value)


def test_compose_service() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    (name,) = compose["services"]
    service = compose["services"][name]
    assert interpolate(service["image"], {}) == IMAGE
    assert service["env_file"] in (".env", [".env"])
    assert f"{PORT}:{PORT}" in [str(p) for p in service["ports"]]
    assert "${UPLOAD_LOCATION}:/data:ro" in service["volumes"]
    assert any(str(v).endswith(f":{STATE_DIR}") for v in service["volumes"])
    assert service.get("read_only") is True
    assert service.get("cap_drop") == ["ALL"]
    assert set(service.get("depends_on", [])) <= {"database", "redis"}
    assert "default" in service.get("networks", ["default"])

    # What the exporter sees: Immich's .env, then the service's environment (which wins).
    environ = dict(IMMICH_ENV)
    environ.update({k: interpolate(str(v), IMMICH_ENV) for k, v in service["environment"].items()})
    config = exporter_config().load_config(None, environ=environ)
    assert (config.database.host, config.database.user, config.database.name) == ("database", "postgres", "immich")
    assert config.database.password is not None and config.database.password.get() == "postgres"
    assert config.redis.host == "redis"
    assert config.media.root == "/data"


# --- Dockerfile ------------------------------------------------------------------------------------------


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", "\n".join(instructions), flags=re.MULTILINE))

    froms = [interpolate(line.split()[1], args) for line in instructions if line.startswith("FROM ")]
    assert len(froms) >= 2, "expected a multi-stage build"
    assert all(image == "python:3.11-slim" for image in froms), froms
    assert any(re.search(r"\bpip install \.(\s|$)", line) for line in instructions)

    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), "run as a numeric non-root user"
    assert f"EXPOSE {PORT}" in instructions
    assert instructions[-2:] == ['ENTRYPOINT ["immich-thumbnail-exporter"]', 'CMD ["serve"]']

    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"^immich-thumbnail-exporter\s*=", pyproject, flags=re.MULTILINE), "console script name"
