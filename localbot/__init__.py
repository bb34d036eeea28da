"""localbot: a local, offline chatbot over llama.cpp that remembers every conversation on disk.

Public names are imported lazily, so ``import localbot`` stays cheap (llama.cpp and LangChain load
only when a name that needs them is used).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from localbot.errors import (
    ConfigError,
    ContextOverflowError,
    DownloadError,
    LocalbotError,
    ManifestError,
    ModelFileError,
    ModelLoadError,
    SessionError,
)

__version__ = "0.1.0"

_LAZY = {
    "ChatLlamaCpp": "localbot.chat_model",
    "SessionStore": "localbot.sessions",
    "build_chatbot": "localbot.chatbot",
}

if TYPE_CHECKING:
    from localbot.chat_model import ChatLlamaCpp
    from localbot.chatbot import build_chatbot
    from localbot.sessions import SessionStore


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'localbot' has no attribute {name!r}")


__all__ = [
    "ChatLlamaCpp",
    "ConfigError",
    "ContextOverflowError",
    "DownloadError",
    "LocalbotError",
    "ManifestError",
    "ModelFileError",
    "ModelLoadError",
    "SessionError",
    "SessionStore",
    "build_chatbot",
]
