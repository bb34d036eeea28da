"""Chat templates without a model: the Jinja environment transformers users get, pieces and
markers, the merges that keep strict templates working, the built-in choice, the bounds on
hostile templates, and how pieces become token ids (with a fake tokenizer)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from template_cases import transformers_stub

from localbot.builtin_templates import BUILTIN_TEMPLATES
from localbot.errors import TemplateError
from localbot.prompt_tokens import SpecialTokens, _trie_pattern, encode
from localbot.template_choice import choose_builtin
from localbot.templates import (
    MARK_START,
    ChatTemplate,
    Piece,
    max_chars_for_context,
    merge_consecutive,
    merge_system,
)

USER = [{"role": "user", "content": "Hello"}]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": " Hello!\n"},
    {"role": "user", "content": "Bye"},
]


def transformers_render(source: str, messages: list[dict[str, str]]) -> str:
    return transformers_stub(source).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def ours(source: str, messages: list[dict[str, str]] = USER, **kwargs: Any) -> str:
    return ChatTemplate(source, "test", "<s>", "</s>", **kwargs).render(messages)


# ---------------------------------------------------------------------------- transformers' env
MIRRORED = {
    "tojson does not escape HTML": "{{ {'a': '<b> & \"c\"', 'ü': 1} | tojson }}",
    "tojson options": "{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=true) }}",
    "loop controls": "{% for i in range(6) %}{% if i == 1 %}{% continue %}{% endif %}"
    "{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}",
    "generation tag": "{% for m in messages %}{% generation %}[{{ m.content }}]"
    "{% endgeneration %}{% endfor %}",
    "trim and lstrip blocks": "  {% if true %}\n  a\n  {% endif %}\n{{ bos_token }}|{{ eos_token }}"
    "{{ '\n' }}",
    "tools and documents are none": "{{ tools is defined }} {{ tools is none }} "
    "{{ documents is none }} {{ add_generation_prompt }}",
    "dict and namespace": "{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}"
    "{{ ns.n }} {{ dict(a=1, b=2) | dictsort }}",
    "string methods": "{{ messages[0].content.strip().upper().split('L') | join('-') }}",
    "date": "{{ strftime_now('%Y-%m') }}",
    "trailing newline dropped": "{{ messages | length }}\n",
}


@pytest.mark.parametrize("source", MIRRORED.values(), ids=list(MIRRORED))
def test_the_environment_renders_what_transformers_renders(source: str) -> None:
    messages = [{"role": "user", "content": " hello world "}]
    assert ours(source, messages) == transformers_render(source, messages)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_render_what_transformers_renders(name: str) -> None:
    source = BUILTIN_TEMPLATES[name]
    template = ChatTemplate.builtin(name, "<s>", "</s>")
    turns = CHAT if template.supports_system else merge_system(CHAT)
    assert template.render(CHAT) == transformers_render(source, turns)


def test_underscore_names_on_a_namespace_are_refused() -> None:
    with pytest.raises(TemplateError, match="underscore"):
        ours("{% set ns = namespace(_x=1) %}{{ messages[0].content }}")


def test_python_internals_stay_out_of_reach() -> None:
    with pytest.raises(TemplateError, match="failed to render"):
        ours("{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0].content }}")


# ---------------------------------------------------------------------------- pieces and markers
CHATML = BUILTIN_TEMPLATES["chatml"]


def test_typed_control_tokens_become_plain_pieces_and_the_text_is_unchanged() -> None:
    template = ChatTemplate(CHATML, "chatml")
    turns = [{"role": "user", "content": "a <|im_end|> b <|im_start|>"}]
    pieces = template.pieces(turns, control_tokens={"<|im_end|>", "<|im_start|>"})
    assert [p.text for p in pieces if p.plain] == ["<|im_end|>", "<|im_start|>"]
    assert "".join(p.text for p in pieces) == template.render(turns)
    assert template.render(turns, control_tokens={"<|im_end|>"}) == transformers_render(
        CHATML, turns
    )
    # Without control tokens to protect, the render is one markup piece.
    assert template.pieces(USER) == [Piece(template.render(USER))]


def test_longest_control_token_wins() -> None:
    template = ChatTemplate("{{ messages[0].content }}", "t")
    pieces = template.pieces(
        [{"role": "user", "content": "<|a|><|ab|>"}], control_tokens={"<|a|>", "<|ab|>"}
    )
    assert [p for p in pieces if p.plain] == [Piece("<|a|>", True), Piece("<|ab|>", True)]


def test_marker_characters_typed_in_a_message_are_removed() -> None:
    template = ChatTemplate(CHATML, "chatml")
    turns = [{"role": "user", "content": f"x{MARK_START}y\ufdd1z"}]
    assert "xyz" in template.render(turns)


def test_a_template_containing_marker_characters_is_refused_at_load() -> None:
    with pytest.raises(TemplateError, match="U\\+FDD0"):
        ChatTemplate("\ufdd0{{ messages[0].content }}", "gguf", origin="from the GGUF")


def test_a_template_printing_private_use_characters_is_fine() -> None:
    # The old sentinels (U+E000/U+E001) are ordinary text now: no IndexError, no ValueError.
    source = "{{ '\ue0000\ue001' }}{{ messages[0].content }}\ue00099\ue001"
    assert ours(source) == "\ue0000\ue001Hello\ue00099\ue001"


def test_markers_a_template_makes_at_run_time_only_cut_the_text() -> None:
    template = ChatTemplate("{{ '%c' % 0xFDD0 }}{{ messages[0].content }}", "t")
    assert template.pieces(USER) == [Piece("", plain=True), Piece("Hello")]


def test_a_template_cutting_a_marked_token_leaves_plain_text_around_the_cut() -> None:
    template = ChatTemplate("<x>{{ messages[0].content[:3] }}<y>", "t")
    turns = [{"role": "user", "content": "<|im_end|>"}]
    pieces = template.pieces(turns, control_tokens={"<|im_end|>"})
    assert "".join(p.text for p in pieces) == "<x><|<y>"
    assert any(p.plain for p in pieces)


def test_an_empty_history_is_never_rendered() -> None:
    template = ChatTemplate("{{ messages[0].content }}", "t")  # raises on []
    assert template.pieces([]) == []
    assert template.render([]) == ""


# ---------------------------------------------------------------------------- merges
STRICT = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "[{{ m.role }}:{{ m.content }}]{% endfor %}"
)


def test_a_system_message_is_merged_where_the_template_raises_on_it() -> None:
    template = ChatTemplate(STRICT, "strict")
    assert not template.supports_system
    assert template.render(CHAT) == "[user:Be brief.\n\nHi][assistant: Hello!\n][user:Bye]"


def test_a_system_message_the_template_silently_drops_is_merged() -> None:
    source = "{% for m in messages if m.role != 'system' %}[{{ m.content }}]{% endfor %}"
    template = ChatTemplate(source, "drops")
    assert not template.supports_system
    assert template.render(CHAT[:2]) == "[Be brief.\n\nHi]"


def test_repeated_roles_are_merged_only_when_the_template_raises() -> None:
    turns = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert ChatTemplate(STRICT, "strict").render(turns) == "[user:a\n\nb][assistant:c\n\nd]"
    lenient = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    assert ChatTemplate(lenient, "lenient").render(turns) == "[a][b][c][d]"


def test_a_template_that_fails_anyway_is_one_clear_line_naming_its_origin() -> None:
    source = "{% if messages | length > 1 %}{{ raise_exception('no\\nway') }}{% endif %}ok"
    template = ChatTemplate(source, "gguf", origin="from the GGUF")
    with pytest.raises(TemplateError) as err:
        template.render(CHAT)
    message = str(err.value)
    assert message == "chat template 'gguf' (from the GGUF) failed to render: no way"


def test_merge_system_keeps_every_text() -> None:
    assert merge_system(CHAT)[0] == {"role": "user", "content": "Be brief.\n\nHi"}
    assert merge_system([{"role": "system", "content": "S"}]) == [{"role": "user", "content": "S"}]
    assert merge_system([{"role": "system", "content": ""}, *USER]) == USER
    two = [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, *USER]
    assert merge_system(two) == [{"role": "user", "content": "A\n\nB\n\nHello"}]


def test_merge_consecutive_joins_runs_with_a_blank_line() -> None:
    turns = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": ""},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    assert merge_consecutive(turns) == [
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c"},
    ]
    assert merge_consecutive(CHAT) == CHAT


# ---------------------------------------------------------------------------- built-in choice
@pytest.mark.parametrize(
    ("architecture", "vocab", "expected"),
    [
        ("gemma3", set(), "gemma"),
        ("qwen2", set(), "chatml"),
        ("phi3", set(), "phi3"),
        ("llama", {"<|eot_id|>"}, "llama3"),
        ("llama", {"<|im_start|>"}, "chatml"),
        ("llama", {"[INST]"}, "mistral"),
        ("llama", set(), "chatml"),
        ("unknown-arch", set(), "chatml"),
    ],
)
def test_choose_builtin(architecture: str, vocab: set[str], expected: str) -> None:
    assert choose_builtin(architecture, vocab.__contains__) == expected


def test_origin_is_kept_for_display() -> None:
    assert ChatTemplate(CHATML, "gguf", origin="from the GGUF").origin == "from the GGUF"
    assert ChatTemplate.builtin("chatml").origin == "built-in chatml"
    described = ChatTemplate.builtin("chatml", origin="built-in chatml for architecture llama")
    assert described.origin == "built-in chatml for architecture llama"
    assert "for architecture llama" in described.label


# ---------------------------------------------------------------------------- bounds
HOSTILE = {
    "huge string product": ("{{ 'x' * 10**9 }}", "more than"),
    "huge literal product": ("{{ 'x' * 1000000000 }}", "more than"),
    "huge padding": ("{{ 'x' | center(1000000000) }}", "more than"),
    "huge format width": ("{{ '{:>1000000000}'.format('x') }}", "more than"),
    "huge percent width": ("{{ '%1000000000s' % 'x' }}", "more than"),
    "doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "more than",
    ),
    "replace bomb": ("{% set s = 'x' * 50000 %}{{ s.replace('', s) }}", "more than"),
    "join bomb": ("{% set s = 'x' * 50000 %}{{ ([s] * 1000) | join }}", "more than"),
    "printed list bomb": ("{% set s = 'x' * 50000 %}{{ [s] * 1000 }}", "more than"),
    "huge number": ("{{ 10 ** (10 ** 10) }}", "number wider"),
    "nested loops that print": (
        "{% for i in range(100000) %}{% for j in range(100000) %}xx{% endfor %}{% endfor %}",
        "more than",
    ),
    "nested loops that print nothing": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "longer than",
    ),
    "nested loops that compute": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% set k = i * j %}"
        "{% endfor %}{% endfor %}",
        "longer than",
    ),
    "endless recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
}


@pytest.mark.parametrize(("source", "reason"), HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_templates_stop_fast_with_one_line(source: str, reason: str) -> None:
    start = time.perf_counter()
    with pytest.raises(TemplateError) as err:
        # The error comes at load: the system-role probe is a render too.
        ChatTemplate(source, "gguf", origin="from the GGUF", max_chars=100_000, seconds=0.3)
    assert time.perf_counter() - start < 2.0
    message = str(err.value)
    assert message.startswith("chat template 'gguf' (from the GGUF) was stopped: ")
    assert reason in message
    assert "\n" not in message


def test_a_big_product_is_not_computed_at_compile_time() -> None:
    # Jinja's optimizer would fold a constant product into the compiled code.
    from localbot.template_sandbox import compile_template

    start = time.perf_counter()
    compile_template("{% if messages | length > 99 %}{{ 'x' * 10**9 }}{% endif %}ok")
    assert time.perf_counter() - start < 0.5
    source = "{% if messages | length > 99 %}{{ 'x' * 10**9 }}{% endif %}{{ messages[0].content }}"
    assert ours(source) == "Hello"


def test_a_syntax_error_is_one_line_with_its_line_number() -> None:
    with pytest.raises(TemplateError) as err:
        ChatTemplate("{{ messages }}\n{% if %}", "gguf", origin="from the GGUF")
    assert str(err.value) == (
        "chat template 'gguf' (from the GGUF) does not compile: "
        "Expected an expression, got 'end of statement block' (line 2)"
    )


def test_absurd_nesting_is_a_clear_error() -> None:
    source = "{% if true %}" * 3000 + "x" + "{% endif %}" * 3000
    with pytest.raises(TemplateError, match="nests too deeply"):
        ChatTemplate(source, "gguf")


def test_a_template_that_renders_nothing_is_a_clear_error() -> None:
    template = ChatTemplate("{% if messages | length > 5 %}{{ messages }}{% endif %}", "gguf")
    with pytest.raises(TemplateError, match="rendered nothing for 1 message"):
        template.pieces(USER)


def test_long_real_histories_fit_the_allowance() -> None:
    # The allowance grows with the messages' own text: a long session is not a hostile template.
    template = ChatTemplate(CHATML, "chatml", max_chars=max_chars_for_context(512))
    turns = [{"role": "user", "content": "x" * 100_000}] * 20
    assert len(template.render(turns)) > 2_000_000


# ---------------------------------------------------------------------------- pieces to ids
def fake_tokenize(text: str, special: bool) -> tuple[str, ...]:
    """Records each call: one 'id' per call, naming the mode and the text."""
    return (f"{'S' if special else 'P'}:{text}",)


SPECIALS = SpecialTokens(
    cut=_trie_pattern(["<a>", "<ab>", "<r>", "<l>", "\n"]),
    control=frozenset({"<a>", "<ab>", "<r>", "<l>"}),
    lstrip=frozenset({"<l>"}),
    rstrip=frozenset({"<r>"}),
)


def test_the_trie_pattern_finds_the_longest_token() -> None:
    pattern = _trie_pattern(["<a>", "<ab>", "<abc>", "x"])
    assert pattern is not None
    assert pattern.findall("<ab><abc><a>x<abd>") == ["<ab>", "<abc>", "<a>", "x"]
    assert _trie_pattern([]) is None


def test_markup_is_cut_at_special_tokens_and_each_stretch_tokenized_alone() -> None:
    ids = encode([Piece("<a>user\nhi there<ab>")], SPECIALS, fake_tokenize)
    assert ids == ["S:<a>", "S:user", "S:\n", "S:hi there", "S:<ab>"]


def test_lstrip_and_rstrip_tokens_eat_the_whitespace_beside_them() -> None:
    # "\n" is a (shorter) special token too, but llama.cpp strips before it cuts there.
    ids = encode([Piece("<r> \n\tx  <l>y<r>z")], SPECIALS, fake_tokenize)
    assert ids == ["S:<r>", "S:x", "S:<l>", "S:y", "S:<r>", "S:z"]
    assert encode([Piece("a\n<r>\n")], SPECIALS, fake_tokenize) == ["S:a", "S:\n", "S:<r>"]
    assert encode([Piece("<r> \nx\n")], SPECIALS, fake_tokenize) == ["S:<r>", "S:x", "S:\n"]


def test_typed_control_text_joins_its_stretch_as_plain_text() -> None:
    pieces = [Piece("<a>say "), Piece("<ab>", plain=True), Piece(" now<a>")]
    ids = encode(pieces, SPECIALS, fake_tokenize)
    # One stretch, tokenized without special tokens: no break, no extra space around the text.
    assert ids == ["S:<a>", "P:say <ab> now", "S:<a>"]


def test_a_lone_marker_makes_its_stretch_plain() -> None:
    # A template cut a typed "<ab>" apart; its halves meet again but stay text.
    pieces = [Piece("<a>x<"), Piece("", plain=True), Piece("ab>y<a>")]
    assert encode(pieces, SPECIALS, fake_tokenize) == ["S:<a>", "P:x<ab>y", "S:<a>"]


def test_control_tokens_in_messages_are_found_but_not_other_specials() -> None:
    assert SPECIALS.controls_in(["x <ab> \n <a>", "<r>"]) == {"<ab>", "<a>", "<r>"}
    assert SPECIALS.controls_in(["plain\ntext"]) == frozenset()


def test_real_templates_render_long_histories_within_the_bounds() -> None:
    from template_cases import TEMPLATE_CASES

    turns = [
        {"role": role, "content": f"{role} message {i} " * 5}
        for i in range(300)
        for role in ("user", "assistant")
    ]
    for case in TEMPLATE_CASES:
        if not case.needs_tools:
            template = ChatTemplate(case.source, case.name, "<s>", "</s>")
            assert len(template.render([*turns, {"role": "user", "content": "end"}])) > 50_000
