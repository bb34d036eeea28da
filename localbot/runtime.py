"""Loading llama.cpp quietly, and turning its failures into LocalbotErrors.

llama.cpp logs through a C callback; llama-cpp-python's own callback prints warnings to stderr even
with ``verbose=False`` (its level mapping is out of date). We install ours: every line goes to the
``localbot.llama`` logger at DEBUG, and to stderr only when a model asked for ``verbose``. The last
lines are kept so a failed load can say *why* in one line.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections import deque
from pathlib import Path
from typing import Any

from localbot.errors import ModelLoadError

log = logging.getLogger("localbot.llama")

_recent: deque[str] = deque(maxlen=50)
_state = {"verbose": False, "installed": False}
_partial: list[str] = []


def _on_log(level: int, text: bytes, _user_data: Any) -> None:
    message = text.decode("utf-8", errors="replace")
    if _state["verbose"]:
        sys.stderr.write(message)
    _partial.append(message)
    if message.endswith("\n"):
        line = "".join(_partial).rstrip()
        _partial.clear()
        if line:
            _recent.append(line)
            log.debug("%s", line)


def install_log_handler() -> None:
    """Route llama.cpp's logging through Python logging (idempotent)."""
    if _state["installed"]:
        return
    import llama_cpp

    callback = llama_cpp.llama_log_callback(_on_log)
    _state["callback"] = callback  # keep a reference: ctypes callbacks must outlive their use
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _state["installed"] = True


def set_verbose(verbose: bool) -> None:
    _state["verbose"] = verbose


def supports_gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _last_error() -> str:
    for line in reversed(_recent):
        lowered = line.lower()
        if "error" in lowered or "failed" in lowered or "cannot" in lowered:
            return line.strip()
    return _recent[-1].strip() if _recent else "no details from llama.cpp"


def load_llama(path: Path, *, verbose: bool, vocab_only: bool = False, **params: Any):
    """Construct a ``llama_cpp.Llama``; raise ModelLoadError with llama.cpp's reason on failure."""
    install_log_handler()
    set_verbose(verbose)
    from llama_cpp import Llama

    _recent.clear()
    try:
        return Llama(model_path=str(path), vocab_only=vocab_only, verbose=verbose, **params)
    except (ValueError, RuntimeError, OSError) as err:
        what = "the tokenizer of" if vocab_only else "model"
        raise ModelLoadError(
            f"llama.cpp could not load {what} {path}: {_last_error()} "
            f"(check the file with `python -m localbot.download --verify`, or try fewer "
            f"--gpu-layers / a smaller --ctx)"
        ) from err
