"""``python -m localbot serve``: an OpenAI-compatible API (``/v1``), a session API (``/api``) and
a chat page (``/``) over one Chatbot and the same session files as the terminal chat.

Modules: ``command`` (the ``serve`` command), ``app`` (the application, error shapes, the page's
files), ``engine`` (the model thread and its queue), ``openai_request`` / ``openai_api`` (the
OpenAI routes), ``sessions_api`` (the page's routes), ``turns`` (a session's settings, the
/tokens and /stats figures), ``security`` (the gatekeeper middleware), ``static/`` (the page).
Needs the ``server`` extra (FastAPI, uvicorn); ``create_app`` is imported lazily so that the
``serve`` command can say so in one line when they are missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from localbot.server.app import create_app


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from localbot.server.app import create_app

        return create_app
    raise AttributeError(f"module 'localbot.server' has no attribute {name!r}")


__all__ = ["create_app"]
