"""The one YAML reader for every file the exporter takes: safe, and duplicate keys refused.

PyYAML keeps the last of two equal keys without a word, so a second ``database:`` section pasted at the
end of a file would silently replace the first. Go's ``yaml.UnmarshalStrict`` (which the exporter-toolkit
web configuration is read with) refuses them; both of our files do the same.
"""

from __future__ import annotations

from typing import Any

import yaml


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` may be overridden by later keys: that is what merges are for
        key = loader.construct_object(key_node)
        try:
            earlier = first_line.get(key)
            first_line.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:  # an unhashable key: construct_mapping below reports it
            continue
        if earlier is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given at line {earlier})", key_node.start_mark
            )
    return loader.construct_mapping(node)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load(text: str | bytes) -> Any:
    """Parse one YAML document; raises ``yaml.YAMLError`` (see ``describe``) on anything wrong."""
    return yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass: no arbitrary objects


def describe(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: ``malformed YAML at line L, column C: what``."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or "invalid YAML"
    return f"malformed YAML{where}: {' '.join(str(problem).split())}"
