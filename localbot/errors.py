"""The one error hierarchy. Messages say what went wrong and what to do; only the CLI turns
these into exit codes (see ``localbot.cli``)."""

from __future__ import annotations


class LocalbotError(Exception):
    """A problem the user can fix. ``str(err)`` is a one-line message meant for them."""

    exit_code = 1


class ConfigError(LocalbotError):
    """Bad settings, flags or template variables."""

    exit_code = 2


class MissingVariableError(ConfigError):
    """The system prompt names ``{variables}`` that were given no value."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        fields = ", ".join("{" + n + "}" for n in names)
        super().__init__(
            f"the system prompt uses {fields} but no value was given: pass "
            + ", ".join(f'"{n}"' for n in names)
            + " in the input or in build_chatbot(variables=...), or write {{ and }} for literal "
            "braces"
        )

    def for_command_line(self) -> str:
        fields = ", ".join("{" + n + "}" for n in self.names)
        flags = " ".join(f"--var {n}=VALUE" for n in self.names)
        return (
            f"the system prompt uses {fields} but no value was given (pass {flags}, "
            "or write {{ and }} for literal braces)"
        )


class ModelFileError(LocalbotError):
    """The model file is missing, is not GGUF, or is truncated/corrupt."""

    exit_code = 3


class ModelLoadError(LocalbotError):
    """llama.cpp could not load the model or allocate its context."""

    exit_code = 3


class TemplateError(LocalbotError):
    """The chat template does not compile, fails to render, or is stopped by a bound. Exit 3
    with the model-file problems: the template usually comes from the model file."""

    exit_code = 3


class ContextOverflowError(LocalbotError):
    """The prompt plus the reply budget does not fit in the context window."""

    exit_code = 4


class SessionError(LocalbotError):
    """A session file is corrupt or foreign, or a session id is not allowed."""

    exit_code = 5


class DownloadError(LocalbotError):
    """A model could not be fetched or failed verification (``python -m localbot.download``)."""

    exit_code = 7


class ManifestError(LocalbotError):
    """models/manifest.json is unreadable, or a model does not match what it records."""

    exit_code = 6


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is so that it unwinds like Ctrl-C: the partial
    reply is saved and marked interrupted, temp files go, and the exit code names the signal.
    Not a LocalbotError: nothing went wrong, the user (or the system) asked to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def one_line(text: str, limit: int = 300) -> str:
    """``text`` fit for a one-line message: each run of whitespace (newlines included) becomes one
    space, any other unprintable character is escaped, and it is cut at ``limit`` characters.
    Hub errors, llama.cpp's log and exception texts can hold anything."""
    flat = " ".join(text.split())
    flat = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in flat)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def quoted(text: str, limit: int = 100) -> str:
    """User or file input quoted for a one-line message: ``'a\\nb'``, never a raw newline."""
    shown = repr(text) if text.isprintable() else ascii(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
