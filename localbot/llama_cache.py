"""How much of a ``llama_cpp.Llama``'s KV cache a prompt can reuse, and when reusing it would be
wrong. The one place these rules live: the chat model applies them before generating, the KV-state
restore before loading a saved state, and the benchmark to count reused tokens.

It is also the one place that reaches into llama-cpp-python's private attributes (the context and
model handles, the evaluated-token buffer): its public API has no accessor for them.

Sliding-window attention (Gemma 2/3 and others): with ``swa_full=False`` llama.cpp keeps only the
last ``n_swa + n_ubatch`` positions of the sliding-window layers. Trimming a cache back further
than the window reaches would leave attention reading a window with holes (silently different
output; llama.cpp's server re-reads the whole prompt in that case). With ``swa_full=True`` (the
default) every position is kept and any prefix can be reused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("localbot.kv_state")


def context_handle(llama: Any) -> Any:
    """The ``llama_context *`` of ``llama`` (for llama.cpp's C API)."""
    return llama._ctx.ctx


def model_handle(llama: Any) -> Any:
    """The ``llama_model *`` of ``llama``."""
    return llama._model.model


def vocab_handle(llama: Any) -> Any:
    """The ``llama_vocab *`` of ``llama``."""
    return llama._model.vocab


def replace_sampler(llama: Any, sampler: Any) -> Callable[[], None]:
    """Make the next ``llama.generate`` sample with ``sampler`` (an object with
    ``sample(ctx, idx)`` and ``close()``); returns the function that undoes it.

    ``Llama.generate`` builds its sampler with ``self._init_sampler(...)`` when it starts; an
    instance attribute of that name answers first (llama-cpp-python 0.3.36)."""
    llama._init_sampler = lambda **_: sampler

    def undo() -> None:
        llama.__dict__.pop("_init_sampler", None)

    return undo


def is_recurrent(llama: Any) -> bool:
    """Whether ``llama``'s memory is recurrent (or hybrid): all or nothing, it cannot be
    trimmed back to a prefix."""
    return bool(getattr(llama, "_is_recurrent", False) or getattr(llama, "_is_hybrid", False))


def cached_tokens(llama: Any) -> list[int]:
    """The tokens ``llama``'s KV cache holds, in order."""
    return llama._input_ids.tolist()


def mark_logits_stale(llama: Any) -> None:
    """After loading a state: ``generate`` must re-evaluate at least one token for logits."""
    llama._requires_eval = True


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def usable(common: int, prompt_len: int) -> int:
    """Tokens ``Llama.generate`` keeps of a cache sharing ``common`` tokens with the prompt: a
    fully cached prompt still has its last token re-evaluated to produce fresh logits."""
    return common if common < prompt_len else max(prompt_len - 1, 0)


def reusable_tokens(llama: Any, prompt_ids: Sequence[int]) -> int:
    """How many of ``prompt_ids`` ``Llama.generate`` will take from ``llama``'s KV cache: its own
    rule (llama-cpp-python 0.3.36), including the exact hit whose logits are still live."""
    prompt = list(prompt_ids)
    if llama.n_tokens <= 0:
        return 0
    common = common_prefix(cached_tokens(llama), prompt)
    live_logits = not llama._requires_eval
    if common == len(prompt) == llama.n_tokens and live_logits:
        return len(prompt)
    return usable(common, len(prompt))


def window_problem(llama: Any, reused: int) -> str | None:
    """Why reusing the first ``reused`` cached tokens would be wrong, or None when it is safe.

    The first token evaluated after the reused prefix attends to the ``n_swa`` positions before
    it; if some of those are gone (``swa_full`` off) its attention reads a window with holes.
    This is llama.cpp server's test (``pos_min > max(0, n_past - n_swa)`` forces a re-read).
    """
    import llama_cpp

    if is_recurrent(llama):
        # No window: a recurrent state is all or nothing (seq_rm refuses a partial trim and
        # Llama.generate then re-reads; restore_state only restores a state the prompt extends).
        return None
    memory = llama_cpp.llama_get_memory(context_handle(llama))
    if memory is None or reused <= 0:
        return None
    pos_min = llama_cpp.llama_memory_seq_pos_min(memory, 0)
    n_swa = int(llama_cpp.llama_model_n_swa(model_handle(llama)))
    threshold = max(0, reused - n_swa) if n_swa > 0 else 0
    if pos_min < 0 or pos_min > threshold:
        return (
            f"the cache keeps positions from {pos_min} only (sliding window {n_swa}, swa_full "
            f"off): reusing {reused} tokens needs them from {threshold}"
        )
    return None


def drop_unsafe_cache(llama: Any, prompt_ids: Sequence[int]) -> bool:
    """Forget ``llama``'s cached tokens when ``Llama.generate`` would reuse them wrongly for
    ``prompt_ids`` (see :func:`window_problem`); the prompt is then read in full. Call with the
    model's lock held, right before ``generate``. Returns whether the cache was dropped."""
    if llama.n_tokens <= 0:
        return False
    problem = window_problem(llama, reusable_tokens(llama, prompt_ids))
    if problem is None:
        return False
    log.debug("not reusing the KV cache: %s", problem)
    clear(llama)
    return True


def clear(llama: Any) -> None:
    """Forget any partially loaded state: no tokens recorded, KV memory empty."""
    with contextlib.suppress(Exception):
        llama.reset()
    with contextlib.suppress(Exception):
        llama._ctx.kv_cache_clear()


def prefill_step(
    llama: Any, target: Sequence[int], limit: int, shift: bool = False
) -> tuple[int, bool, int]:
    """Bring ``llama``'s KV cache one step closer to holding ``target`` (token ids a coming
    prompt starts with): keep the cached prefix they share, drop the rest, and evaluate at most
    ``limit`` more of ``target``. Returns (tokens of ``target`` the cache now holds, whether it
    holds them all, tokens evaluated). Call with the model's lock held.

    The cache then holds the tokens ``Llama.generate`` would have evaluated for a prompt starting
    with ``target``, so such a prompt reuses them (with ``shift``, :func:`shift_cache` runs
    first: approximate, as it is for the turn).
    """
    target = list(target)
    if shift:
        shift_cache(llama, target)
    held = common_prefix(cached_tokens(llama), target)
    if held < llama.n_tokens:
        held = _trim_to(llama, held)
    if held >= len(target):
        return held, True, 0
    llama.eval(target[held : held + max(1, limit)])
    # The logits are those of a prefix, never of the coming prompt: generate must recompute.
    mark_logits_stale(llama)
    return llama.n_tokens, llama.n_tokens >= len(target), llama.n_tokens - held


def _trim_to(llama: Any, keep: int) -> int:
    """Keep the first ``keep`` cached tokens (the rest of the KV cache is dropped); returns the
    tokens kept, 0 when the cache cannot be trimmed there safely (recurrent memory, a sliding
    window with holes) and was cleared."""
    if is_recurrent(llama) or window_problem(llama, keep) is not None:
        keep = 0
    if keep == 0 or not llama._ctx.kv_cache_seq_rm(-1, keep, -1):
        clear(llama)
        return 0
    llama.n_tokens = keep
    return keep


def shift_problem(llama: Any, swa_full: bool) -> str | None:
    """Why ``llama``'s KV cache cannot be shifted (``--context-shift``), or None when it can."""
    import llama_cpp

    if is_recurrent(llama):
        return "its memory is recurrent: there are no positions to shift"
    memory = llama_cpp.llama_get_memory(context_handle(llama))
    if memory is None or not llama_cpp.llama_memory_can_shift(memory):
        return "llama.cpp cannot shift this model's cache"
    if int(llama_cpp.llama_model_n_swa(model_handle(llama))) > 0 and not swa_full:
        # llama.cpp's server refuses it too: the sliding window keeps too little to shift.
        return "it uses sliding-window attention and swa_full is off"
    return None


MIN_SHIFT_RUN = 16
"""A shift is worth it only when at least this many cached tokens become reusable."""


def shift_cache(llama: Any, prompt_ids: Sequence[int]) -> int:
    """Approximate reuse after the start of a history was dropped (``--context-shift``): find
    the longest run of cached tokens, past the part shared with the prompt, that the prompt
    continues with; remove the cached tokens before that run and shift the run back into
    place, so the prompt reuses it instead of re-reading it. Returns the tokens removed (0: no
    such run). Approximate: the shifted tokens' cache was computed with the removed tokens in
    view. Call with the model's lock held, after checking :func:`shift_problem`."""
    import llama_cpp

    cached, prompt = cached_tokens(llama), list(prompt_ids)
    kept = common_prefix(cached, prompt)
    if kept >= len(cached) or kept >= len(prompt):
        return 0
    start, run = 0, 0
    for k in range(kept + 1, len(cached)):
        if cached[k] == prompt[kept]:
            length = common_prefix(cached[k:], prompt[kept:])
            if length > run:
                start, run = k, length
    # Only the start of the history may go: the run must reach (nearly) the end of the cache,
    # or the cut tokens are not a dropped beginning but, say, text the user pasted twice.
    if run < MIN_SHIFT_RUN or len(cached) - (start + run) > MIN_SHIFT_RUN:
        return 0
    memory = llama_cpp.llama_get_memory(context_handle(llama))
    end = start + run
    llama_cpp.llama_memory_seq_rm(memory, 0, end, -1)
    llama_cpp.llama_memory_seq_rm(memory, 0, kept, start)
    llama_cpp.llama_memory_seq_add(memory, 0, start, end, kept - start)
    llama.input_ids[kept : kept + run] = cached[start:end]
    llama.n_tokens = kept + run
    mark_logits_stale(llama)
    log.debug("context shift: removed %d cached tokens, kept %d shifted", start - kept, run)
    return start - kept
