"""Tool calling and structured output for ``ChatLlamaCpp`` (``bind_tools``,
``with_structured_output``): the LangChain-facing methods, kept apart from the model's core. The
work is in ``localbot.tools`` (formats, the call grammar, parsing) and ``localbot.structured``
(schemas to grammars, parsing the reply)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable
from pydantic import BaseModel

from localbot import structured
from localbot import tools as tools_mod
from localbot.grammar import check_grammar
from localbot.llama_cache import vocab_handle
from localbot.tools import ToolCall


class ToolsAndSchemas:
    """Mixed into ``ChatLlamaCpp`` (it provides ``template``, ``_tokenizer`` and ``bind``)."""

    def _tool_call(self, kwargs: dict[str, Any]) -> ToolCall | None:
        tools = kwargs.get("tools")
        specs = tools_mod.tool_specs(tools) if tools else None
        parallel = kwargs.get("parallel_tool_calls")
        return tools_mod.plan(self.template, specs, kwargs.get("tool_choice"), parallel)

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: str | dict | bool | None = None,
        parallel_tool_calls: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (``@tool`` functions, ``BaseTool``s, Pydantic classes, TypedDicts, OpenAI
        dicts). ``tool_choice``: "auto" (default: text or a call), "any"/"required" (a call),
        "none", or a tool name. Sampling follows a grammar, so calls are always well-formed
        JSON matching the tool's arguments schema; a schema the grammar cannot enforce is a
        ConfigError here. ``parallel_tool_calls=True`` allows several calls in one reply where
        the chat template can show them (off by default: small models repeat a call)."""
        specs = tools_mod.tool_specs(tools)
        call = tools_mod.plan(self.template, specs, tool_choice, parallel_tool_calls)
        if call is not None:
            self.check_grammar(call.grammar)
        return super().bind(
            tools=specs, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, **kwargs
        )

    def check_grammar(self, grammar: str) -> None:
        """Raise ConfigError now if llama.cpp's parser rejects ``grammar`` (GBNF)."""
        check_grammar(grammar, vocab_handle(self._tokenizer()))

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        include_raw: bool = False,
        method: str = "json_schema",
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | BaseModel]:
        """Replies parsed into ``schema`` (a Pydantic class, TypedDict or JSON schema dict).

        ``method``: "json_schema" (default; sampling follows a grammar built from the schema),
        "json_mode" (any JSON object) or "function_calling" (a forced tool call). See
        ``localbot.structured``."""
        return structured.with_structured_output(
            self, schema, method=method, include_raw=include_raw, **kwargs
        )
