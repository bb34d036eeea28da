"""KV state across restarts: save llama.cpp's evaluated tokens and their KV cache next to a
session, and restore them when the session resumes, so a resumed session reads only its new message.

The files (``kvstate`` and ``kvstate.meta`` in the session's sidecar folder), what makes a saved
state trusted (only the very file we wrote), and the disk budget are ``localbot.kv_files``'s; this
module moves a live model's state in and out of them, under the model's lock
(``model.exclusive()``).

A state is restored only when everything it records matches the running model and the new prompt
shares a prefix with its tokens longer than what the model already holds in memory. Anything else
(a different model file, n_ctx, template or cache setting, another llama-cpp-python version, a
truncated or corrupt file, unreadable meta) is logged at DEBUG on ``localbot.kv_state`` and
ignored: the prompt is simply re-read. Restoring never changes a reply: the restored KV cache holds
bit-for-bit what the saving process had, and ``Llama.generate`` trims it to the common prefix
exactly as it does for a warm process.

Sliding-window attention (Gemma 2/3 and others): with ``swa_full=False`` llama.cpp keeps only the
last ``n_swa + n_ubatch`` positions of the sliding-window layers, and the state file holds only
those. Extending such a state is fine, but trimming it back further than the window reaches would
leave attention reading a window with holes (silently different output; llama.cpp's server
re-reads the whole prompt in that case). ``restore_state`` applies the server's test
(``pos_min <= usable - n_swa``) and refuses a restore that fails it. A warm process has the same
hazard (``Llama.generate`` does not check): ``llama_cache.drop_unsafe_cache`` is the same test
for a model about to generate. With ``swa_full=True`` (the default) every position is kept and any
prefix can be reused; the bit-for-bit claim above is tested there (with ``swa_full=False`` the
restored cells may sit in another order than in the saver's ring buffer, so sums can round
differently).
Recurrent and hybrid models cannot be trimmed at all: their state is restored only when the prompt
extends every saved token.

Disk use is bounded by ``kv_files.prune_states`` (least recently written states go first).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localbot.atomic import forget_temp, make_temp
from localbot.kv_files import (
    Rejected,
    check_identity,
    fd_path,
    model_identity,
    open_verified,
    prepare_folder,
    read_meta,
    sha256_hex,
    stamp,
    write_meta,
)
from localbot.llama_cache import (
    clear,
    common_prefix,
    context_handle,
    is_recurrent,
    mark_logits_stale,
    reusable_tokens,
    usable,
    window_problem,
)

if TYPE_CHECKING:
    from localbot.chat_model import ChatLlamaCpp

log = logging.getLogger("localbot.kv_state")

__all__ = ["restore_state", "save_state"]

# Context settings that change what the KV cache holds or how it is laid out.
_KV_CONTEXT_PARAMS = (
    "swa_full",
    "type_k",
    "type_v",
    "flash_attn_type",
    "rope_scaling_type",
    "rope_freq_base",
    "rope_freq_scale",
    "yarn_ext_factor",
    "yarn_attn_factor",
    "yarn_beta_fast",
    "yarn_beta_slow",
    "yarn_orig_ctx",
)


def _plain(value: Any) -> Any:
    """A JSON-safe form of a ctypes field or setting, stable across a JSON round trip."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


def _identity(model: ChatLlamaCpp, llama: Any) -> dict[str, Any]:
    """Everything a saved state must match to be valid for ``model`` (JSON-normalised)."""
    import llama_cpp

    params = llama.context_params
    template = model.template
    identity = {
        "llama_cpp_version": llama_cpp.__version__,
        "llama_session_version": int(getattr(llama_cpp, "LLAMA_SESSION_VERSION", 0)),
        "model": model_identity(Path(model.gguf.path)),
        "n_ctx": int(llama.n_ctx()),
        "context": {name: _plain(getattr(params, name, None)) for name in _KV_CONTEXT_PARAMS},
        "lora": [
            _plain(getattr(llama, "lora_path", None)),
            _plain(getattr(llama, "lora_scale", None)),
        ],
        "kv_overrides_sha256": sha256_hex(
            json.dumps(getattr(llama, "kv_overrides", None), sort_keys=True, default=repr).encode()
        ),
        "template": {"name": template.name, "sha256": sha256_hex(template.source.encode())},
        # A shifted cache is approximate: only a process that accepts that may reuse it.
        "context_shift": bool(model.context_shift),
    }
    return json.loads(json.dumps(identity))


