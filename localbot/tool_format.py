"""How a model writes tool calls: learned from its chat template, or localbot's built-in format.

A template that takes a ``tools`` variable (Qwen 2.5, Hermes, Llama 3.x, Mistral...) also shows
how the model writes a call: it renders past ``tool_calls`` of assistant messages in exactly the
text the model was trained to produce. :func:`learn_format` renders probe conversations (one call,
two calls, a plain reply) and cuts the call text at the probe's name, arguments and id, which
gives a :class:`CallFormat`: the text before the calls, the text of one call with its slots, the
text between two calls, the text after them. The same format builds the grammar that constrains
sampling and parses what the model wrote, so the three never disagree.

Templates without a ``tools`` variable get :data:`BUILTIN`, the Hermes/Qwen layout::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from localbot.grammar import GrammarBuilder, gbnf_literal, gbnf_not_char

log = logging.getLogger(__name__)

__all__ = ["BUILTIN", "CallFormat", "learn_format", "new_call_id"]

NAME, ARGS, ID = "\x00name", "\x00args", "\x00id"
SLOTS = (NAME, ARGS, ID)
_ID_CHARS = string.ascii_letters + string.digits


def new_call_id() -> str:
    """Nine letters and digits: the id shape the strictest templates (Mistral's) accept."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


@dataclass(frozen=True)
class CallFormat:
    """``start unit (between unit)* end``; ``unit`` is literal text and the slots NAME, ARGS
    (a JSON object) and ID. ``between`` is None when the template allows one call per turn."""

    start: str
    unit: tuple[str, ...]
    between: str | None
    end: str
    origin: str = "built-in"

    @property
    def parallel(self) -> bool:
        return self.between is not None

    def render(self, calls: Sequence[tuple[str, str, str]]) -> str:
        """The text of ``calls`` ((name, arguments JSON, id) each), as the model writes them."""
        units = []
        for name, args, call_id in calls:
            values = {NAME: name, ARGS: args, ID: call_id}
            units.append("".join(values.get(part, part) for part in self.unit))
        if not units:
            return ""
        joiner = self.between if self.between is not None else self.end + self.start
        return self.start + joiner.join(units) + self.end

    def grammar(
        self,
        tools: Sequence[dict[str, Any]],
        choice: str,
        parallel: bool = False,
        builder: GrammarBuilder | None = None,
    ) -> str:
        """GBNF for a reply under ``choice``: "auto" (text that does not start a call, or
        calls), "any" (calls of any tool), "none" (text only) or a tool name (calls of it).
        More than one call only when ``parallel`` and the format allows it."""
        builder = builder or GrammarBuilder()
        lit = builder.literal
        # Text that does not begin the way calls begin, then anything (or nothing at all).
        text = f"({_not_prefix(self.start)} [^\\x00]*)?"
        if choice == "none":
            builder.add_rule("root", text)
            return builder.text()
        chosen = [t for t in tools if choice in ("auto", "any") or t["function"]["name"] == choice]
        alternatives = []
        for i, tool in enumerate(chosen):
            fn = tool["function"]
            args = builder.add_schema(fn["parameters"], f"tool{i}-args")
            parts = []
            for part in self.unit:
                if part == NAME:
                    parts.append(lit(fn["name"]))
                elif part == ARGS:
                    parts.append(args)
                elif part == ID:
                    parts.append("[a-zA-Z0-9]{9}")
                elif part:
                    parts.append(lit(part))
            alternatives.append(builder.add_rule(f"tool{i}-call", " ".join(parts)))
        call = builder.add_rule("call", " | ".join(alternatives))
        more = f" ({lit(self.between)} {call})*" if parallel and self.between is not None else ""
        calls = builder.add_rule("calls", f"{lit(self.start)} {call}{more} {lit(self.end)}")
        builder.add_rule("root", f"{calls} | {text}" if choice == "auto" else calls)
        return builder.text()


BUILTIN = CallFormat(
    start='<tool_call>\n{"name": "',
    unit=(NAME, '", "arguments": ', ARGS),
    between='}\n</tool_call>\n<tool_call>\n{"name": "',
    end="}\n</tool_call>",
)

BUILTIN_INSTRUCTIONS = (
    "# Tools\n\nYou can call these tools. Each is given as a JSON Schema of its arguments:\n"
    "{tools}\n\nTo call tools, reply with nothing but one block per call:\n"
    '<tool_call>\n{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>\n'
    "The results come back in <tool_response> blocks. If no tool is needed, answer normally."
)


def _not_prefix(literal: str) -> str:
    """GBNF for one-or-more characters that diverge from ``literal`` before it is complete."""
    alternatives = [
        f"{gbnf_literal(literal[:i])} {gbnf_not_char(ch)}" if i else gbnf_not_char(ch)
        for i, ch in enumerate(literal)
    ]
    return "(" + " | ".join(alternatives) + ")"


# ----------------------------------------------------------------------------- learning
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": "probe",
            "parameters": {
                "type": "object",
                "properties": {"probe_key": {"type": "string", "description": "probe"}},
                "required": ["probe_key"],
            },
        },
    }
    for name in ("probe_fn_a", "probe_fn_b")
]


