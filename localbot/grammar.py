"""JSON Schema to a llama.cpp grammar (GBNF), refusing what the grammar cannot guarantee.

llama.cpp samples only tokens a GBNF grammar allows, so output that follows a grammar built from a
schema cannot be invalid JSON. llama-cpp-python ships the converter (``llama_cpp.llama_grammar``,
a copy of llama.cpp's Python one), but it drops constraints silently: numeric bounds,
``uniqueItems``, unknown ``format``\\s, ``minLength`` next to a ``pattern``, keywords beside a
``$ref`` or an ``anyOf``. A grammar that drops a constraint lets the model write JSON that fails
validation. So:

1. ``localbot.schema_check`` refuses, at bind time and by name, what would be dropped;
2. :class:`GrammarBuilder` converts with a subclass of that converter fixed where it is wrong
   (constants and property names holding quotes or backslashes; raw control characters in
   strings; ``{}`` made an object; 31 February; ``$ref`` at the root) and extended where it
   falls short (number bounds and JSON-safe patterns, from ``localbot.gbnf_rules``);
3. :func:`check_grammar` has llama.cpp's own parser read the result.

Some outputs a schema allows are never produced (property order is fixed, numbers with bounds
have no exponent, patterns never produce a quote): the grammar is a subset of the schema, never a
superset.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from llama_cpp import llama_grammar as lg

from localbot.errors import ConfigError
from localbot.gbnf_rules import (
    gbnf_literal,
    gbnf_not_char,
    integer_rule,
    number_rule,
    unenforceable,
)
from localbot.schema_check import ANNOTATIONS, NUMBER_BOUNDS, normalize

__all__ = [
    "JSON_OBJECT_GRAMMAR",
    "GrammarBuilder",
    "check_grammar",
    "gbnf_literal",
    "gbnf_not_char",
    "normalize",
    "schema_grammar",
]

# ---------------------------------------------------------------------------- converter
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_DATE = (
    '[1-9] [0-9]{3} "-" ( ("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01]) '
    '| ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30") '
    '| "02" "-" ("0" [1-9] | "1" [0-9] | "2" [0-8]) )'
)


class _Converter(lg.SchemaConverter):
    """llama-cpp-python's converter with the fixes listed in the module docstring."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def add_rule(self, name: str, body: str) -> str:
        """Add a rule (or reuse an identical one); returns its name."""
        return self._add_rule(name, body)

    def _format_literal(self, literal: str) -> str:
        # The stock one leaves backslashes unescaped: a constant or property name holding a
        # quote or a backslash made a broken grammar, or JSON with a bad escape.
        return gbnf_literal(literal)

    def _generate_constant_rule(self, value: Any) -> str:
        return gbnf_literal(json.dumps(value, ensure_ascii=False))

    def _add_primitive(self, name: str, rule: Any) -> str:
        if name == "char":
            rule = lg.BuiltinRule(_JSON_CHAR, [])
        elif name == "date":
            rule = lg.BuiltinRule(_DATE, [])
        return super()._add_primitive(name, rule)

    def visit(self, schema: dict[str, Any], name: str) -> str:
        rule_name = name + "-" if name in lg.RESERVED_NAMES else name or "root"
        kind = schema.get("type")
        if not (schema.keys() - ANNOTATIONS) and kind is None:
            return self._add_rule(
                rule_name, self._add_primitive("value", lg.PRIMITIVE_RULES["value"])
            )
        bounds = {k: schema[k] for k in NUMBER_BOUNDS if k in schema}
        if kind == "integer" and bounds:
            return self._add_rule(rule_name, integer_rule(*_int_bounds(bounds)) + " space")
        if kind == "number" and bounds:
            lo, lo_open = _bound(bounds, "minimum", "exclusiveMinimum", max)
            hi, hi_open = _bound(bounds, "maximum", "exclusiveMaximum", min)
            return self._add_rule(rule_name, number_rule(lo, lo_open, hi, hi_open) + " space")
        if (
            kind == "object"
            and schema.get("additionalProperties") is True
            and not schema.get("properties")
        ):
            return self._add_rule(
                rule_name, self._add_primitive("object", lg.PRIMITIVE_RULES["object"])
            )
        return super().visit(schema, name)


