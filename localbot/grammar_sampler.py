"""Grammar-constrained sampling at close to unconstrained speed.

``Llama.generate(grammar=...)`` puts llama.cpp's grammar sampler first in the chain, so every
token checks the grammar against the whole vocabulary: on Gemma 3's 262,144 tokens that ran at
~25% of unconstrained speed on our 2-core machines. llama.cpp's own tools (``common_sampler``)
sample first and check only the chosen token against the grammar, and only when the grammar
rejects it apply the grammar to the whole vocabulary and sample again. For greedy decoding the
result is identical (the best token the grammar allows); with temperature it is what llama.cpp's
server does. :class:`GrammarSampler` does that, and is handed to ``Llama.generate`` in place of
the sampler it would build (:func:`use_sampler`), so prompt caching and evaluation stay
llama-cpp-python's.

Control tokens other than end-of-generation are never sampled under a grammar: the grammar
matches them by their text (``<start_of_turn>``), but they would not come back as that text.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from localbot.errors import ConfigError
from localbot.llama_cache import replace_sampler, vocab_handle

__all__ = ["GrammarSampler", "use_sampler"]

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
_ATTR_CONTROL = 1 << 3
TOP = 64
"""How many of the likeliest tokens are checked against the grammar before all of them are."""

_blocked_cache: dict[tuple[str, int], np.ndarray] = {}
_blocked_lock = threading.Lock()


def _blocked_tokens(llama: Any, n_vocab: int) -> np.ndarray:
    """Ids of control tokens that do not end generation (once per model file)."""
    import llama_cpp

    vocab = vocab_handle(llama)
    key = (str(llama.model_path), n_vocab)
    with _blocked_lock:
        found = _blocked_cache.get(key)
        if found is None:
            found = np.array(
                [
                    t
                    for t in range(n_vocab)
                    if llama_cpp.llama_vocab_get_attr(vocab, t) & _ATTR_CONTROL
                    and not llama_cpp.llama_vocab_is_eog(vocab, t)
                ],
                dtype=np.int64,
            )
            _blocked_cache[key] = found
    return found


class GrammarSampler:
    """A sampler for ``Llama.generate`` that follows a GBNF grammar (see the module docstring).

    Sampling settings are llama-cpp-python's (``temp``, ``top_k``, ``top_p``, ``min_p``,
    ``repeat_penalty``); temperature 0 is greedy.
    """

    def __init__(self, llama: Any, grammar: str, seed: int, **sampling: Any) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._chain = self._grammar = None
        vocab = vocab_handle(llama)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self._grammar = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not self._grammar:
            raise ConfigError("llama.cpp could not parse the grammar (see the log with verbose)")
        self._chain = self._build_chain(llama, seed, sampling)
        self._data = np.empty(self.n_vocab, dtype=_TOKEN_DATA)
        self._small = np.empty(min(TOP, self.n_vocab), dtype=_TOKEN_DATA)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._blocked = _blocked_tokens(llama, self.n_vocab)
        self._one = llama_cpp.llama_token_data()
        self._one_array = llama_cpp.llama_token_data_array(
            data=ctypes.pointer(self._one), size=1, selected=-1, sorted=False
        )
        self.grammar_passes = 0  # tokens that needed the whole vocabulary checked
        self.tokens = 0

    def _build_chain(self, llama: Any, seed: int, s: dict[str, Any]) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            lib.llama_sampler_chain_add(chain, sampler)

        repeat = s.get("repeat_penalty", 1.0)
        if repeat != 1.0:  # the same call (and arguments) as llama-cpp-python's own chain
            add(lib.llama_sampler_init_penalties(self.n_vocab, 64, repeat, 0.0, 0.0))
        temp = s.get("temp", 0.8)
        if temp <= 0:
            add(lib.llama_sampler_init_greedy())
        else:
            add(lib.llama_sampler_init_top_k(s.get("top_k", 40)))
            add(lib.llama_sampler_init_typical(1.0, 1))
            add(lib.llama_sampler_init_top_p(s.get("top_p", 0.95), 1))
            add(lib.llama_sampler_init_min_p(s.get("min_p", 0.05), 1))
            add(lib.llama_sampler_init_temp(temp))
            add(lib.llama_sampler_init_dist(seed))
        return chain

    def _array(self, data: np.ndarray) -> Any:
        return self._lib.llama_token_data_array(
            data=data.ctypes.data_as(self._lib.llama_token_data_p),
            size=len(data),
            selected=-1,
            sorted=False,
        )

    def _candidates(self, logits: np.ndarray) -> Any:
        data = self._data
        data["id"] = self._ids
        data["logit"] = logits
        data["p"] = 0.0
        data["logit"][self._blocked] = -np.inf
        return self._array(data)

    def _best_allowed(self, logits: np.ndarray) -> int | None:
        """Sample among the ``TOP`` likeliest tokens the grammar allows; None if it allows none
        of them. For greedy decoding this is exactly the grammar's best token; with temperature
        the chain's own top-k (40) keeps no more than these anyway."""
        masked = logits.copy()
        masked[self._blocked] = -np.inf
        small = self._small
        top = np.argpartition(masked, -len(small))[-len(small) :]
        small["id"] = top
        small["logit"] = masked[top]
        small["p"] = 0.0
        cur = self._array(small)
        self._lib.llama_sampler_apply(self._grammar, ctypes.byref(cur))
        if not np.isfinite(small["logit"][: cur.size]).any():
            return None
        self._lib.llama_sampler_apply(self._chain, ctypes.byref(cur))
        return int(cur.data[cur.selected].id)

    def _allowed(self, token: int) -> bool:
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        self._lib.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return self._one.logit != -np.inf

    def sample(self, ctx: Any, idx: int) -> int:
        """Called by ``Llama.sample`` with llama-cpp-python's context wrapper."""
        lib = self._lib
        pointer = lib.llama_get_logits_ith(ctx.ctx, idx)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
        cur = self._candidates(logits)
        lib.llama_sampler_apply(self._chain, ctypes.byref(cur))
        token = int(cur.data[cur.selected].id)
        if not self._allowed(token):
            best = self._best_allowed(logits)
            if best is None:  # none of the likeliest fits: check the whole vocabulary
                self.grammar_passes += 1
                cur = self._candidates(logits)
                lib.llama_sampler_apply(self._grammar, ctypes.byref(cur))
                lib.llama_sampler_apply(self._chain, ctypes.byref(cur))
                best = int(cur.data[cur.selected].id)
            token = best
        lib.llama_sampler_accept(self._grammar, token)
        lib.llama_sampler_accept(self._chain, token)
        self.tokens += 1
        return token

    def close(self) -> None:
        if self._chain:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None

    def __del__(self) -> None:
        self.close()


def use_sampler(llama: Any, sampler: GrammarSampler) -> Callable[[], None]:
    """Make the next ``llama.generate`` sample with ``sampler``; returns the function that
    undoes it (call it when that generation ends). Callers hold the model's run lock; the tests
    check that a grammar is followed."""
    return replace_sampler(llama, sampler)