def _probe_call(letter: str) -> dict[str, Any]:
    return {
        "id": f"Pr0beId{letter.upper()}{letter}",
        "type": "function",
        "function": {
            "name": f"probe_fn_{letter}",
            "arguments": {"probe_key": f"probe_value_{letter}"},
        },
    }


_ARGS_RE = {
    letter: re.compile(r'\{\s*"probe_key"\s*:\s*"probe_value_' + letter + r'"\s*\}')
    for letter in "ab"
}


def learn_format(
    render: Callable[[list[dict[str, Any]], bool, list[dict[str, Any]]], str],
) -> CallFormat | None:
    """The call format a template renders, or None when it cannot be learned.

    ``render(messages, add_generation_prompt, tools)`` renders with the template."""
    user = {"role": "user", "content": "probe question"}

    def reply(**fields: Any) -> list[dict[str, Any]]:
        return [user, {"role": "assistant", "content": "", **fields}]

    try:
        head = render([user], True, _PROBE_TOOLS)
        plain = render(
            [user, {"role": "assistant", "content": "probe answer"}], False, _PROBE_TOOLS
        )
        one = render(reply(tool_calls=[_probe_call("a")]), False, _PROBE_TOOLS)
    except Exception as err:  # a template that refuses the probe: no tool support we can use
        log.info("tool call format not learned: %s", err)
        return None
    try:
        both = reply(tool_calls=[_probe_call("a"), _probe_call("b")])
        two: str | None = render(both, False, _PROBE_TOOLS)
    except Exception:  # Llama 3.1 raises: one call per turn
        two = None
    if not (plain.startswith(head) and one.startswith(head)):
        return None
    closing = plain[len(head) :].split("probe answer", 1)[-1]
    single = _strip_closing(one[len(head) :], closing)
    cut = _slots(single, "a")
    if cut is None:
        return None
    start, unit, end = cut
    between = None
    if two is not None and two.startswith(head):
        double = _strip_closing(two[len(head) :], closing)
        between = _between(double, start, unit, end)
    fmt = CallFormat(start, tuple(unit), between, end, origin="the chat template")
    log.info("learned the tool call format: %r", fmt)
    return fmt


def _strip_closing(text: str, closing: str) -> str:
    # What follows a plain reply (end-of-turn markup) also follows the calls: not ours to write,
    # the model ends its turn with an end-of-generation token.
    for tail in (closing, closing.rstrip()):
        if tail and text.endswith(tail):
            return text[: -len(tail)]
    return text


def _slots(text: str, letter: str) -> tuple[str, list[str], str] | None:
    """Cut one rendered call into (start, unit with slots, end)."""
    found = []
    args = _ARGS_RE[letter].search(text)
    if not args:
        return None
    found.append((args.start(), args.end(), ARGS))
    for value, slot in ((f"probe_fn_{letter}", NAME), (f"Pr0beId{letter.upper()}{letter}", ID)):
        if text.count(value) > 1:
            return None
        pos = text.find(value)
        if pos >= 0:
            found.append((pos, pos + len(value), slot))
    if not any(s == NAME for _, _, s in found):
        return None
    found.sort()
    start = text[: found[0][0]]
    unit: list[str] = []
    pos = found[0][0]
    for a, b, slot in found:
        if a > pos:
            unit.append(text[pos:a])
        unit.append(slot)
        pos = b
    end = text[pos:]
    if not start:
        return None  # a call must begin with recognisable text, or plain replies could not exist
    if unit[-1] in SLOTS and not end:
        return None
    return start, unit, end


def _between(double: str, start: str, unit: list[str], end: str) -> str | None:
    values_a = {NAME: "probe_fn_a", ID: "Pr0beIdAa"}
    values_b = {NAME: "probe_fn_b", ID: "Pr0beIdBb"}
    if not double.startswith(start) or not double.endswith(end):
        return None
    body = double[len(start) : len(double) - len(end) if end else None]
    first = _unit_text(unit, values_a, body, "a")
    if first is None or not body.startswith(first):
        return None
    rest = body[len(first) :]
    second = _unit_text(unit, values_b, rest, "b")
    if second is None or not rest.endswith(second):
        return None
    return rest[: len(rest) - len(second)]


def _unit_text(unit: list[str], values: dict[str, str], text: str, letter: str) -> str | None:
    args = _ARGS_RE[letter].search(text)
    if not args:
        return None
    filled = {**values, ARGS: args.group()}
    return "".join(filled.get(p, p) for p in unit)


def args_json(args: dict[str, Any]) -> str:
    """Arguments as the built-in format writes them."""
    return json.dumps(args, ensure_ascii=False)
