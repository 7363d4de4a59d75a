"""The configuration file's JSON Schema, for editors' YAML plugins (``immich-thumbnail-exporter config-schema``)."""

from __future__ import annotations

from typing import Any, Final

from pydantic import TypeAdapter

from immich_thumbnail_exporter import __version__
from immich_thumbnail_exporter.config.sections import Config

DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"


def config_schema() -> dict[str, Any]:
    """A JSON Schema of the file ``--config.file`` reads (the environment and flags are not in it)."""
    schema = TypeAdapter(Config).json_schema(mode="validation")
    for definition in schema.get("$defs", {}).values():
        for prop in definition.get("properties", {}).values():
            prop.pop("title", None)  # "Pool Size" for pool_size says nothing the key does not
    for name, prop in schema["properties"].items():
        # An empty section (``database:``) is null in YAML, and means the defaults.
        ref = prop.pop("$ref")
        prop.pop("title", None)
        schema["properties"][name] = {"anyOf": [{"$ref": ref}, {"type": "null"}], **prop}
    schema["title"] = "immich-thumbnail-exporter configuration"
    return {"$schema": DIALECT, "$comment": f"immich-thumbnail-exporter {__version__}", **schema}
