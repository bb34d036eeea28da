"""What both systems are timed by alike: ``Llama.generate``, wrapped on each ``Llama`` instance
(a measurement of the backend, the same for raw llama-cpp-python and localbot), and the
caller-side turn times around it."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp

from localbot.llama_cache import context_handle, reusable_tokens


@dataclass
class GenTrace:
    """One call of ``Llama.generate``."""

    prompt_tokens: int
    reused: int
    start: float
    first: float | None = None
    last: float | None = None
    sampled: int = 0
    inside_after_first: float = 0.0  # seconds inside llama-cpp-python's generate after token 1


class GenerateProbe:
    """Times one ``Llama``'s ``generate`` and reads llama.cpp's perf counters for it. Make one
    probe per ``Llama``: a second would wrap the first's wrapper."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        self.traces: list[GenTrace] = []
        original = llama.generate

        def generate(tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
            tokens = list(tokens)
            trace = GenTrace(len(tokens), reusable_tokens(llama, tokens), time.perf_counter())
            self.traces.append(trace)
            inner = original(tokens, *args, **kwargs)
            try:
                while True:
                    asked = time.perf_counter()
                    try:
                        token = next(inner)
                    except StopIteration:
                        return
                    now = time.perf_counter()
                    if trace.first is None:
                        trace.first = now
                    else:
                        trace.inside_after_first += now - asked
                    trace.last = now
                    trace.sampled += 1
                    yield token
            finally:
                inner.close()

        llama.generate = generate

    def begin(self) -> None:
        self.traces.clear()
        llama_cpp.llama_perf_context_reset(context_handle(self.llama))

    def result(self, turn_start: float) -> dict[str, Any]:
        """The model-side numbers of the turn that began at ``turn_start``."""
        if len(self.traces) != 1:
            raise RuntimeError(f"expected one generate call per turn, saw {len(self.traces)}")
        t = self.traces[0]
        perf = llama_cpp.llama_perf_context(context_handle(self.llama))
        first = t.first if t.first is not None else t.start
        last = t.last if t.last is not None else first
        gen_s = last - first
        return {
            "prompt_tokens": t.prompt_tokens,
            "reused_tokens": t.reused,
            "evaluated_tokens": t.prompt_tokens - t.reused,
            "llama_p_eval": perf.n_p_eval,
            "first_token_s": first - turn_start,
            "model_ttft_s": first - t.start,
            "gen_tokens": t.sampled,
            "gen_s": gen_s,
            "gen_tps": (t.sampled - 1) / gen_s if t.sampled > 1 and gen_s > 0 else 0.0,
            # What the caller does with each token (detokenize, stream plumbing) between
            # two of generate's tokens; it slows generation as seen by the user.
            "caller_ms_per_token": (
                1000 * (gen_s - t.inside_after_first) / (t.sampled - 1) if t.sampled > 1 else 0.0
            ),
            "model_s": last - t.start,
        }


def finish_row(
    row: dict[str, Any],
    system: str,
    start: float,
    first: float | None,
    end: float,
    reply: str,
    dropped: int,
) -> dict[str, Any]:
    """Add the caller-side timings to a probe's row."""
    turn_s = end - start
    overhead = turn_s - row["model_s"]
    row.update(
        system=system,
        dropped=dropped,
        ttft_s=(first - start) if first is not None else row["first_token_s"],
        turn_s=turn_s,
        overhead_s=overhead,
        overhead_pct=100 * overhead / turn_s if turn_s > 0 else 0.0,
        reply=reply,
    )
    return row


def warm_up(llama: Any) -> None:
    """One short generation so one-time start-up costs do not land on turn 1, then forget it."""
    tokens = llama.tokenize(b"Hello", add_bos=True, special=False)
    gen = llama.generate(tokens, temp=0.0)
    next(gen)
    gen.close()
    llama.reset()
