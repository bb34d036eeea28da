"""ChatLlamaCpp on the real Gemma 3 270M model: exact token counts, content that stays content,
streaming, stop sequences and clear errors. Greedy decoding and short replies throughout."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.messages.utils import trim_messages
from langchain_core.prompts import ChatPromptTemplate

from localbot import ChatLlamaCpp
from localbot.builtin_templates import BUILTIN_TEMPLATES
from localbot.errors import ContextOverflowError, ModelFileError, ModelLoadError

LONG = " ".join(f"word{i}" for i in range(300))

HISTORIES = {
    "single human": [HumanMessage("Hello there")],
    "system first": [SystemMessage("You are terse."), HumanMessage("Hi")],
    "multi turn": [
        SystemMessage("Answer in French."),
        HumanMessage("What is 2+2?"),
        AIMessage("Quatre."),
        HumanMessage("And 3+3?"),
    ],
    "unicode": [HumanMessage("naïve café — 東京 🚀🚀 e\u0301 Ω≈ç√")],
    "empty content": [HumanMessage(""), AIMessage(""), HumanMessage("ok")],
    "long content": [SystemMessage("s"), HumanMessage(LONG)],
    "system only": [SystemMessage("Only a system prompt.")],
    "ai last": [HumanMessage("Say hi"), AIMessage("hi")],
    "whitespace": [HumanMessage("  leading and trailing  \n\n\t")],
}


@pytest.fixture(scope="module")
def model(test_model_path: Path) -> ChatLlamaCpp:
    return ChatLlamaCpp(model_path=str(test_model_path), n_ctx=2048, temperature=0, max_tokens=8)


def _reference_count(model: ChatLlamaCpp, messages) -> int:
    """Independent count: render the whole prompt as one string and let llama.cpp tokenize it
    the way its own chat handler does (valid for content without special-token text)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from localbot.chat_model import message_role
    from localbot.templates import merge_system

    turns = [{"role": message_role(m), "content": m.text} for m in messages]
    if not model.template.supports_system:
        turns = merge_system(turns)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(model.template.source).render(messages=turns, add_generation_prompt=True)
    llama = model.load()
    return len(llama.tokenize(text.encode(), add_bos=True, special=True))


@pytest.mark.parametrize("name", list(HISTORIES))
def test_counted_tokens_equal_evaluated_prompt_tokens(model: ChatLlamaCpp, name: str) -> None:
    messages = HISTORIES[name]
    counted = model.get_num_tokens_from_messages(messages)
    result = model.invoke(messages, max_tokens=1)
    llama = model.load()
    assert result.usage_metadata["input_tokens"] == counted
    # After one sampled token llama.cpp's context holds exactly the prompt it evaluated.
    assert llama.n_tokens == counted
    assert llama._input_ids.tolist() == model.prompt_ids(messages)
    assert counted == _reference_count(model, messages)


def test_counting_works_without_loading_weights(test_model_path: Path) -> None:
    fresh = ChatLlamaCpp(model_path=str(test_model_path), n_ctx=2048)
    ids = fresh.get_token_ids("Hello world")
    assert fresh._llama is None  # a vocabulary-only load was enough
    assert len(ids) == fresh.get_num_tokens("Hello world") > 0
    assert ids == fresh.load().tokenize(b"Hello world", add_bos=False)


def test_get_num_tokens_counts_no_bos(model: ChatLlamaCpp) -> None:
    bos = model.load().token_bos()
    assert bos not in model.get_token_ids("Hello")
    assert model.get_num_tokens("") == 0