def save_state(model: ChatLlamaCpp, path: Path | str) -> int | None:
    """Save the loaded model's evaluated tokens and KV cache to ``path`` (``kvstate``) and its
    metadata to ``kvstate.meta`` next to it (the folder is created); return the bytes written, or
    None when there was nothing to save (model not loaded, nothing evaluated) or saving failed
    (logged).

    Both files are replaced atomically (temp file, fsync, rename); a temp file an interrupted
    save leaves is removed by ``localbot.atomic.remove_own_temps`` (at exit, or from a signal
    handler), or by the next save or prune once it is a minute old. Holds the model
    (``model.exclusive()``): do not call it from inside a generation on the same thread.
    """
    import llama_cpp

    path = Path(path)
    start = time.perf_counter()
    tmp: str | None = None
    try:
        with model.exclusive(load=False) as llama:
            if llama is None:
                return None
            prepare_folder(path)
            n = int(llama.n_tokens)
            if n <= 0:
                return None
            ctx = context_handle(llama)
            memory = llama_cpp.llama_get_memory(ctx)
            if memory is not None:
                pos_max = llama_cpp.llama_memory_seq_pos_max(memory, 0)
                if pos_max != n - 1:
                    log.debug(
                        "not saving %s: the KV cache ends at position %d but %d tokens are "
                        "recorded as evaluated",
                        path,
                        pos_max,
                        n,
                    )
                    return None
            tokens = [int(t) for t in llama.input_ids[:n]]
            identity = _identity(model, llama)
            tmp = make_temp(path)
            fd = os.open(tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            array = (llama_cpp.llama_token * n)(*tokens)
            # Written through the open descriptor, so an interrupted save leaves nothing (fd_path).
            target = os.fsencode(fd_path(fd, tmp))
            if not llama_cpp.llama_state_save_file(ctx, target, array, n):
                os.close(fd)
                log.warning("llama.cpp could not save the KV state to %s", path)
                return None
        try:
            os.fsync(fd)
            os.replace(tmp, path)
            forget_temp(tmp)
            tmp = None
            written = stamp(os.fstat(fd))  # after the rename: some file systems move ctime then
        finally:
            os.close(fd)
        meta_bytes = write_meta(path, identity, tokens, written)
    except OSError as err:
        log.warning("could not save the KV state to %s: %s", path, err)
        return None
    finally:
        if tmp is not None:
            forget_temp(tmp, remove=True)
    size = written["size"]
    log.debug(
        "saved %d tokens of KV state to %s (%d bytes, %.3f s)",
        n,
        path,
        size,
        time.perf_counter() - start,
    )
    return size + meta_bytes


# --------------------------------------------------------------------------- restore


def restore_state(model: ChatLlamaCpp, path: Path | str, prompt_ids: Sequence[int]) -> int:
    """Load the state saved at ``path`` into ``model`` when it is valid for it and useful for the
    prompt ``prompt_ids``; return the number of prompt tokens the next generation will not have
    to evaluate (0 when nothing was restored). Never raises for a bad or foreign state file.

    Loads the model if needed; holds it (``model.exclusive()``) while loading the state.
    """
    path = Path(path)
    prompt = [int(t) for t in prompt_ids]
    try:
        meta = read_meta(path)
    except Rejected as why:
        log.debug("not restoring KV state %s: %s", path, why)
        return 0
    saved: list[int] = meta["tokens"]
    wanted = usable(common_prefix(saved, prompt), len(prompt))
    if wanted <= 0:
        log.debug("not restoring KV state %s: it shares no prefix with the prompt", path)
        return 0
    with model.exclusive() as llama:
        in_memory = reusable_tokens(llama, prompt)
        if in_memory >= wanted:
            log.debug(
                "not restoring KV state %s: the model already holds %d usable tokens (saved: %d)",
                path,
                in_memory,
                wanted,
            )
            return 0
        try:
            return _restore(model, llama, path, meta, prompt, wanted)
        except Rejected as why:
            log.debug("not restoring KV state %s: %s", path, why)
            return 0
        except Exception:
            log.debug("not restoring KV state %s: unexpected error", path, exc_info=True)
            clear(llama)
            return 0


def _restore(
    model: ChatLlamaCpp,
    llama: Any,
    path: Path,
    meta: dict[str, Any],
    prompt: list[int],
    wanted: int,
) -> int:
    import llama_cpp

    check_identity(meta["identity"], _identity(model, llama))
    saved: list[int] = meta["tokens"]
    n = len(saved)
    if n > llama.n_ctx():
        raise Rejected(f"it holds {n} tokens, more than n_ctx {llama.n_ctx()}")
    n_vocab = int(llama.n_vocab())
    if any(t >= n_vocab for t in saved):
        raise Rejected("it holds token ids outside this model's vocabulary")
    if is_recurrent(llama) and not wanted == n < len(prompt):
        raise Rejected("recurrent memory cannot be trimmed: the prompt must extend the state")

    start = time.perf_counter()
    fd = open_verified(path, meta)
    verified = time.perf_counter()
    try:
        # Past this point llama.cpp overwrites the context: any failure must leave it empty.
        clear(llama)
        ctx = context_handle(llama)
        buffer = (llama_cpp.llama_token * n)()
        n_out = ctypes.c_size_t(0)
        ok = llama_cpp.llama_state_load_file(
            ctx, os.fsencode(fd_path(fd, path)), buffer, n, ctypes.byref(n_out)
        )
    finally:
        os.close(fd)
    try:
        if not ok:
            raise Rejected("llama.cpp could not load it")
        if n_out.value != n or list(buffer) != saved:
            raise Rejected("the state file's tokens differ from its meta")
        memory = llama_cpp.llama_get_memory(ctx)
        if memory is not None:
            pos_max = llama_cpp.llama_memory_seq_pos_max(memory, 0)
            if pos_max != n - 1:
                raise Rejected(f"the loaded KV cache ends at {pos_max}, expected {n - 1}")
        problem = window_problem(llama, wanted)
        if problem:
            raise Rejected(problem)
    except BaseException:
        clear(llama)
        raise
    llama.input_ids[:n] = saved
    llama.n_tokens = n
    mark_logits_stale(llama)
    log.debug(
        "restored %d tokens of KV state from %s (%d usable; verify %.3f s, load %.3f s)",
        n,
        path,
        wanted,
        verified - start,
        time.perf_counter() - verified,
    )
    return wanted
