"""Generating a reply with llama.cpp: the decode loop, stop sequences held back across token
boundaries, UTF-8 decoded without ever emitting half a character, a wall-clock deadline, and the
timings of the turn. No LangChain here: ``ChatLlamaCpp`` adapts this to a chat model.
"""

from __future__ import annotations

import codecs
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from localbot.grammar_sampler import GrammarSampler, use_sampler
from localbot.llama_cache import drop_unsafe_cache, reusable_tokens, shift_cache, vocab_handle


@dataclass
class TurnStats:
    """Timings of one generation, for ``/stats`` and the benchmark."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token: float = 0.0
    generation_seconds: float = 0.0
    finish_reason: str = ""

    @property
    def evaluated_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def prompt_tokens_per_second(self) -> float:
        t = self.time_to_first_token
        return self.evaluated_tokens / t if t > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        n, t = self.output_tokens - 1, self.generation_seconds
        return n / t if n > 0 and t > 0 else 0.0

    def usage(self) -> dict[str, Any]:
        """LangChain's ``usage_metadata`` for this reply."""
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.prompt_tokens + self.output_tokens,
            "input_token_details": {"cache_read": self.cached_tokens},
        }

    def response(self, model_name: str) -> dict[str, Any]:
        """LangChain's ``response_metadata`` for this reply."""
        return {
            "model_name": model_name,
            "model_provider": "llamacpp",
            "finish_reason": self.finish_reason,
            "timings": self.as_dict(),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "evaluated_tokens": self.evaluated_tokens,
            "output_tokens": self.output_tokens,
            "time_to_first_token_s": round(self.time_to_first_token, 4),
            "prompt_tokens_per_s": round(self.prompt_tokens_per_second, 1),
            "generation_tokens_per_s": round(self.generation_tokens_per_second, 1),
        }


class StopMatcher:
    """Holds back text that could be the start of a stop sequence, across token boundaries."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop sequence was reached)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (temperature 0: greedy)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None

    def for_llama(self) -> dict[str, Any]:
        return {
            "temp": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
        }


def _cut_short(err: BaseException) -> str:
    """The finish reason of a reply ended by ``err``."""
    if isinstance(err, GeneratorExit):  # the consumer closed the stream
        return "abandoned"
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C; SIGTERM/SIGHUP too (errors.Terminated)
        return "interrupted"
    return "error"


def _ended(stopped: bool, full: bool, deadline: float | None) -> str | None:
    """Why the reply ends after this token (None: it goes on)."""
    if stopped:
        return "stop"
    if full:
        return "length"
    if deadline is not None and time.perf_counter() > deadline:
        return "timeout"
    return None


def _constrain(
    llama: Any, grammar: str | None, seed: int, sampling: Sampling
) -> Callable[[], None]:
    """Make ``llama``'s next generation follow ``grammar``; returns what undoes it."""
    if not grammar:
        return lambda: None
    sampler = GrammarSampler(llama, grammar, seed, **sampling.for_llama())
    restore = use_sampler(llama, sampler)

    def undo() -> None:
        restore()
        sampler.close()

    return undo


def generate(
    llama: Any,
    prompt: list[int],
    *,
    max_tokens: int,
    stops: Sequence[str],
    sampling: Sampling,
    timeout: float | None = None,
    stats: TurnStats | None = None,
    grammar: str | None = None,
    context_shift: bool = False,
    hold: Callable[[], None] | None = None,
) -> Iterator[str]:
    """Generate a reply to the token ids ``prompt``: yields text pieces (about one token each).

    ``stats`` (filled in as it goes, final when the generator ends, however it ends) says how it
    ended: ``stop`` (end of turn or a stop sequence), ``length``, ``timeout``, ``abandoned`` (the
    consumer closed it), ``interrupted`` (Ctrl-C) or ``error``. ``grammar`` (GBNF) constrains
    sampling (structured output, tool calls; see ``localbot.grammar_sampler``);
    ``context_shift`` reuses a cache whose start was dropped, approximately
    (``localbot.llama_cache.shift_cache``); ``hold()`` is called once the prompt is read and
    the first token sampled, before anything is yielded. The caller holds the model.
    """
    import llama_cpp

    stats = stats if stats is not None else TurnStats()
    seed = sampling.seed if sampling.seed is not None else random.randint(0, 2**31 - 1)
    llama.set_seed(seed)
    if context_shift:
        shift_cache(llama, prompt)
    # With swa_full off, llama.cpp may hold too little of the sliding window to reuse the
    # cached prefix correctly: then read the prompt in full rather than answer wrongly.
    drop_unsafe_cache(llama, prompt)
    stats.prompt_tokens = len(prompt)
    stats.cached_tokens = reusable_tokens(llama, prompt)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    matcher = StopMatcher(stops)
    vocab = vocab_handle(llama)
    start = time.perf_counter()
    deadline = start + timeout if timeout else None
    first = None
    reason = None  # why the reply ended; stays None while tokens keep coming
    undo = _constrain(llama, grammar, seed, sampling)
    tokens = llama.generate(prompt, reset=True, **sampling.for_llama())
    try:
        for token in tokens:
            if first is None:
                if hold is not None:
                    hold()
                first = time.perf_counter()
                stats.time_to_first_token = first - start
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                reason = "stop"
                break
            stats.output_tokens += 1
            text, stopped = matcher.feed(decoder.decode(llama.detokenize([token])))
            if text:
                yield text
            reason = _ended(stopped, stats.output_tokens >= max_tokens, deadline)
            if reason:
                break
    except BaseException as err:
        reason = _cut_short(err)
        raise
    finally:
        tokens.close()
        undo()
        stats.finish_reason = reason or "length"
        if first is not None:
            stats.generation_seconds = time.perf_counter() - first
    # Text held back as a possible stop-sequence start is real text when no stop matched
    # (after a match the matcher holds nothing).
    tail, _ = matcher.feed(decoder.decode(b"", final=True))
    tail += matcher.flush()
    if tail:
        yield tail
