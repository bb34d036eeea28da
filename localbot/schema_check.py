"""Checking a JSON schema against what a llama.cpp grammar can enforce, before converting it.

:func:`normalize` walks the schema and raises ConfigError (naming the place and the keyword) for
any assertion the converter would drop silently: ``uniqueItems``, ``not``, conditionals, property
counts, ``multipleOf``, unknown string ``format``\\s, ``minLength`` beside a ``pattern``, keywords
beside a ``$ref`` or an ``anyOf``, ``oneOf`` without a discriminator. It returns an equivalent
schema in the shape the converter reads correctly (type lists with constraints become ``anyOf``,
one-element ``allOf`` is inlined, arrays get ``items``, patterns are made JSON-safe). Unknown
keywords are ignored, as validators ignore them.
"""

from __future__ import annotations

import json
from typing import Any

from localbot.gbnf_rules import json_safe_pattern, unenforceable

__all__ = ["ANNOTATIONS", "NUMBER_BOUNDS", "normalize"]

_ANNOTATIONS = {
    "title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
    "writeOnly", "$schema", "$id", "$defs", "definitions", "discriminator", "contentMediaType",
    "contentEncoding", "nullable",
}  # fmt: skip
_GENERIC = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
_BY_TYPE = {
    "object": {"properties", "required", "additionalProperties", "unevaluatedProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "additionalItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
    "null": set(),
}
# Assertions the converter cannot express: refused rather than dropped.
_REFUSED = {
    "not": "negation",
    "if": "conditionals",
    "then": "conditionals",
    "else": "conditionals",
    "dependentRequired": "dependencies between properties",
    "dependentSchemas": "dependencies between properties",
    "dependencies": "dependencies between properties",
    "patternProperties": "property-name patterns",
    "propertyNames": "property-name constraints",
    "minProperties": "property counts",
    "maxProperties": "property counts",
    "uniqueItems": "unique array items (use a list, or check after parsing)",
    "contains": "array 'contains'",
    "minContains": "array 'contains'",
    "maxContains": "array 'contains'",
    "unevaluatedItems": "unevaluated items",
    "multipleOf": "multiples",
    "$dynamicRef": "dynamic references",
    "$recursiveRef": "dynamic references",
}
_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
_ANNOTATION_FORMATS = {"password", "binary", "textarea", "multi-line"}


def _child(path: str, *parts: object) -> str:
    return path + "".join(f"/{p}" for p in parts)


def _types_of(node: dict[str, Any]) -> list[str]:
    t = node.get("type")
    if t is None:
        return []
    return [t] if isinstance(t, str) else list(t)


def normalize(schema: Any, path: str = "") -> Any:
    """Check ``schema`` and return an equivalent one the converter reads correctly: type lists
    with constraints become ``anyOf``, one-element ``allOf`` is inlined, arrays get ``items``.
    Raises ConfigError for what the grammar cannot enforce."""
    if schema is True:
        return {}
    if schema is False or not isinstance(schema, dict):
        raise unenforceable(path, f"a schema that is {json.dumps(schema)[:40]}")
    node = dict(schema)
    for key in node.keys() & _REFUSED.keys():
        if key == "uniqueItems" and node[key] is False:
            continue
        raise unenforceable(_child(path, key), _REFUSED[key])
    for defs in ("$defs", "definitions"):
        if isinstance(node.get(defs), dict):
            node[defs] = {k: normalize(v, _child(path, defs, k)) for k, v in node[defs].items()}
    combined = _normalize_combination(node, path)
    return combined if combined is not None else _normalize_typed(node, path)


def _normalize_combination(node: dict[str, Any], path: str) -> Any:
    """``node`` normalized when it is a reference, a union, an intersection or an enumeration;
    None when it is none of these."""
    if "$ref" in node:
        _only(node, path, {"$ref"}, "keywords beside a $ref")
        if not str(node["$ref"]).startswith("#/"):
            raise unenforceable(_child(path, "$ref"), "a reference outside this schema")
        return node
    for union in ("anyOf", "oneOf"):
        if union in node:
            if union == "oneOf" and "discriminator" not in node:
                raise unenforceable(
                    path, "oneOf without a discriminator (exactly one branch must match; use anyOf)"
                )
            _only(node, path, {union}, f"keywords beside {union}")
            node[union] = [normalize(s, _child(path, union, i)) for i, s in enumerate(node[union])]
            return node
    if "allOf" in node:
        return _normalize_all_of(node, path)
    if "const" in node or "enum" in node:
        _only(node, path, {"const", "enum", "type"}, "keywords beside enum/const")
        return node
    return None


def _normalize_typed(node: dict[str, Any], path: str) -> Any:
    """``node`` normalized by its ``type`` (several types: one branch each)."""
    asserted = {k for k in node if k in _GENERIC or any(k in s for s in _BY_TYPE.values())}
    types = _types_of(node)
    if len(types) > 1:
        rest = {k: v for k, v in node.items() if k != "type"}
        branches = [
            {**{k: v for k, v in rest.items() if k in _BY_TYPE.get(t, set())}, "type": t}
            for t in types
        ]
        return {"anyOf": [normalize(b, path) for b in branches]}
    if not types:
        specific = [t for t, keys in _BY_TYPE.items() if asserted & keys]
        if not specific:
            return {k: v for k, v in node.items() if k in _ANNOTATIONS}  # any value
        if specific != ["object"]:
            raise unenforceable(path, f"{', '.join(sorted(asserted))} without a 'type'")
        types = ["object"]
    kind = types[0]
    if kind not in _BY_TYPE:
        raise unenforceable(_child(path, "type"), f"unknown type {kind!r}")
    _only(node, path, {"type", *_BY_TYPE[kind]}, f"keywords that do not apply to type {kind!r}")
    return _NORMALIZE_BY_TYPE.get(kind, _same)(node, path)


def _only(node: dict[str, Any], path: str, allowed: set[str], what: str) -> None:
    extra = {
        k
        for k in node
        if k not in allowed
        and k not in _ANNOTATIONS
        and (k in _GENERIC or any(k in s for s in _BY_TYPE.values()))
    }
    if extra:
        raise unenforceable(path, f"{what} ({', '.join(sorted(extra))})")


def _same(node: dict[str, Any], path: str) -> dict[str, Any]:
    return node


def _normalize_all_of(node: dict[str, Any], path: str) -> dict[str, Any]:
    parts = node["allOf"]
    _only(node, path, {"allOf"}, "keywords beside allOf")
    if len(parts) == 1:
        merged = {**{k: v for k, v in node.items() if k != "allOf"}, **parts[0]}
        return normalize(merged, _child(path, "allOf", 0))
    raise unenforceable(path, "allOf with several schemas (merge them into one)")


def _normalize_object(node: dict[str, Any], path: str) -> dict[str, Any]:
    props = node.get("properties", {})
    if not isinstance(props, dict):
        raise unenforceable(_child(path, "properties"), "properties that are not an object")
    node["properties"] = {k: normalize(v, _child(path, "properties", k)) for k, v in props.items()}
    missing = [k for k in node.get("required", []) if k not in props]
    if missing:
        raise unenforceable(
            _child(path, "required"), f"required names not in properties: {missing}"
        )
    if node.get("unevaluatedProperties", False) is not False:
        raise unenforceable(_child(path, "unevaluatedProperties"), "unevaluated properties")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        node["additionalProperties"] = normalize(extra, _child(path, "additionalProperties"))
    if not props and "additionalProperties" not in node:
        node["additionalProperties"] = True  # a free-form object: any keys
    return node


def _normalize_array(node: dict[str, Any], path: str) -> dict[str, Any]:
    items, prefix = node.get("items"), node.get("prefixItems")
    lo, hi = node.get("minItems", 0), node.get("maxItems")
    if isinstance(items, list):  # draft-4 tuple form
        prefix, items = items, node.get("additionalItems", False)
        node.pop("additionalItems", None)
        node.pop("items")
    elif "additionalItems" in node:
        node.pop("additionalItems")
    if prefix is not None:
        if items not in (None, False):
            raise unenforceable(path, "prefixItems followed by more items")
        if not lo <= len(prefix) <= (hi if hi is not None else len(prefix)):
            raise unenforceable(path, "a tuple whose length minItems/maxItems forbid")
        node["prefixItems"] = [normalize(s, _child(path, "prefixItems", i)) for i, s in
                               enumerate(prefix)]  # fmt: skip
        node.pop("items", None)
        node.pop("minItems", None)
        node.pop("maxItems", None)
        return node
    if items is False:
        node["maxItems"] = 0
        items = {}
    node["items"] = normalize(items if items is not None else {}, _child(path, "items"))
    return node


def _normalize_string(node: dict[str, Any], path: str) -> dict[str, Any]:
    fmt = node.get("format")
    if fmt in _ANNOTATION_FORMATS:
        node.pop("format")
        fmt = None
    if fmt is not None and fmt not in _FORMATS:
        raise unenforceable(_child(path, "format"), f"string format {fmt!r}")
    kinds = [k for k in ("pattern", "format") if k in node]
    if ("minLength" in node or "maxLength" in node) and kinds:
        kinds.append("minLength/maxLength")
    if len(kinds) > 1:
        raise unenforceable(path, f"a string with both {' and '.join(kinds)}")
    if "pattern" in node:
        node["pattern"] = json_safe_pattern(node["pattern"], _child(path, "pattern"))
    return node


def _normalize_number(node: dict[str, Any], path: str) -> dict[str, Any]:
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = node.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise unenforceable(_child(path, key), f"a {key} that is not a number")
        if node["type"] == "number" and value != int(value):
            raise unenforceable(_child(path, key), "a number bound that is not a whole number")
    return node


_NORMALIZE_BY_TYPE = {
    "object": _normalize_object,
    "array": _normalize_array,
    "string": _normalize_string,
    "number": _normalize_number,
    "integer": _normalize_number,
}


ANNOTATIONS = frozenset(_ANNOTATIONS)
NUMBER_BOUNDS = frozenset(_BY_TYPE["number"])
