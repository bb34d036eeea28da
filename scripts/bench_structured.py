"""Grammar-constrained generation speed, and what tool definitions cost in prompt tokens.

Speed: for each model, the same prompt in the same process, rounds alternating between

* ``free``: no grammar (llama-cpp-python's own sampler chain);
* ``localbot``: a JSON-schema grammar through ``localbot.grammar_sampler`` (sample, then check the
  one chosen token against the grammar; the whole vocabulary only when it is rejected);
* ``stock``: the same grammar through ``Llama.generate(grammar=...)`` (grammar applied to the
  whole vocabulary at every token), for comparison.

Greedy decoding; generation tokens/s is (tokens - 1) / (time from first to last token), the
median over the rounds. Unconstrained rounds generate a fixed number of tokens; constrained ones
stop where the JSON ends (about the same length, by the schema's fixed item count).

Prompt cost: tokens of a short conversation with and without 1 and 3 tool definitions, through the
built-in format (a template without ``tools``) and through real tool-aware templates.

Run: ``python scripts/bench_structured.py [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 16},
            "minItems": 8,
            "maxItems": 8,
        },
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["title", "year", "tags", "rating"],
}
PROMPT = "Describe a film as JSON: its title, year, tags and rating.\n"


def _round(llama, prompt_ids, max_new: int, mode: str, grammar: str) -> tuple[int, float]:
    import llama_cpp

    from localbot.grammar_sampler import GrammarSampler, use_sampler
    from localbot.llama_cache import vocab_handle

    llama.reset()
    llama._ctx.kv_cache_clear()
    kwargs = {"temp": 0.0}
    undo = sampler = None
    if mode == "localbot":
        sampler = GrammarSampler(llama, grammar, 0, temp=0.0)
        undo = use_sampler(llama, sampler)
    elif mode == "stock":
        kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(grammar)
    vocab = vocab_handle(llama)
    n, first, last = 0, None, None
    try:
        for token in llama.generate(prompt_ids, **kwargs):
            now = time.perf_counter()
            first = first or now
            last = now
            if mode != "free" and llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            n += 1
            if n >= max_new:
                break
    finally:
        if undo and sampler:
            undo()
            sampler.close()
    return n, (n - 1) / (last - first) if n > 1 and last > first else 0.0


def speed(model_path: Path, rounds: int) -> list[tuple[str, int, float]]:
    from localbot.grammar import schema_grammar
    from localbot.runtime import load_llama

    llama = load_llama(model_path, verbose=False, n_ctx=1024, n_batch=512)
    prompt_ids = llama.tokenize(PROMPT.encode(), add_bos=True)
    grammar = schema_grammar(SCHEMA)
    results: dict[str, list[tuple[int, float]]] = {"free": [], "localbot": [], "stock": []}
    _round(llama, prompt_ids, 8, "free", grammar)  # warm-up
    for _ in range(rounds):
        lengths = []
        for mode in ("localbot", "stock"):
            results[mode].append(_round(llama, prompt_ids, 400, mode, grammar))
            lengths.append(results[mode][-1][0])
        results["free"].append(_round(llama, prompt_ids, max(lengths), "free", grammar))
    return [
        (mode, int(statistics.median(n for n, _ in runs)), statistics.median(r for _, r in runs))
        for mode, runs in results.items()
    ]


def tool_cost() -> list[tuple[str, int | None, int, int]]:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_core.tools import tool
    from model_file import gemma_model_file, smollm2_model_file

    from localbot import ChatLlamaCpp
    from localbot.errors import TemplateError

    @tool
    def get_weather(city: str, unit: str = "celsius") -> str:
        """Get the current weather in a city, in celsius or fahrenheit."""
        return ""

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @tool
    def search(query: str, max_results: int = 5) -> list[str]:
        """Search the web and return the titles of the top results."""
        return []

    messages = [SystemMessage("You are a helpful assistant."), HumanMessage("Hi! What's new?")]
    templates = ROOT / "tests" / "templates"
    setups = [
        ("SmolLM2 ChatML (built-in format)", smollm2_model_file(), None),
        ("Gemma 3 (built-in format)", gemma_model_file(), None),
        ("Qwen 2.5 template, SmolLM2 vocab", smollm2_model_file(), "Qwen-Qwen2.5-7B-Instruct"),
        (
            "Hermes 3 template, SmolLM2 vocab",
            smollm2_model_file(),
            "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
        ),
    ]
    rows = []
    for label, path, template in setups:
        fmt = (templates / f"{template}.jinja").read_text() if template else None
        model = ChatLlamaCpp(model_path=str(path), chat_format=fmt)
        one = model.get_num_tokens_from_messages(messages, tools=[get_weather])
        three = model.get_num_tokens_from_messages(messages, tools=[get_weather, add, search])
        try:
            bare = model.get_num_tokens_from_messages(messages)
        except TemplateError:  # Hermes' tool-use template renders only with tools
            rows.append((label, None, one, three))
            continue
        rows.append((label, bare, one - bare, three - bare))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from model_file import gemma_model_file, smollm2_model_file

    print("| model (vocabulary) | sampling | tokens | generation tokens/s | vs free |")
    print("|---|---|---|---|---|")
    for label, path in (
        ("Gemma 3 270M (262,144)", gemma_model_file()),
        ("SmolLM2 135M (49,152)", smollm2_model_file()),
    ):
        rows = speed(path, args.rounds)
        free = {m: r for m, _, r in rows}["free"]
        for mode, n, rate in rows:
            print(f"| {label} | {mode} | {n} | {rate:.1f} | {rate / free:.0%} |")
    print()
    print("| prompt | tokens without tools | + 1 tool | + 3 tools |")
    print("|---|---|---|---|")
    for label, bare, one, three in tool_cost():
        if bare is None:  # no prompt without tools: the totals
            print(f"| {label} | (needs tools) | {one} in all | {three} in all |")
        else:
            print(f"| {label} | {bare} | +{one} | +{three} |")


if __name__ == "__main__":
    main()
