#!/usr/bin/env python3
"""Generate values.schema.json from values.yaml and the comments in it.

    hack/gen-schema.py           write values.schema.json next to values.yaml
    hack/gen-schema.py --check   exit 1 if values.schema.json is out of date

Rules:
- The comment lines directly above a key (no blank line between) become its
  "description".
- The default value gives the type: string, boolean, integer, number,
  object (a mapping; its keys become "properties") or array.
- Every object gets "additionalProperties": false, so an unknown or
  misspelt key is rejected by helm install/upgrade/lint/template.
- A comment line "# @schema {...}" holds JSON merged into the key's schema,
  for what a default cannot say: enums, bounds, patterns, item schemas, and
  "additionalProperties" for maps whose keys are the user's (labels,
  nodeSelector) or that are Kubernetes objects (resources, affinity).
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import yaml

CHART = pathlib.Path(__file__).resolve().parents[1]
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
SCHEMA_MARK = "@schema"


class SchemaError(ValueError):
    pass


def comment_above(lines: list[str], line_no: int) -> tuple[str, dict[str, Any]]:
    """The description and the @schema keywords of the key on line ``line_no``
    (0-based): the contiguous '#' lines directly above it."""
    block: list[str] = []
    i = line_no - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        block.insert(0, lines[i].strip()[1:].strip())
        i -= 1
    text: list[str] = []
    extra: dict[str, Any] = {}
    for b in block:
        if b.startswith(SCHEMA_MARK):
            raw = b[len(SCHEMA_MARK) :].strip()
            try:
                extra.update(json.loads(raw))
            except json.JSONDecodeError as e:
                raise SchemaError(
                    f"values.yaml:{line_no}: bad {SCHEMA_MARK} JSON {raw!r}: {e}"
                ) from e
        else:
            text.append(b)
    return " ".join(t for t in text if t), extra


def type_of(value: Any) -> str | None:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return None


def schema_of(node: yaml.Node, value: Any, lines: list[str], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t = type_of(value)
    if t:
        out["type"] = t
    if isinstance(node, yaml.MappingNode):
        assert isinstance(value, dict)
        props: dict[str, Any] = {}
        for k_node, v_node in node.value:
            key = k_node.value
            desc, extra = comment_above(lines, k_node.start_mark.line)
            if not desc:
                raise SchemaError(
                    f"values.yaml:{k_node.start_mark.line + 1}: {path}{key} has no comment"
                )
            sub = schema_of(v_node, value[key], lines, f"{path}{key}.")
            sub = {"description": desc, **sub, **extra}
            if "type" not in sub:
                raise SchemaError(f"{path}{key}: null default needs an @schema type")
            props[key] = sub
        out["properties"] = props
        out["additionalProperties"] = False
    elif isinstance(node, yaml.SequenceNode):
        assert isinstance(value, list)
        if value:
            first = schema_of(node.value[0], value[0], lines, f"{path}[0].")
            out["items"] = first
    return out


def generate(text: str) -> dict[str, Any]:
    lines = text.splitlines()
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    values = yaml.safe_load(text)
    body = schema_of(root, values, lines, "")
    # Helm passes "global" to every chart, with or without subcharts.
    body["properties"]["global"] = {
        "description": "Values shared with subcharts (set by Helm).",
        "type": "object",
    }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "devmig chart values",
        "description": "Generated from values.yaml by hack/gen-schema.py; do not edit.",
        **body,
    }


def render(text: str) -> str:
    return json.dumps(generate(text), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    want = render(VALUES.read_text())
    if "--check" in argv:
        have = SCHEMA.read_text() if SCHEMA.exists() else ""
        if have != want:
            print(f"{SCHEMA} is out of date; run {pathlib.Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
