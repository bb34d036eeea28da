"""The error every part of the OpenAI request reader raises: a 400 (or ``status``) in OpenAI's
error shape, naming the field (``param``) that was refused."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request we refuse; becomes a 400 (or ``status``) in OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = "invalid_request",
        status: int = 400,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status
        self.extra = extra


def short(value: Any) -> str:
    """``value`` as an error message quotes it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"
