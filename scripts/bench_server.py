#!/usr/bin/env python3
"""Benchmark: the same prompts through the server's HTTP API (streamed) and in process.

    python scripts/bench_server.py             # SmolLM2 (the demo model), 12 prompts alone,
                                               # 3 rounds of 4 concurrent clients
    python scripts/bench_server.py --quick     # a smoke run
    python scripts/bench_server.py --model X.gguf --max-tokens 128

What runs
---------
One ``python -m localbot serve`` process (loopback, a free port) and one ``ChatLlamaCpp`` in this
process, on the same model file with the same context size, threads and greedy decoding. Each
prompt (a distinct question after a shared system prompt, so both sides see the same KV-cache
reuse) goes to both, alternating which goes first, so a busy machine disturbs both alike:

* **HTTP**: ``POST /v1/chat/completions`` with ``stream: true`` through httpx, stateless.
  TTFT is from sending the request to the first SSE event carrying text; generation tokens/s is
  (completion tokens - 1) / (time of the last text event - time of the first).
* **in process**: ``model.stream(messages, max_tokens=...)``, the same two times around the chunks.

"Alone" sends one request at a time. "4 concurrent" starts 4 clients at once (4 threads, each its
own prompt) on each side; the model serves one at a time, so a client's TTFT includes its wait in
the queue, and "throughput" is all generated tokens over the round's wall time.

The targets (issue 10): HTTP generation tokens/s at least 95% of in-process, and the median TTFT
overhead (HTTP minus in process, paired per prompt) under 30 ms. Raw numbers go to
``--out``/bench_server.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SYSTEM = "You are a helpful assistant. Answer in a few sentences."
TOPICS = [
    "volcanoes",
    "the moon",
    "bread",
    "honeybees",
    "glaciers",
    "the violin",
    "chess",
    "tides",
    "coffee",
    "lighthouses",
    "octopuses",
    "paper",
    "rainbows",
    "bicycles",
    "salt",
    "owls",
    "deserts",
    "clocks",
    "whales",
    "silk",
    "thunder",
    "maps",
    "tea",
    "bridges",
]


def prompts(count: int, offset: int = 0) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Tell me about {TOPICS[(offset + i) % len(TOPICS)]}."},
        ]
        for i in range(count)
    ]


# ---------------------------------------------------------------------- one request
def run_http(http, url: str, messages: list[dict], max_tokens: int) -> dict:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return _figures(start, first, last, tokens)


def run_local(model, messages: list[dict], max_tokens: int) -> dict:
    from langchain_core.messages import convert_to_messages

    start = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in model.stream(convert_to_messages(messages), max_tokens=max_tokens):
        if chunk.usage_metadata:
            tokens = chunk.usage_metadata["output_tokens"]
        if chunk.text:
            last = time.perf_counter()
            first = first or last
    return _figures(start, first, last, tokens)


def _figures(start: float, first: float | None, last: float | None, tokens: int) -> dict:
    first = first or time.perf_counter()
    last = last or first
    gen = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {"ttft_s": first - start, "gen_tps": gen, "tokens": tokens, "end": last}


# ---------------------------------------------------------------------- scenarios
def alone(model, http, url: str, count: int, max_tokens: int) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {"http": [], "local": []}
    for i, messages in enumerate(prompts(count)):
        order = ["local", "http"] if i % 2 == 0 else ["http", "local"]
        for side in order:
            if side == "http":
                results["http"].append(run_http(http, url, messages, max_tokens))
            else:
                results["local"].append(run_local(model, messages, max_tokens))
    return results


def concurrent(model, url: str, rounds: int, clients: int, max_tokens: int) -> dict:
    import httpx

    results: dict = {"http": [], "local": [], "http_wall": [], "local_wall": []}
    for r in range(rounds):
        batch = prompts(clients, offset=r * clients + 7)
        order = ["local", "http"] if r % 2 == 0 else ["http", "local"]
        for side in order:
            out: list[dict | None] = [None] * clients
            http_clients = [httpx.Client(timeout=600) for _ in range(clients)]

            def work(i: int, side=side, out=out, hc=http_clients, batch=batch) -> None:
                if side == "http":
                    out[i] = run_http(hc[i], url, batch[i], max_tokens)
                else:
                    out[i] = run_local(model, batch[i], max_tokens)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            for hc in http_clients:
                hc.close()
            results[side].extend(out)
            results[f"{side}_wall"].append((wall, sum(o["tokens"] for o in out)))
    return results


# ---------------------------------------------------------------------- report
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(alone_results: dict, conc: dict, clients: int) -> str:
    rows = []

    def add(label: str, local: float, http: float, compare: str) -> None:
        rows.append(f"| {label} | {local:.1f} | {http:.1f} | {compare} |")

    a_local, a_http = alone_results["local"], alone_results["http"]
    ttft_l = median([x["ttft_s"] * 1000 for x in a_local])
    ttft_h = median([x["ttft_s"] * 1000 for x in a_http])
    paired = median(
        [(h["ttft_s"] - lo["ttft_s"]) * 1000 for h, lo in zip(a_http, a_local, strict=False)]
    )
    gen_l = median([x["gen_tps"] for x in a_local])
    gen_h = median([x["gen_tps"] for x in a_http])
    add("alone: TTFT median, ms", ttft_l, ttft_h, f"+{paired:.1f} ms (paired median; target < 30)")
    add(
        "alone: generation tok/s, median",
        gen_l,
        gen_h,
        f"{100 * gen_h / gen_l:.1f}% (target >= 95%)",
    )
    c_local, c_http = conc["local"], conc["http"]
    add(
        f"{clients} concurrent: TTFT median, ms",
        median([x["ttft_s"] * 1000 for x in c_local]),
        median([x["ttft_s"] * 1000 for x in c_http]),
        "includes the wait in the queue",
    )
    cg_l, cg_h = median([x["gen_tps"] for x in c_local]), median([x["gen_tps"] for x in c_http])
    add(f"{clients} concurrent: generation tok/s, median", cg_l, cg_h, f"{100 * cg_h / cg_l:.1f}%")
    thr_l = sum(t for _, t in conc["local_wall"]) / sum(w for w, _ in conc["local_wall"])
    thr_h = sum(t for _, t in conc["http_wall"]) / sum(w for w, _ in conc["http_wall"])
    add(f"{clients} concurrent: throughput tok/s", thr_l, thr_h, f"{100 * thr_h / thr_l:.1f}%")
    head = "| measure | in process | HTTP (streamed) | HTTP vs in process |\n|---|---|---|---|"
    return head + "\n" + "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GGUF file (default: the bundled SmolLM2)")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=12, help="prompts sent alone")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of concurrent clients")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--threads", type=int, help="CPU threads, both sides")
    parser.add_argument("--quick", action="store_true", help="4 prompts, 1 round, 24 tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.rounds, args.max_tokens = 4, 1, 24

    import httpx
    from serving import ServerProcess

    from localbot.chat_model import ChatLlamaCpp

    model_path = Path(args.model) if args.model else _smollm2()
    extra = ["--threads", str(args.threads)] if args.threads else []
    model = ChatLlamaCpp(
        model_path=str(model_path), n_ctx=args.ctx, temperature=0, n_threads=args.threads
    )
    model.load()
    with (
        tempfile.TemporaryDirectory() as home,
        ServerProcess(
            model_path, Path(home), "--ctx", str(args.ctx), "--temperature", "0", *extra
        ) as server,
        httpx.Client(timeout=600) as http,
    ):
        print(
            f"model {model_path.name}, n_ctx {args.ctx}, max_tokens {args.max_tokens}, "
            f"server {server.url}, {os.cpu_count()} CPUs",
            flush=True,
        )
        run_local(model, prompts(1, offset=20)[0], 8)  # warm both up
        run_http(http, server.url, prompts(1, offset=20)[0], 8)
        alone_results = alone(model, http, server.url, args.prompts, args.max_tokens)
        conc = concurrent(model, server.url, args.rounds, args.clients, args.max_tokens)
    report = table(alone_results, conc, args.clients)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = {
        "alone": alone_results,
        "concurrent": conc,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "bench_server.json").write_text(json.dumps(raw, indent=1))
    (args.out / "bench_server.md").write_text(report + "\n")
    return 0


def _smollm2() -> Path:
    from model_file import smollm2_model_file

    return smollm2_model_file()


if __name__ == "__main__":
    raise SystemExit(main())