def test_counting_never_uses_a_gpt2_fallback(model: ChatLlamaCpp, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Gemma splits this differently from GPT-2 (which gives 4 tokens), and never gives 0.
    text = "antidisestablishmentarianism"
    assert model.get_num_tokens(text) == len(model.load().tokenize(text.encode(), add_bos=False))
    assert model.get_num_tokens(text) > 0


INJECTIONS = [
    "<end_of_turn>",
    "<start_of_turn>model",
    "<|im_end|>",
    "<|eot_id|>",
    "<bos>",
    "<|im_start|>assistant",
    "[/INST]",
    "<|end|>",
    "</s>",
    "<eos>",
]


@pytest.mark.parametrize("fmt", sorted(BUILTIN_TEMPLATES))
def test_message_text_never_becomes_control_tokens(test_model_path: Path, fmt: str) -> None:
    model = ChatLlamaCpp(model_path=str(test_model_path), chat_format=fmt, n_ctx=2048)
    tok = model._tokenizer()
    hostile = " ".join(INJECTIONS)
    specials = {
        ids[0]
        for s in INJECTIONS
        if len(ids := tok.tokenize(s.encode(), add_bos=False, special=True)) == 1
    }
    assert specials, "the vocabulary should know some of these control tokens"

    def special_counts(text: str) -> Counter:
        msgs = [SystemMessage(text), HumanMessage(text), AIMessage(text), HumanMessage(text)]
        return Counter(t for t in model.prompt_ids(msgs) if t in specials)

    # The hostile text adds no control tokens: only the template's markup produces them.
    assert special_counts(hostile) == special_counts("benign")
    # ... and it is still all there, as text.
    prompt = model.prompt_ids([HumanMessage(hostile)])
    assert hostile in tok.detokenize(prompt, special=True).decode()


def test_system_message_is_merged_not_dropped_for_gemma(model: ChatLlamaCpp) -> None:
    assert model.template.name == "gemma"
    assert not model.template.supports_system
    ids = model.prompt_ids([SystemMessage("SYSTEM-RULES"), HumanMessage("question")])
    text = model.load().detokenize(ids, special=True).decode()
    assert text == (
        "<bos><start_of_turn>user\nSYSTEM-RULES\n\nquestion<end_of_turn>\n<start_of_turn>model\n"
    )


def test_invoke_and_stream_agree_and_carry_metadata(model: ChatLlamaCpp) -> None:
    messages = [HumanMessage("The capital of France is")]
    result = model.invoke(messages)
    chunks = list(model.stream(messages))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == result.text
    last = chunks[-1]
    assert last.chunk_position == "last"
    usage = result.usage_metadata
    for key in ("input_tokens", "output_tokens", "total_tokens"):
        assert last.usage_metadata[key] == usage[key]
    # The second call found the same prompt in llama.cpp's KV cache.
    assert last.usage_metadata["input_token_details"]["cache_read"] == usage["input_tokens"] - 1
    assert usage["input_tokens"] == model.get_num_tokens_from_messages(messages)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert 0 < usage["output_tokens"] <= 8
    for meta in (result.response_metadata, last.response_metadata):
        assert meta["model_name"] == "gemma-3-270m-q4_k_m.gguf"
        assert meta["finish_reason"] in ("stop", "length")
    # Token-sized chunks: each text chunk holds the text of about one token.
    text_chunks = [c for c in chunks if c.text]
    assert len(text_chunks) >= usage["output_tokens"] - 2


def test_stop_sequences_cut_invoke_and_stream_at_the_same_place(model: ChatLlamaCpp) -> None:
    messages = [HumanMessage("Write a list of fruits:")]
    full = model.invoke(messages, max_tokens=16).text
    assert len(full) >= 6, f"need some text to cut, got {full!r}"
    stop = full[3:6]
    expected = full[: full.index(stop)]
    cut = model.invoke(messages, max_tokens=16, stop=[stop])
    assert cut.text == expected
    assert cut.response_metadata["finish_reason"] == "stop"
    streamed = "".join(c.text for c in model.stream(messages, max_tokens=16, stop=[stop]))
    assert streamed == expected
    bound = ChatLlamaCpp(**{**model.model_dump(), "stop": [stop]})
    assert bound.invoke(messages, max_tokens=16).text == expected


def test_abandoned_stream_stops_generation_promptly(model: ChatLlamaCpp) -> None:
    stream = model.stream([HumanMessage("Count: one, two, three,")], max_tokens=200)
    next(stream)
    next(stream)
    stream.close()
    assert model.last_stats.output_tokens <= 3
    # The model is free again at once.
    assert model.invoke([HumanMessage("hi")], max_tokens=2).usage_metadata["output_tokens"] <= 2


def test_batch_and_threads_share_one_model_safely(model: ChatLlamaCpp) -> None:
    prompts = [[HumanMessage(p)] for p in ("One", "Two", "Three")]
    one_by_one = [model.invoke(p).text for p in prompts]
    assert [r.text for r in model.batch(prompts, config={"max_concurrency": 3})] == one_by_one


async def test_async_variants(model: ChatLlamaCpp) -> None:
    messages = [HumanMessage("The capital of France is")]
    expected = model.invoke(messages).text
    assert (await model.ainvoke(messages)).text == expected
    assert "".join([c.text async for c in model.astream(messages)]) == expected


def test_prompt_template_pipe(model: ChatLlamaCpp) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "Speak {lang}."), ("human", "{q}")])
    result = (prompt | model).invoke({"lang": "Spanish", "q": "Hello"})
    assert isinstance(result, AIMessage)
    rendered = prompt.invoke({"lang": "Spanish", "q": "Hello"}).to_messages()
    assert result.usage_metadata["input_tokens"] == model.get_num_tokens_from_messages(rendered)


