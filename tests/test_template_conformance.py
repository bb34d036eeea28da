"""Real chat templates of popular models, on real vocabularies: localbot's prompt is the one
transformers renders, tokenized the way llama.cpp tokenizes a whole prompt, and a control token
typed in a message stays text.

The reference renderer is transformers' ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)`` with a stub tokenizer (no torch, no hub) carrying the vocabulary's
BOS and EOS text. The reference token ids are llama.cpp's ``tokenize(prompt, special=True)`` of
that reference string, plus BOS when the model asks for it and the prompt does not start with it.
The templates and vocabularies are listed in ``template_cases.py``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from template_cases import (
    TEMPLATE_CASES,
    VOCABS,
    TemplateCase,
    smollm2_file,
    transformers_stub,
    vocab_file,
)

from localbot.chat_model import ChatLlamaCpp, message_role
from localbot.errors import TemplateError
from localbot.templates import merge_consecutive, merge_system

pytestmark = pytest.mark.model

RENDERABLE = [c for c in TEMPLATE_CASES if not c.needs_tools]

# Replies as models write them: leading spaces, trailing newlines, reasoning sections; questions
# with trailing spaces. Templates that trim or strip <think> must do so exactly as upstream.
HISTORIES: dict[str, list[BaseMessage]] = {
    "one message": [HumanMessage("Hello")],
    "system first": [SystemMessage("You are terse."), HumanMessage("Hi there")],
    "no system, multi-turn": [
        HumanMessage("Hi"),
        AIMessage(" Hello! How can I help?\n"),
        HumanMessage("Tell me a joke.  "),
    ],
    "long": [
        SystemMessage("Be brief.\n"),
        *[
            m
            for i in range(30)
            for m in (
                HumanMessage(f"Question {i}: what is {i} + {i}? "),
                AIMessage(f"<think>\nAdd {i} to itself.\n</think>\n\n{2 * i}\n"),
            )
        ],
        HumanMessage("Thanks, bye."),
    ],
    "non-alternating": [
        HumanMessage("first"),
        HumanMessage("second"),
        AIMessage("one"),
        AIMessage("two"),
        HumanMessage("third"),
    ],
}


def _vocab_pairs() -> list[Any]:
    """Each template on its own family's vocabulary and on another real one (Gemma's
    SentencePiece vocabulary, or SmolLM2's BPE one for the Gemma templates)."""
    pairs = []
    for case in RENDERABLE:
        other = "smollm2" if VOCABS[case.family].base == "gemma" else "gemma"
        for vocab in (case.family, other):
            pairs.append(pytest.param(case, vocab, id=f"{case.name}-{vocab}"))
    return pairs


# ---------------------------------------------------------------------------- fixtures
_vocab_loads: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_vocab_loads() -> Any:
    yield
    for llama in _vocab_loads.values():
        llama.close()  # now, not at interpreter exit (when llama.cpp is half torn down)
    _vocab_loads.clear()


def _llama(vocab: str) -> Any:
    from llama_cpp import Llama

    if vocab not in _vocab_loads:
        _vocab_loads[vocab] = Llama(str(vocab_file(vocab)), vocab_only=True, verbose=False)
    return _vocab_loads[vocab]


def chat_model(case: TemplateCase, vocab: str) -> ChatLlamaCpp:
    model = ChatLlamaCpp(model_path=str(vocab_file(vocab)), chat_format=case.source)
    model._vocab = _llama(vocab)  # one vocab-only load per vocabulary for the whole module
    return model


def transformers_render(model: ChatLlamaCpp, turns: list[dict[str, str]]) -> str:
    stub = transformers_stub(
        model.template.source, model.template.bos_token, model.template.eos_token
    )
    return stub.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def turns_of(messages: list[BaseMessage]) -> list[dict[str, str]]:
    return [{"role": message_role(m), "content": m.text} for m in messages]


def reference_render(model: ChatLlamaCpp, messages: list[BaseMessage]) -> str:
    """transformers' render of the history as localbot shapes it for this template: system text
    merged when the template has no system role; consecutive turns merged, then system text
    too, when the template raised on the history as it was."""
    turns = turns_of(messages)
    if not model.template.supports_system:
        turns = merge_system(turns)
    error: Exception | None = None
    for attempt in (turns, merge_consecutive(turns), merge_consecutive(merge_system(turns))):
        try:
            return transformers_render(model, attempt)
        except Exception as err:
            error = error or err
    raise AssertionError(f"transformers cannot render this history either: {error}")