def _bound(bounds: dict[str, Any], inclusive: str, exclusive: str, pick: Any) -> tuple[Any, bool]:
    candidates = []
    if inclusive in bounds:
        candidates.append((bounds[inclusive], False))
    if exclusive in bounds:
        candidates.append((bounds[exclusive], True))
    if not candidates:
        return None, False
    value = pick(c[0] for c in candidates)
    # The tighter bound wins; at a tie the exclusive one is tighter.
    return value, any(c[1] for c in candidates if c[0] == value)


def _int_bounds(bounds: dict[str, Any]) -> tuple[int | None, int | None]:
    import math

    lows = [math.ceil(bounds["minimum"])] if "minimum" in bounds else []
    if "exclusiveMinimum" in bounds:
        lows.append(math.floor(bounds["exclusiveMinimum"]) + 1)
    highs = [math.floor(bounds["maximum"])] if "maximum" in bounds else []
    if "exclusiveMaximum" in bounds:
        highs.append(math.ceil(bounds["exclusiveMaximum"]) - 1)
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _inline_root_ref(schema: dict[str, Any]) -> dict[str, Any]:
    """``{"$defs": ..., "$ref": "#/$defs/x"}`` as x itself (with the ``$defs``): the converter
    does not look inside a node that has a ``$ref``, so it would miss the definitions."""
    seen = set()
    while "$ref" in schema and schema["$ref"] not in seen:
        seen.add(schema["$ref"])
        target: Any = schema
        for part in schema["$ref"].split("#", 1)[-1].split("/")[1:]:
            if not isinstance(target, dict) or part not in target:
                raise unenforceable("", f"a reference to a missing definition ({schema['$ref']})")
            target = target[part]
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        schema = {**target, **defs}
    return schema


class GrammarBuilder:
    """Builds one GBNF grammar from several schemas and hand-written rules (tool calls)."""

    def __init__(self) -> None:
        self._converter = _Converter()
        self._count = 0

    def add_schema(self, schema: dict[str, Any], name: str) -> str:
        """Add the rules for ``schema`` (checked; ConfigError if unenforceable); returns the name
        of the rule that matches one JSON value of it."""
        normalized = _inline_root_ref(normalize(schema))
        self._count += 1
        url = f"schema{self._count}"
        try:
            resolved = self._converter.resolve_refs(normalized, url)
            return self._converter.visit(resolved, name)
        except (AssertionError, KeyError, ValueError) as err:
            raise unenforceable("", f"a construct the converter rejects ({err})") from err

    def add_rule(self, name: str, body: str) -> str:
        return self._converter.add_rule(name, body)

    literal = staticmethod(lambda text: gbnf_literal(text))

    def text(self) -> str:
        return self._converter.format_grammar()


@lru_cache(maxsize=64)
def _schema_grammar(schema_json: str) -> str:
    builder = GrammarBuilder()
    builder.add_schema(json.loads(schema_json), "")
    return builder.text()


def schema_grammar(schema: dict[str, Any]) -> str:
    """The GBNF grammar (root rule ``root``) for one JSON value of ``schema``."""
    return _schema_grammar(json.dumps(schema))  # key order kept: it is the output order


JSON_OBJECT_GRAMMAR = schema_grammar({"type": "object"})
"""Any JSON object: ``json_mode``."""


def check_grammar(grammar: str, vocab: Any) -> None:
    """Parse ``grammar`` with llama.cpp's own parser (against a model's vocabulary), so that a
    grammar llama.cpp would reject fails when it is built rather than at the first reply."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise ConfigError(
            "llama.cpp could not parse the grammar built from this schema (see the log with "
            "verbose=True); simplify the schema, especially its patterns"
        )
    llama_cpp.llama_sampler_free(sampler)