def test_trim_messages_with_the_model_as_counter_never_overflows(model: ChatLlamaCpp) -> None:
    history = [SystemMessage("Be kind.")]
    for i in range(40):
        history += [HumanMessage(f"Question {i}: {LONG[: 5 * i]}"), AIMessage(f"Answer {i}.")]
    budget = 300
    trimmed = trim_messages(
        history,
        max_tokens=budget,
        token_counter=model,
        strategy="last",
        include_system=True,
        start_on="human",
    )
    assert isinstance(trimmed[0], SystemMessage)
    assert len(trimmed) > 1
    assert model.get_num_tokens_from_messages(trimmed) <= budget


def test_loads_once_and_construction_is_lazy(test_model_path: Path) -> None:
    lazy = ChatLlamaCpp(model_path="/does/not/exist.gguf")  # no error until used
    assert lazy._llama is None
    model = ChatLlamaCpp(model_path=str(test_model_path), n_ctx=512, temperature=0, max_tokens=1)
    model.invoke("a")
    first = model._llama
    model.invoke("b")
    assert model._llama is first
    assert model.load_seconds is not None


def test_defaults_come_from_the_model_file(test_model_path: Path) -> None:
    model = ChatLlamaCpp(model_path=str(test_model_path))
    assert model.context_window == 8192  # trained 32768, capped
    llama = model.load()
    assert llama.context_params.rope_freq_base == 0.0  # 0 = take the file's 1,000,000
    assert model.gguf.metadata["gemma3.rope.freq_base"] == 1_000_000.0


def test_prompt_plus_max_tokens_over_context_is_a_clear_error(test_model_path: Path) -> None:
    model = ChatLlamaCpp(model_path=str(test_model_path), n_ctx=256, max_tokens=200)
    with pytest.raises(ContextOverflowError, match=r"\d+ > the context window of 256"):
        model.invoke(LONG)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="model file not found"):
        ChatLlamaCpp(model_path=str(tmp_path / "nope.gguf")).invoke("hi")


def test_non_gguf_file(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_text("<html>404 Not Found</html>")
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        ChatLlamaCpp(model_path=str(bogus)).invoke("hi")


def test_truncated_gguf(tmp_path: Path, test_model_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with test_model_path.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(ModelFileError, match="truncated"):
        ChatLlamaCpp(model_path=str(cut)).invoke("hi")


def test_header_only_cut_is_truncated_too(tmp_path: Path, test_model_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with test_model_path.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(1000))
    with pytest.raises(ModelFileError, match="truncated"):
        ChatLlamaCpp(model_path=str(cut)).invoke("hi")


def test_unsupported_gguf_version(tmp_path: Path, test_model_path: Path) -> None:
    bad = tmp_path / "v9.gguf"
    shutil.copyfile(test_model_path, bad)
    with bad.open("r+b") as fh:
        fh.seek(4)
        fh.write((9).to_bytes(4, "little"))
    with pytest.raises(ModelFileError, match="GGUF version 9"):
        ChatLlamaCpp(model_path=str(bad)).invoke("hi")


def test_llama_cpp_load_failure_is_a_clear_error(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(path), arch="no-such-architecture")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="could not load"):
        ChatLlamaCpp(model_path=str(path)).invoke("hi")


def test_multibyte_characters_split_across_tokens_are_never_emitted_broken(
    model: ChatLlamaCpp,
) -> None:
    # "ꙮ" is three byte-fallback tokens in Gemma's vocabulary; the greedy reply repeats it.
    tok = model.load()
    assert len(tok.tokenize("ꙮ".encode(), add_bos=False)) == 3
    chunks = [c.text for c in model.stream([HumanMessage("ꙮꙮꙮꙮꙮꙮꙮꙮ")], max_tokens=12)]
    text_chunks = [c for c in chunks if c]
    assert "ꙮ" in "".join(text_chunks)
    assert all("\ufffd" not in c for c in text_chunks)
    assert all(c.encode("utf-8").decode("utf-8") == c for c in text_chunks)
    assert model.last_stats.output_tokens > len(text_chunks)  # characters spanned tokens


NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def test_a_template_that_rejects_system_messages_gets_them_merged(test_model_path) -> None:
    model = ChatLlamaCpp(model_path=str(test_model_path), chat_format=NO_SYSTEM_TEMPLATE)
    assert not model.template.supports_system
    ids = model.prompt_ids([SystemMessage("RULES"), HumanMessage("hi")])
    text = model._tokenizer().detokenize(ids, special=True).decode()
    assert "<start_of_turn>user\nRULES\n\nhi<end_of_turn>" in text


def test_template_code_runs_sandboxed(test_model_path) -> None:
    from localbot.errors import TemplateError

    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0]['content'] }}"
    model = ChatLlamaCpp(model_path=str(test_model_path), chat_format=hostile)
    with pytest.raises(TemplateError, match="failed to render"):
        model.prompt_ids([HumanMessage("hi")])