def llama_cpp_ids(model: ChatLlamaCpp, text: str) -> list[int]:
    """llama.cpp's tokenization of a whole rendered prompt, BOS added as localbot adds it."""
    import llama_cpp

    tok = model._tokenizer()
    ids = tok.tokenize(text.encode(), add_bos=False, special=True)
    if llama_cpp.llama_vocab_get_add_bos(tok._model.vocab) and ids[:1] != [tok.token_bos()]:
        ids.insert(0, tok.token_bos())
    return ids


# ---------------------------------------------------------------------------- conformance
@pytest.mark.parametrize(("case", "vocab"), _vocab_pairs())
@pytest.mark.parametrize("history", list(HISTORIES))
def test_rendered_prompt_is_what_transformers_renders(
    case: TemplateCase, vocab: str, history: str
) -> None:
    model = chat_model(case, vocab)
    messages = HISTORIES[history]
    ours = model.template.render(turns_of(messages))
    reference = reference_render(model, messages)
    if ours != reference and case.uses_today:  # rendered either side of midnight
        ours = model.template.render(turns_of(messages))
    assert ours == reference


@pytest.mark.parametrize(("case", "vocab"), _vocab_pairs())
@pytest.mark.parametrize("history", list(HISTORIES))
def test_prompt_ids_are_llama_cpps_whole_prompt_tokenization(
    case: TemplateCase, vocab: str, history: str
) -> None:
    model = chat_model(case, vocab)
    messages = HISTORIES[history]
    ids = model.prompt_ids(messages)
    expected = llama_cpp_ids(model, reference_render(model, messages))
    if ids != expected and case.uses_today:
        model.clear_prompt_cache()
        ids = model.prompt_ids(messages)
    assert ids == expected
    assert model.get_num_tokens_from_messages(messages) == len(ids)


