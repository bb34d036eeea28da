"""The prompt template of every turn: the system prompt, whose ``{name}`` fields are template
variables (every other brace is literal: JSON and code in a system prompt just work), then the
kept messages."""

from __future__ import annotations

import re
from typing import Any

from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder

_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|[{}]")


def escape_system_prompt(text: str) -> str:
    """Make ``text`` a safe f-string template: ``{name}`` stays a variable, ``{{``/``}}`` stay
    literal braces, and every other brace (JSON, code) is literal too."""

    def repl(match: re.Match[str]) -> str:
        if match.group(1):
            return match.group(0)
        token = match.group(0)
        return {"{{": "{{", "}}": "}}", "{": "{{", "}": "}}"}[token]

    return _FIELD.sub(repl, text)


def make_prompt(system_prompt: str | None) -> ChatPromptTemplate:
    parts: list[Any] = []
    if system_prompt:
        parts.append(("system", escape_system_prompt(system_prompt)))
    parts.append(MessagesPlaceholder("messages"))
    return ChatPromptTemplate.from_messages(parts)
