"""``--set key.path=value``: one override syntax for ``omni run`` (recipes) and ``omni train`` (stages).

The value is parsed as YAML (``0.3``, ``true``, ``null``, ``[a, b]``, ``{x: 1}``); the key is a
dotted path into the document. A mapping on the way is created when missing; a list is indexed by a
whole number (``pipeline.2.params.threshold=0.3``, ``sources.0.unit_size=64``; ``-1`` is the last
item). What the result means is checked by whoever reads the document afterwards (the recipe schema,
the stage loader), so a typo in a key fails there with its usual message.
"""

from __future__ import annotations

from typing import Any

import yaml


class OverrideError(ValueError):
    """An override that cannot be applied (no ``=``, a path through a scalar, a list index out of range)."""


def apply_override(doc: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value`` with ``value`` parsed as YAML (numbers, lists, mappings, null); lists by index."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise OverrideError(f"override {assignment!r} is not KEY=VALUE")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise OverrideError(f"override {assignment!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from e
    parts = key.split(".")
    node: Any = doc
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the document"
        if isinstance(node, list):
            try:
                index = int(part)
            except ValueError:
                raise OverrideError(f"override {assignment!r}: {where} is a list; {part!r} is not an index") from None
            if not -len(node) <= index < len(node):
                raise OverrideError(f"override {assignment!r}: {where} has {len(node)} items, no index {index}")
            if last:
                node[index] = parsed
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = parsed
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise OverrideError(f"override {assignment!r}: {where} is not a mapping or a list")
