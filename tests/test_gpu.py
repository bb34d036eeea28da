"""The same chain on a GPU build of llama.cpp. Skipped (with the reason) where the build cannot
offload; LOCALBOT_GPU_MODEL picks the model, else the Gemma test model is used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from localbot import ChatLlamaCpp, SessionStore, build_chatbot
from localbot.runtime import supports_gpu_offload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not supports_gpu_offload(),
        reason="this llama-cpp-python build has no GPU offload (CPU-only build)",
    ),
]


@pytest.fixture(scope="module")
def gpu_model(test_model_path: Path) -> ChatLlamaCpp:
    path = os.environ.get("LOCALBOT_GPU_MODEL") or str(test_model_path)
    return ChatLlamaCpp(model_path=path, n_gpu_layers=-1, n_ctx=2048, temperature=0, max_tokens=8)


def test_default_offloads_every_layer(test_model_path: Path) -> None:
    assert ChatLlamaCpp(model_path=str(test_model_path)).gpu_layers == -1


def test_counts_stay_exact_on_gpu(gpu_model: ChatLlamaCpp) -> None:
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("Hello"),
        AIMessage("Hi!"),
        HumanMessage("naïve café 東京"),
    ]
    result = gpu_model.invoke(messages, max_tokens=1)
    assert result.usage_metadata["input_tokens"] == gpu_model.get_num_tokens_from_messages(messages)


def test_chain_with_cache_reuse_on_gpu(gpu_model: ChatLlamaCpp, tmp_path: Path) -> None:
    bot = build_chatbot(gpu_model, SessionStore(tmp_path), None)
    config = {"configurable": {"session_id": "gpu"}}
    bot.invoke({"messages": [HumanMessage("First " * 200)]}, config)
    second = bot.invoke({"messages": [HumanMessage("Second")]}, config)
    assert second.usage_metadata["input_token_details"]["cache_read"] > 200
    # Greedy decoding: the reply equals what a cold model gives for the same prompt.
    cold = ChatLlamaCpp(**{**gpu_model.model_dump(), "swa_full": True})
    prompt = bot.prompt_messages({}, bot.store.get("gpu").messages[:-1])
    assert cold.invoke(prompt).content == second.content
