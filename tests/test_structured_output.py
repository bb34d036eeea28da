"""Structured output: JSON schemas become llama.cpp grammars, so replies parse and validate.

The fast tier checks the grammar builder without a model: what it refuses (and says so), and that
its number rules accept exactly the numbers a schema allows. The model tier generates with the real
llama.cpp: twenty schemas on the Gemma 3 270M base model (greedy), whose replies must all parse
and validate; then ``with_structured_output``'s methods on SmolLM2.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.exceptions import OutputParserException
from pydantic import BaseModel, Field
from schema_cases import CASES
from typing_extensions import TypedDict

from localbot import ChatLlamaCpp, ConfigError
from localbot.gbnf_rules import integer_rule, json_safe_pattern, number_rule
from localbot.grammar import schema_grammar
from localbot.structured import grammar_for, json_schema_of


def _validate(schema: Any, value: Any) -> None:
    """Validate with the reference implementation, formats included, and with Pydantic."""
    js = json_schema_of(schema)
    validator = jsonschema.Draft202012Validator
    validator(js, format_checker=validator.FORMAT_CHECKER).validate(value)
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        schema.model_validate(value)


# --------------------------------------------------------------------------- refused schemas
REFUSED = [
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "unique array items"),
    ({"type": "string", "format": "email"}, "string format 'email'"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "both pattern and minLength/maxLength"),
    ({"type": "object", "properties": {"a": {}}, "minProperties": 1}, "property counts"),
    ({"not": {"type": "null"}}, "negation"),
    ({"type": "number", "multipleOf": 2}, "multiples"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf without a discriminator"),
    ({"type": "number", "minimum": 0.5}, "not a whole number"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "lookaround"),
    ({"type": "string", "pattern": r"^a\bb$"}, "the escape \\b"),
    ({"type": "string", "pattern": '^a"b$'}, "a quote character"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required names not in"),
    ({"allOf": [{"type": "object"}, {"type": "object"}]}, "allOf with several schemas"),
    ({"type": "array", "prefixItems": [{}], "items": {"type": "integer"}}, "prefixItems followed"),
    ({"$ref": "https://example.com/s.json"}, "a reference outside this schema"),
    ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "conditionals"),
    ({"$ref": "#/$defs/a", "maxLength": 3, "$defs": {"a": {}}}, "keywords beside a $ref"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "property-name patterns"),
]


@pytest.mark.parametrize(("schema", "why"), REFUSED, ids=[w for _, w in REFUSED])
def test_a_schema_the_grammar_cannot_enforce_is_refused_with_the_reason(schema, why) -> None:
    with pytest.raises(ConfigError, match=re.escape(why)):
        schema_grammar(schema)


def test_the_refusal_names_where_in_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {}, "uniqueItems": True}},
    }
    with pytest.raises(ConfigError, match="at /properties/tags/uniqueItems"):
        schema_grammar(schema)


def test_with_structured_output_refuses_at_bind_time_before_loading_anything() -> None:
    class Tags(BaseModel):
        tags: set[str]  # uniqueItems

    model = ChatLlamaCpp(model_path="never-loaded.gguf")
    with pytest.raises(ConfigError, match="unique array items"):
        model.with_structured_output(Tags)


@pytest.mark.parametrize(("name", "schema", "prompt"), CASES, ids=[c[0] for c in CASES])
def test_every_case_schema_becomes_a_grammar(name: str, schema: Any, prompt: str) -> None:
    grammar = schema_grammar(json_schema_of(schema))
    assert grammar.count("root ::=") == 1


def test_response_format_in_openai_shape() -> None:
    assert grammar_for(None) is None
    assert grammar_for({"type": "text"}) is None
    assert "root ::= object" in grammar_for({"type": "json_object"})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    envelope = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert grammar_for(envelope) == schema_grammar(schema)
    with pytest.raises(ConfigError, match="response_format"):
        grammar_for({"type": "xml"})


# --------------------------------------------------------------------------- number rules
def _gbnf_to_regex(rule: str) -> str:
    """The GBNF subset the number rules use (literals, classes, groups, |, ?, {m,n})."""
    out = []
    for token in re.findall(r'"(?:[^"\\]|\\.)*"|\[[^\]]*\]|\{\d+(?:,\d*)?\}|[()|?*+]|\S', rule):
        out.append(re.escape(token[1:-1]) if token.startswith('"') else token)
    return "".join(out)


@settings(max_examples=300, deadline=None, database=None)
@given(
    lo=st.one_of(st.none(), st.integers(-5000, 5000)),
    span=st.integers(0, 3000),
    value=st.integers(-12000, 12000),
    unbounded_above=st.booleans(),
)
def test_integer_rule_accepts_exactly_the_integers_in_range(lo, span, value, unbounded_above):
    hi = None if unbounded_above else (lo if lo is not None else 0) + span
    regex = re.compile(_gbnf_to_regex(integer_rule(lo, hi)))
    inside = (lo is None or value >= lo) and (hi is None or value <= hi)
    assert bool(regex.fullmatch(str(value))) == inside
    assert not regex.fullmatch("0" + str(abs(value)))  # no leading zeros
    assert not regex.fullmatch("-0")


@settings(max_examples=300, deadline=None, database=None)
@given(
    lo=st.one_of(st.none(), st.integers(-100, 100)),
    span=st.integers(0, 200),
    lo_open=st.booleans(),
    hi_open=st.booleans(),
    value=st.decimals(min_value=-400, max_value=400, places=3, allow_nan=False),
)
def test_number_rule_accepts_exactly_the_numbers_in_range(lo, span, lo_open, hi_open, value):
    hi = (lo if lo is not None else 0) + span
    try:
        rule = number_rule(lo, lo_open, hi, hi_open)
    except ConfigError:  # an empty range, e.g. (3, 3)
        assert span == 0
        assert lo_open or hi_open
        return
    regex = re.compile(_gbnf_to_regex(rule))
    text = format(value, "f")
    above = lo is None or (value > lo if lo_open else value >= lo)
    below = value < hi if hi_open else value <= hi
    if regex.fullmatch(text):
        assert above, (text, rule)
        assert below, (text, rule)
    elif text.startswith("-0") and float(value) == 0:
        pass  # "-0.000" is left out; "0.000" is in
    else:
        assert not (above and below), (text, rule)


@pytest.mark.parametrize(
    ("pattern", "allowed", "refused"),
    [
        ("^[ -~]{1,5}$", ["a", "~!", "[]"], ['"', "\\", "\n"]),  # a range around " and \
        ("^[^a]$", ["b", "é"], ["a", '"', "\\", "\t"]),  # negated: never " \ or control
        ("^a.c$", ["abc", "a-c"], ['a"c', "a\\c", "a\nc"]),  # . likewise
        (r"^\d\w\s$", ["1a ", "9_\t"], ["a1 ", "1a\n"]),  # \s: no raw newline in JSON
        ("b+", ["b", "abc", "xbbx"], ["", "a"]),  # unanchored: anywhere in the string
    ],
)
def test_patterns_produce_only_text_a_json_string_holds_raw(pattern, allowed, refused) -> None:
    # The rewritten pattern is plain regex syntax too: check it with Python's re.
    safe = re.compile(json_safe_pattern(pattern, ""))
    for text in allowed:
        assert safe.fullmatch(text), text
    for text in refused:
        assert not safe.fullmatch(text), text


# --------------------------------------------------------------------------- real generation
@pytest.fixture(scope="module")
def gemma(test_model_path) -> ChatLlamaCpp:
    # Greedy: the assertions are on structure, and greedy runs are repeatable.
    return ChatLlamaCpp(model_path=str(test_model_path), n_ctx=1024, temperature=0, max_tokens=96)


@pytest.mark.parametrize(("name", "schema", "prompt"), CASES, ids=[c[0] for c in CASES])
def test_the_base_model_writes_valid_json_for_each_schema(gemma, name, schema, prompt) -> None:
    result = gemma.with_structured_output(schema, include_raw=True).invoke(prompt)
    assert result["parsing_error"] is None, result["raw"].content
    _validate(schema, json.loads(result["raw"].content))


class Joke(BaseModel):
    """Joke to tell user."""

    setup: str = Field(max_length=40, description="question to set up a joke")
    punchline: str = Field(max_length=40, description="answer to resolve the joke")


class JokeDict(TypedDict):
    """Joke to tell user."""

    setup: str
    punchline: str


@pytest.fixture(scope="module")
def smol(smol_model_path) -> ChatLlamaCpp:
    return ChatLlamaCpp(model_path=str(smol_model_path), n_ctx=1024, temperature=0, max_tokens=80)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_pydantic_schema_gives_a_pydantic_object(smol, method) -> None:
    joke = smol.with_structured_output(Joke, method=method).invoke("Tell me a joke about cats.")
    assert isinstance(joke, Joke)


def test_typeddict_and_json_schema_give_dicts(smol) -> None:
    for schema in (JokeDict, Joke.model_json_schema()):
        result = smol.with_structured_output(schema).invoke("Tell me a short joke about cats.")
        assert isinstance(result, dict)
        assert set(result) == {"setup", "punchline"}


def test_json_mode_gives_a_json_object(smol) -> None:
    result = smol.with_structured_output(None, method="json_mode").invoke(
        'Reply with a JSON object with the key "animal".'
    )
    assert isinstance(result, dict)


def test_streaming_yields_the_whole_object_once(smol) -> None:
    chunks = list(smol.with_structured_output(Joke).stream("Tell me a joke about dogs."))
    assert len(chunks) == 1
    assert isinstance(chunks[0], Joke)


def test_a_reply_cut_off_by_max_tokens_says_to_raise_max_tokens(smol) -> None:
    short = smol.model_copy(update={"max_tokens": 4})  # shares the loaded model
    with pytest.raises(OutputParserException, match="raise max_tokens"):
        short.with_structured_output(Joke).invoke("Tell me a joke.")


def test_include_raw_keeps_the_message_and_the_error(smol) -> None:
    chain = smol.with_structured_output(Joke, include_raw=True)
    good = chain.invoke("Tell me a joke about cats.")
    assert isinstance(good["parsed"], Joke)
    assert good["parsing_error"] is None
    assert good["raw"].usage_metadata["output_tokens"] > 0
    short = smol.model_copy(update={"max_tokens": 4})
    cut = short.with_structured_output(Joke, include_raw=True).invoke("Tell me a joke.")
    assert cut["parsed"] is None
    assert isinstance(cut["parsing_error"], OutputParserException)
    assert cut["raw"].response_metadata["finish_reason"] == "length"


@pytest.mark.parametrize("model_fixture", ["smol_model_path", "test_model_path"])
def test_greedy_grammar_sampling_matches_llama_cpp_grammar_first(model_fixture, request) -> None:
    """localbot checks the grammar only for the tokens it is about to pick (fast); llama-cpp-
    python's own path applies it to the whole vocabulary first (slow). Greedy, they agree."""
    import llama_cpp

    from localbot.grammar_sampler import GrammarSampler, use_sampler
    from localbot.runtime import load_llama

    llama = load_llama(request.getfixturevalue(model_fixture), verbose=False, n_ctx=512)
    prompt = llama.tokenize(b"A JSON record of a customer in Paris:\n", add_bos=True)
    grammar = schema_grammar(json_schema_of(CASES[1][1]))  # nested objects and a pattern

    def run(**kwargs: Any) -> list[int]:
        llama.reset()
        out = []
        for token in llama.generate(prompt, temp=0.0, **kwargs):
            if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token) or len(out) >= 80:
                break
            out.append(token)
        return out

    stock = run(grammar=llama_cpp.LlamaGrammar.from_string(grammar))
    sampler = GrammarSampler(llama, grammar, 0, temp=0.0)
    undo = use_sampler(llama, sampler)
    try:
        ours = run()
    finally:
        undo()
        sampler.close()
    assert ours == stock
    json.loads(llama.detokenize(ours).decode())
