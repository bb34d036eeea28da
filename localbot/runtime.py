"""Loading llama.cpp quietly, and turning its failures into LocalbotErrors.

llama.cpp logs through a C callback; llama-cpp-python's own callback prints warnings to stderr even
with ``verbose=False`` (its level mapping is out of date). We install ours: every line goes to the
``localbot.llama`` logger at DEBUG, and to stderr only when a model asked for ``verbose``. The lines
logged at ERROR level during a load are kept so a failed load can say *why* in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from localbot.errors import ModelLoadError, one_line

log = logging.getLogger("localbot.llama")

# ggml.h's enum ggml_log_level (llama-cpp-python's copy of it is older and shifted by one).
_LEVEL_ERROR, _LEVEL_CONT = 4, 5

_errors: deque[str] = deque(maxlen=20)
_state: dict[str, Any] = {"verbose": False, "installed": False, "level": 0}
_partial: list[str] = []

# The generic exceptions llama-cpp-python raises when llama.cpp returns NULL; the reason is in
# llama.cpp's log. Anything else raised while constructing ``Llama`` (a chat template that does not
# compile, an assertion) carries its own reason.
_LLAMA_CPP_FAILED = re.compile(r"^Failed to (load model|get vocab|create llama_context)")
# "llama_model_load: error loading model: ..." -> "error loading model: ...".
_FUNCTION_PREFIX = re.compile(r"^(?:[A-Za-z_][\w:]*: )+(?=\S)")


def _on_log(level: int, text: bytes, _user_data: Any) -> None:
    message = text.decode("utf-8", errors="replace")
    if _state["verbose"]:
        sys.stderr.write(message)
    if level != _LEVEL_CONT:
        _state["level"] = level
    _partial.append(message)
    if message.endswith("\n"):
        line = "".join(_partial).rstrip()
        _partial.clear()
        if line:
            log.debug("%s", line)
            if _state["level"] == _LEVEL_ERROR:
                _errors.append(line)


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


def _llama_cpp_reason() -> str | None:
    """The first error llama.cpp logged during this load (the cause; later ones are effects)."""
    for line in _errors:
        reason = _FUNCTION_PREFIX.sub("", line.strip())
        if reason:
            return one_line(reason)
    return None


def _failure(err: Exception, path: Path, vocab_only: bool) -> str:
    what = "the tokenizer of" if vocab_only else "model"
    if _LLAMA_CPP_FAILED.match(str(err)):
        reason = _llama_cpp_reason() or one_line(str(err))
        return (
            f"llama.cpp could not load {what} {path}: {reason} (check the file with "
            "`python -m localbot.download --verify`, or try fewer --gpu-layers / a smaller --ctx)"
        )
    detail = one_line(f"{type(err).__name__}: {err}")
    if type(err).__module__.startswith("jinja2"):
        return (
            f"llama-cpp-python could not load {what} {path}: the chat template in the file does "
            f"not compile ({detail}); fix the file's tokenizer.chat_template or use another model"
        )
    return f"llama-cpp-python could not load {what} {path}: {detail}"


class _UnusedChatFormatter:
    """Stands in for llama-cpp-python's ``Jinja2ChatFormatter`` while a ``Llama`` is built.

    ``Llama.__init__`` compiles every chat template in the GGUF's metadata into a chat handler,
    with no bound on time or memory (Jinja folds ``{{ 'x' * 10**9 }}`` at compile time: 19 s and
    4 GB before localbot could say a word). localbot never uses those handlers: it renders the
    template itself, sandboxed and bounded (``localbot.templates``). So the compile is skipped.
    """

    def __init__(self, **_: Any) -> None:
        pass

    def to_chat_handler(self) -> Any:
        def unused(*_: Any, **__: Any) -> Any:
            raise RuntimeError("localbot renders chat templates itself (localbot.templates)")

        return unused


_formatter_lock = threading.Lock()


@contextlib.contextmanager
def _metadata_templates_not_compiled() -> Iterator[None]:
    from llama_cpp import llama_chat_format

    with _formatter_lock:
        original = llama_chat_format.Jinja2ChatFormatter
        llama_chat_format.Jinja2ChatFormatter = _UnusedChatFormatter
        try:
            yield
        finally:
            llama_chat_format.Jinja2ChatFormatter = original


def load_llama(path: Path, *, verbose: bool, vocab_only: bool = False, **params: Any):
    """Construct a ``llama_cpp.Llama``; raise ModelLoadError with the real reason on failure.

    Any exception from the constructor becomes a ModelLoadError: llama-cpp-python asserts, and
    wraps llama.cpp's failures in generic ValueErrors whose reason is only in llama.cpp's log.
    The chat templates in the file are not compiled here (see ``_UnusedChatFormatter``).
    """
    install_log_handler()
    set_verbose(verbose)
    from llama_cpp import Llama

    _errors.clear()
    try:
        with _metadata_templates_not_compiled():
            return Llama(model_path=str(path), vocab_only=vocab_only, verbose=verbose, **params)
    except Exception as err:
        raise ModelLoadError(_failure(err, path, vocab_only)) from err
