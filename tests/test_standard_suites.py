"""LangChain's own conformance suites for chat models, run against the real test model."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from model_file import gemma_model_file

from localbot import ChatLlamaCpp

pytestmark = pytest.mark.model


def _params() -> dict[str, Any]:
    return {"model_path": str(gemma_model_file()), "n_ctx": 1024, "seed": 0}


def _standard(params: dict[str, Any]) -> dict[str, Any]:
    params = dict(params)
    # A local model has no API key, and ChatLlamaCpp rejects unknown settings (a misspelt
    # option is an error, not silently ignored), so the suite's placeholder key is left out.
    params.pop("api_key", None)
    # Short greedy replies: the base model's text is gibberish; the mechanics are what we test.
    params["max_tokens"] = 12
    return params


_NO_OVERRIDE = pytest.mark.xfail(
    reason="a ChatLlamaCpp is bound to the one GGUF file it loaded; a per-call `model` "
    "override is refused with a ConfigError instead of being reported as another model",
    strict=True,
)


# Not strict: they are about what a tiny model happens to write, which may differ on other
# hardware (a GPU's arithmetic), and a pass there is no bug.
# What the suite's own test_tool_calling and test_agent_loop are parametrized with.
_BOTH_OUTPUT_VERSIONS = pytest.mark.parametrize(
    "model", [{}, {"output_version": "v1"}], indirect=True
)
_BASE_MODEL_ARGS = pytest.mark.xfail(
    reason="model size: the 270M base model writes magic_function's input as 300, not 3 "
    "(any integer the schema allows is a valid call)",
    strict=False,
)
_BASE_MODEL_AUTO = pytest.mark.xfail(
    reason="model size: with tool_choice='auto' the 270M base model answers in text instead of "
    "choosing to call the tool",
    strict=False,
)
_BASE_MODEL_KEYS = pytest.mark.xfail(
    reason="model size: json_mode guarantees a JSON object, and the 270M base model does not "
    "follow the prompt's 'setup'/'punchline' keys",
    strict=False,
)
_BASE_MODEL_STRING = pytest.mark.xfail(
    reason="model size: the 270M base model keeps writing the customer_name string until "
    "max_tokens, so the forced call is never complete",
    strict=False,
)


class _OurModel:
    """What both suites need to know about ChatLlamaCpp."""

    @property
    def chat_model_class(self) -> type[ChatLlamaCpp]:
        return ChatLlamaCpp

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return _params()

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return _standard(super().standard_chat_model_params)

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatLlamaCppUnit(_OurModel, ChatModelUnitTests):
    @_NO_OVERRIDE
    def test_standard_params_model_override(self, model: BaseChatModel) -> None:
        super().test_standard_params_model_override(model)


# Tests whose replies are JSON (tool calls, structured output): more room than the 12 tokens
# the plain-text tests get, or every reply would be cut off mid-object, and greedy decoding (the
# grammar guarantees the shape; sampling a 270M base model at 0.8 fills strings with noise).
_JSON_TESTS = ("tool", "structured", "json_mode", "agent_loop")


class TestChatLlamaCppIntegration(_OurModel, ChatModelIntegrationTests):
    @pytest.fixture
    def model(self, request: pytest.FixtureRequest) -> BaseChatModel:
        params = {
            **self.standard_chat_model_params,
            **self.chat_model_params,
            **(getattr(request, "param", None) or {}),
        }
        if any(word in request.node.name for word in _JSON_TESTS):
            params.update(max_tokens=96, temperature=0)
        return ChatLlamaCpp(**params)

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[str]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    # The grammar guarantees well-formed calls and JSON; what a 270M *base* model puts in them
    # is another matter. These fail on the model's choices, not the mechanics (the same
    # mechanics pass in tests/test_tools.py and tests/test_structured_output.py).
    @_BASE_MODEL_ARGS
    @_BOTH_OUTPUT_VERSIONS
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @_BASE_MODEL_ARGS
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @_BASE_MODEL_AUTO
    @_BOTH_OUTPUT_VERSIONS
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @_BASE_MODEL_KEYS
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @_BASE_MODEL_STRING
    def test_unicode_tool_call_integration(self, model: BaseChatModel) -> None:
        super().test_unicode_tool_call_integration(model)

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """Ask twice with the same long prompt: the second call reads its prefix from
        llama.cpp's KV cache and reports how many tokens it reused."""
        model = ChatLlamaCpp(**_standard({**_params(), "temperature": 0}))
        prompt = [HumanMessage("Tell me about the sea. " * 20)]
        model.invoke(prompt)
        if stream:
            full = None
            for chunk in model.stream(prompt):
                full = chunk if full is None else full + chunk
            message = full
        else:
            message = model.invoke(prompt)
        assert message.usage_metadata["input_token_details"]["cache_read"] > 100
        return message