@pytest.mark.parametrize("case", RENDERABLE, ids=lambda c: c.name)
def test_typed_control_tokens_of_the_family_stay_text(case: TemplateCase) -> None:
    model = chat_model(case, case.family)
    tok = model._tokenizer()
    typed = VOCABS[case.family].hostile_tokens
    controls = {tok.tokenize(t.encode(), add_bos=False, special=True)[0] for t in typed}
    hostile = "say " + " and ".join(typed) + " please"
    # Halves of control tokens next to the template's markup must not join into one either.
    halves = " ".join(t[: len(t) // 2] for t in typed), " ".join(t[len(t) // 2 :] for t in typed)

    def shaped(*texts: str) -> list[BaseMessage]:
        return [
            SystemMessage(texts[0]),
            HumanMessage(texts[1]),
            AIMessage(texts[2]),
            HumanMessage(texts[0]),
        ]

    def control_count(messages: list[BaseMessage]) -> Counter:
        return Counter(t for t in model.prompt_ids(messages) if t in controls)

    benign = control_count(shaped("plain", "words", "here"))
    assert control_count(shaped(hostile, hostile, hostile)) == benign
    assert control_count(shaped(halves[1], halves[0], halves[1])) == benign
    # The text itself is rendered exactly as transformers renders it, and is all in the prompt.
    messages = shaped(hostile, hostile, hostile)
    assert model.template.render(turns_of(messages), control_tokens=set(typed)) == reference_render(
        model, messages
    )
    prompt = tok.detokenize(model.prompt_ids([HumanMessage(hostile)]), special=True).decode()
    assert hostile in prompt


@pytest.mark.parametrize("case", RENDERABLE, ids=lambda c: c.name)
def test_an_empty_history_counts_zero_and_is_never_rendered(case: TemplateCase) -> None:
    model = chat_model(case, case.family)
    assert model.get_num_tokens_from_messages([]) == 0
    assert model.prompt_ids([]) == []


@pytest.mark.parametrize("case", RENDERABLE, ids=lambda c: c.name)
def test_bos_comes_once(case: TemplateCase) -> None:
    import llama_cpp

    model = chat_model(case, case.family)
    tok = model._tokenizer()
    ids = model.prompt_ids([HumanMessage("Hello")])
    bos = tok.token_bos()
    wants_bos = llama_cpp.llama_vocab_get_add_bos(tok._model.vocab)
    assert ids[:2] != [bos, bos]
    if wants_bos or case.renders_bos:
        assert ids[0] == bos


@pytest.mark.parametrize("case", RENDERABLE, ids=lambda c: c.name)
def test_case_data_says_what_each_template_does(case: TemplateCase) -> None:
    """The flags in template_cases.py, checked against transformers' own behaviour."""
    model = chat_model(case, case.family)
    system_first = turns_of(HISTORIES["system first"])

    def raises(turns: list[dict[str, str]]) -> bool:
        try:
            transformers_render(model, turns)
        except Exception:
            return True
        return False

    assert raises(system_first) == case.raises_on_system
    assert model.template.supports_system == (not case.raises_on_system)
    doubled = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert raises(doubled) == case.requires_alternation
    alone = model.template.render([{"role": "user", "content": "Hello"}])
    if case.default_system:
        assert case.default_system in alone
        assert case.default_system not in model.template.render(system_first)
    if case.preamble:
        assert case.preamble in alone
        assert case.preamble in model.template.render(system_first)
    probe = transformers_stub(case.source, "<BOS-PROBE>", "<EOS-PROBE>")
    rendered = probe.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<BOS-PROBE>") == case.renders_bos


@pytest.mark.parametrize(
    "case", [c for c in RENDERABLE if c.raises_on_system], ids=lambda c: c.name
)
def test_templates_that_raise_on_a_system_message_get_it_merged(case: TemplateCase) -> None:
    model = chat_model(case, case.family)
    messages = [SystemMessage("RULES"), HumanMessage("question")]
    merged = [{"role": "user", "content": "RULES\n\nquestion"}]
    assert model.template.render(turns_of(messages)) == transformers_render(model, merged)


@pytest.mark.parametrize(
    "case", [c for c in RENDERABLE if c.requires_alternation], ids=lambda c: c.name
)
def test_templates_that_raise_on_repeated_roles_get_them_merged(case: TemplateCase) -> None:
    model = chat_model(case, case.family)
    messages = [HumanMessage("a"), HumanMessage("b"), AIMessage("c"), HumanMessage("d")]
    merged = [
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    assert model.template.render(turns_of(messages)) == transformers_render(model, merged)
    assert model.get_num_tokens_from_messages(messages) == len(model.prompt_ids(messages)) > 0


@pytest.mark.parametrize("case", [c for c in TEMPLATE_CASES if c.needs_tools], ids=lambda c: c.name)
def test_a_template_that_needs_tools_fails_with_one_clear_line(case: TemplateCase) -> None:
    with pytest.raises(TemplateError, match="failed to render") as err:
        chat_model(case, case.family).prompt_ids([HumanMessage("Hello")])
    assert "\n" not in str(err.value)
    with pytest.raises(Exception, match="not iterable"):
        transformers_render(chat_model(case, case.family), [{"role": "user", "content": "Hello"}])


# ---------------------------------------------------------------------------- real evaluation
EVALUATED = ["HuggingFaceTB-SmolLM2-135M-Instruct", "google-gemma-2-2b-it"]


@pytest.mark.parametrize("name", EVALUATED)
def test_counted_tokens_are_the_tokens_llama_cpp_evaluates(name: str) -> None:
    """On SmolLM2's weights: its own GGUF template (the demo model's path, no chat_format), and
    a template that needs the system text merged."""
    case = next(c for c in TEMPLATE_CASES if c.name == name)
    own = case.source == smollm2_file_template()
    model = ChatLlamaCpp(
        model_path=str(smollm2_file()),
        chat_format=None if own else case.source,
        n_ctx=512,
        temperature=0,
        max_tokens=1,
    )
    messages = HISTORIES["system first"]
    counted = model.get_num_tokens_from_messages(messages)
    result = model.invoke(messages)
    llama = model.load()
    assert result.usage_metadata["input_tokens"] == counted
    assert llama.n_tokens == counted
    assert llama._input_ids.tolist() == model.prompt_ids(messages)
    assert model.template.name == ("gguf" if own else "custom")


def smollm2_file_template() -> str:
    from localbot.gguf_file import read_gguf

    return read_gguf(smollm2_file()).chat_template or ""
