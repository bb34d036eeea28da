"""``ChatLlamaCpp.with_structured_output``: replies that are JSON of a given schema, by grammar.

Methods:

* ``"json_schema"`` (default): sampling follows a grammar built from the schema
  (``localbot.grammar``), so the reply parses and validates; a schema the grammar cannot enforce
  is a ConfigError when the runnable is built.
* ``"json_mode"``: any JSON object (the prompt must say which keys); the result is validated
  against the schema when one is given (a Pydantic class), so a wrong key is an error.
* ``"function_calling"``: a forced call of one tool whose arguments are the schema.

The model is bound with an OpenAI-shaped ``response_format`` (``{"type": "json_object"}`` or
``{"type": "json_schema", "json_schema": {"name": ..., "schema": ...}}``), which
:func:`grammar_for` turns into the grammar at generation time: the same setting an OpenAI-style
server passes through. A reply cut off by ``max_tokens`` cannot be complete JSON: that is an
``OutputParserException`` saying to raise ``max_tokens``. Streaming yields one result, the whole
object (every chunk a structured-output stream yields must be valid).
"""

from __future__ import annotations

import json
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from langchain_core.exceptions import OutputParserException
from langchain_core.messages import BaseMessage
from langchain_core.output_parsers import BaseOutputParser
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel

from localbot.errors import ConfigError
from localbot.grammar import JSON_OBJECT_GRAMMAR, schema_grammar

if TYPE_CHECKING:
    from localbot.chat_model import ChatLlamaCpp

__all__ = ["grammar_for", "json_schema_of", "with_structured_output"]

METHODS = ("json_schema", "json_mode", "function_calling")


def _is_pydantic(schema: Any) -> bool:
    if not isinstance(schema, type):
        return False
    if issubclass(schema, BaseModel):
        return True
    try:
        from pydantic import v1

        return issubclass(schema, v1.BaseModel)
    except ImportError:  # pragma: no cover
        return False


def json_schema_of(schema: Any) -> dict[str, Any]:
    """The JSON schema replies must follow: a Pydantic class's own (what it validates), else
    LangChain's conversion (TypedDicts, OpenAI tool/function dicts, plain JSON schemas)."""
    if _is_pydantic(schema):
        if issubclass(schema, BaseModel):
            return schema.model_json_schema()
        return schema.schema()
    if isinstance(schema, dict) and schema.get("type") == "function" and "function" in schema:
        return dict(schema["function"].get("parameters") or {})
    if isinstance(schema, dict) and "parameters" in schema and "name" in schema:
        return dict(schema["parameters"])
    if isinstance(schema, dict):
        return schema  # a JSON schema already
    try:
        return convert_to_json_schema(schema)
    except Exception as err:
        raise ConfigError(f"cannot read {schema!r} as a schema: {err}") from err


def grammar_for(response_format: Any) -> str | None:
    """The grammar for an OpenAI-style ``response_format`` (None: unconstrained)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_GRAMMAR
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise ConfigError(
                'response_format json_schema needs {"json_schema": {"schema": {...}}}'
            )
        return schema_grammar(schema)
    raise ConfigError(
        f"response_format {response_format!r} is not one of: "
        '{"type": "text"}, {"type": "json_object"}, {"type": "json_schema", ...}'
    )


class _Parse(BaseOutputParser[Any]):
    """JSON text (or a tool call's arguments) into the schema's type."""

    target: Any = None
    """The Pydantic class results are validated into (else results are plain JSON values)."""
    tool_name: str | None = None

    @property
    def _type(self) -> str:
        return "localbot_structured"

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        generation = result[0]
        message = generation.message if isinstance(generation, ChatGeneration) else None
        if self.tool_name is not None:
            return self._from_tool_call(message)
        return self._validate(self._load(generation.text, message))

    def parse(self, text: str) -> Any:
        return self._validate(self._load(text, None))

    def _load(self, text: str, message: BaseMessage | None) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise OutputParserException(
                _why_not_json(message) + f": {err}", llm_output=text
            ) from err

    def _from_tool_call(self, message: BaseMessage | None) -> Any:
        calls = getattr(message, "tool_calls", None) or []
        for call in calls:
            if call["name"] == self.tool_name:
                return self._validate(call["args"])
        raise OutputParserException(
            _why_not_json(message) + f": no complete call of {self.tool_name!r}",
            llm_output=getattr(message, "text", ""),
        )

    def _validate(self, value: Any) -> Any:
        if not _is_pydantic(self.target):
            return value
        try:
            if issubclass(self.target, BaseModel):
                return self.target.model_validate(value)
            return self.target.parse_obj(value)
        except Exception as err:
            raise OutputParserException(
                f"the reply does not fit {self.target.__name__}: {err}",
                llm_output=json.dumps(value),
            ) from err


def _why_not_json(message: BaseMessage | None) -> str:
    meta = getattr(message, "response_metadata", None) or {}
    if meta.get("finish_reason") == "length":
        return "the reply was cut off by max_tokens before the JSON was complete (raise max_tokens)"
    if meta.get("finish_reason") == "timeout":
        return "the reply was cut off by the timeout before the JSON was complete"
    return "the reply is not complete JSON"


def _traced_schema(schema: Any) -> dict[str, Any]:
    # What LangSmith traces show (LangChain's conversion; it wants a title on a dict schema).
    try:
        return convert_to_json_schema(schema)
    except Exception:
        return json_schema_of(schema)


def with_structured_output(
    model: ChatLlamaCpp,
    schema: Any,
    *,
    method: str = "json_schema",
    include_raw: bool = False,
    strict: bool | None = None,
    **kwargs: Any,
) -> Runnable[Any, Any]:
    """See the module docstring. ``strict`` is accepted for compatibility: a grammar is always
    strict."""
    if kwargs:
        raise ConfigError(f"with_structured_output got unknown arguments: {sorted(kwargs)}")
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not one of: {', '.join(METHODS)}")
    if schema is None and method != "json_mode":
        raise ConfigError(f"method {method!r} needs a schema")
    parser = _Parse(target=schema)
    ls_format = {"kwargs": {"method": method}, "schema": _traced_schema(schema)} if schema else None
    if method == "function_calling":
        name = convert_to_openai_tool(schema)["function"]["name"]
        bound = model.bind_tools([schema], tool_choice=name, ls_structured_output_format=ls_format)
        parser = _Parse(target=schema, tool_name=name)
    elif method == "json_mode":
        bound = model.bind(
            response_format={"type": "json_object"}, ls_structured_output_format=ls_format
        )
    else:
        json_schema = json_schema_of(schema)
        model.check_grammar(schema_grammar(json_schema))
        name = json_schema.get("title") or "response"
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": json_schema},
        }
        bound = model.bind(response_format=response_format, ls_structured_output_format=ls_format)
    if not include_raw:
        return bound | parser
    parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")
