"""``config-schema``: the JSON Schema editors use accepts the shipped configurations and refuses mistakes.

The schema is checked by a small validator written here for the keywords it uses (an unknown keyword
fails the test), not by pydantic: the point is what an editor sees, independently of the loader.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from immich_thumbnail_exporter.config import Config, ConfigError, config_schema, load_config
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent

_TYPES: dict[str, Any] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}
_ANNOTATIONS = {"$schema", "$comment", "$defs", "title", "description", "default", "writeOnly"}
_ASSERTIONS = {"$ref", "anyOf", "type", "enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "properties",
               "additionalProperties", "items"}  # fmt: skip


def violations(schema: dict[str, Any], value: Any, root: dict[str, Any], where: str = "") -> list[str]:
    """Where ``value`` breaks ``schema`` (2020-12 semantics for the keywords above)."""
    unknown = set(schema) - _ANNOTATIONS - _ASSERTIONS
    assert not unknown, f"{where}: keywords this check does not know: {unknown}"
    out: list[str] = []
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        out += violations(root["$defs"][name], value, root, where)
    if "anyOf" in schema:
        branches = [violations(s, value, root, where) for s in schema["anyOf"]]
        if all(branches):  # say why each branch failed
            out += [f"{where}: matches none of anyOf", *(v for b in branches for v in b)]
    if "type" in schema and not _TYPES[schema["type"]](value):
        return [*out, f"{where}: not {schema['type']}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: not one of {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        out.append(f"{where}: does not match {schema['pattern']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: above maximum")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            out.append(f"{where}: not above exclusiveMinimum")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                out += violations(properties[key], item, root, f"{where}.{key}".lstrip("."))
            elif schema.get("additionalProperties") is False:
                out.append(f"{where}.{key}".lstrip(".") + ": not allowed")
    if isinstance(value, list) and "items" in schema:
        out += [v for i, item in enumerate(value) for v in violations(schema["items"], item, root, f"{where}[{i}]")]
    return out


def readme_config() -> dict[str, Any]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Configuration") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block is not None, "no yaml example in the README's Configuration section"
    data = yaml.safe_load(block.group(1))
    assert isinstance(data, dict) and "database" in data
    return data


def kubernetes_config() -> dict[str, Any]:
    configmap = yaml.safe_load((ROOT / "deploy/kubernetes/configmap.yaml").read_text(encoding="utf-8"))
    data = yaml.safe_load(configmap["data"]["config.yml"])
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    res = run_cli("config-schema")
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    assert printed == json.loads(json.dumps(config_schema()))
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    return dict(printed)


def load_from(data: dict[str, Any], tmp_path: Path) -> Config:
    """``load_config`` on ``data``, its secret files (``/run/secrets/...``) swapped for real ones."""
    for section in data.values():
        for key in [k for k in (section or {}) if k in ("password_file", "api_key_file")]:
            secret = tmp_path / f"secret-{key}"
            secret.write_text("not-a-real-secret\n")
            section[key] = str(secret)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return load_config(str(path), environ={})


@pytest.mark.parametrize("shipped", [readme_config, kubernetes_config], ids=["README", "kubernetes"])
def test_schema_accepts_the_shipped_configurations(schema: dict[str, Any], shipped: Any, tmp_path: Path) -> None:
    data = shipped()
    assert violations(schema, data, schema) == []
    # Empty sections are null in YAML, and mean the defaults.
    assert violations(schema, {**data, "checks": None, "log": None}, schema) == []
    assert load_from(data, tmp_path).media.root == "/data"  # and the loader agrees


@pytest.mark.parametrize(("change", "expected"), [
    ({"database": {"hots": "db"}}, "database.hots: not allowed"),
    ({"bogus": {}}, "bogus: not allowed"),
    ({"database": {"host_file": "/x"}}, "database.host_file: not allowed"),
    ({"database": {"port": "abc"}}, "database.port: not integer"),
    ({"database": {"port": 70000}}, "database.port: above maximum"),
    ({"intervals": {"files": "soon"}}, "intervals.files: matches none of anyOf"),
    ({"remediation": {"kinds": ["thumbnail", "bogus"]}}, "remediation.kinds: matches none of anyOf"),
    ({"log": {"level": "loud"}}, "log.level: not one of"),
    ({"checks": {"verify_headers": "maybe"}}, "checks.verify_headers: not boolean"),
])  # fmt: skip
def test_schema_refuses_mistakes(
    schema: dict[str, Any], change: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    data = readme_config()
    for section, values in change.items():
        data[section] = {**(data.get(section) or {}), **values}
    found = violations(schema, data, schema)
    assert any(v.startswith(expected) for v in found), found
    with pytest.raises(ConfigError) as err:  # the loader refuses the same file, at the same key
        load_from(data, tmp_path)
    assert any(p.startswith(expected.split(":")[0] + ":") for p in err.value.problems), err.value.problems


SECRETS = {"database": {"url", "password"}, "redis": {"url", "password"}, "immich": {"api_key"}}


def test_schema_names_every_key_the_loader_knows(schema: dict[str, Any]) -> None:
    hints = typing.get_type_hints(Config)
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(Config)}
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        properties = schema["$defs"][cls.__name__]["properties"]
        fields = {f.name for f in dataclasses.fields(cls)}
        secrets = SECRETS.get(section.name, set())
        assert set(properties) == fields | {f"{name}_file" for name in secrets}, section.name
        assert schema["$defs"][cls.__name__]["additionalProperties"] is False
    assert schema["$defs"]["IntervalsConfig"]["properties"]["files"]["default"] == "15m"
    assert schema["$defs"]["ChecksConfig"]["properties"]["verify_headers"]["description"]


def test_schema_to_a_file(tmp_path: Path) -> None:
    out = tmp_path / "config.schema.json"
    res = run_cli("config-schema", "--output", str(out))
    assert res.returncode == 0 and res.stdout == "", res.stderr
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(config_schema()))
    res = run_cli("config-schema", "--output", str(tmp_path / "no" / "such" / "dir.json"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: --output: cannot write ") and "No such file or directory" in res.stderr
