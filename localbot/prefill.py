"""Evaluating the start of a coming prompt in the background, a chunk at a time, while the user
types (``ChatLlamaCpp.prefill``, driven by ``localbot.kv_sessions``).

The chunks hold whole grains of ``PREFILL_GRAIN`` tokens and last about ``PREFILL_CHUNK_S``
seconds: short enough that a turn arriving meanwhile waits little (and keeps the chunk's work),
long enough to run near full batch speed. Nothing is done for fewer than ``MIN_PREFILL``
missing tokens: the turn reads those with its new message, as it would without background work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from localbot.llama_cache import cached_tokens, common_prefix, prefill_step

PREFILL_GRAIN = 16
"""Background prefill evaluates whole multiples of this many tokens, and leaves a shorter rest
to the turn. llama.cpp's CPU kernels round a token's values differently in some batch shapes
(odd and tiny batches); batches of multiples of 16 matched a turn's own bit for bit in our
measurements, tiny ones (1-7 tokens) did not."""
MIN_PREFILL = 64
"""Less than this many tokens to read: not worth a background batch (the turn reads them with
its new message, in one batch, as it would without background work)."""
PREFILL_CHUNK_S = 0.1
"""Background prefill works in chunks of about this many seconds: a turn that arrives waits at
most that long for the model (the chunk's work is kept, and is the turn's own work when the
turn's prompt starts as expected). Shorter chunks evaluate slower: on a 2-core CPU, 64-token
chunks (~85 ms) run at 87% of the speed of 512-token batches, 16-token ones at 60%."""


def next_chunk(chunk: int, seconds: float, n_batch: int) -> int:
    """The size of the next prefill chunk, from how long ``chunk`` tokens took: about
    ``PREFILL_CHUNK_S`` seconds of work, a multiple of ``PREFILL_GRAIN`` within
    [PREFILL_GRAIN, n_batch]."""
    fitting = int(chunk * PREFILL_CHUNK_S / seconds) if seconds > 0 else chunk * 2
    wanted = min(fitting, chunk * 4)
    top = max(PREFILL_GRAIN, n_batch - n_batch % PREFILL_GRAIN)
    return max(PREFILL_GRAIN, min(top, wanted - wanted % PREFILL_GRAIN))


def background_prefill(
    llama: Any,
    ids: Sequence[int],
    *,
    lock: threading.Lock,
    give_way: Callable[[], bool],
    stop: threading.Event | None = None,
    on_chunk: Callable[[int, int, float, float], None] | None = None,
    shift: bool = False,
) -> int:
    """Evaluate ``ids`` into ``llama``'s KV cache on top of what it shares with them, holding
    ``lock`` one chunk at a time; stop between chunks when ``stop`` is set or ``give_way()``
    says so. Returns how many of ``ids`` the cache then holds.

    The cache holds the very tokens a turn would have evaluated (``Llama.generate`` compares
    them one by one and re-reads any that differ). ``on_chunk(held, evaluated, started,
    ended)`` is called after each chunk (perf_counter times: for the benchmark, and tests);
    ``shift``: ``--context-shift`` (see ``localbot.llama_cache.shift_cache``).
    """
    with lock:
        cached = common_prefix(cached_tokens(llama), ids)
    if len(ids) - cached < MIN_PREFILL and not shift:
        return min(cached, len(ids))
    # Whole grains only: the turn reads the rest (fewer than PREFILL_GRAIN tokens).
    end = len(ids) - (len(ids) - cached) % PREFILL_GRAIN
    chunk, held = PREFILL_GRAIN, 0
    while not (stop is not None and stop.is_set()) and not give_way():
        with lock:
            if give_way():
                break
            started = time.perf_counter()
            held, done, evaluated = prefill_step(llama, ids[:end], chunk, shift)
            ended = time.perf_counter()
        if on_chunk is not None:
            on_chunk(held, evaluated, started, ended)
        if done:
            break
        chunk = next_chunk(chunk, ended - started, int(llama.n_batch))
    return held
