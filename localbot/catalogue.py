"""A few good small instruct models in GGUF, by short name: ``python -m localbot.download NAME``.

Every entry is a single Q4_K_M file, the usual size/quality trade-off for CPU chat. Sizes are
approximate (the Hub's listing, in decimal units); the download checks the exact size and sha256
that the Hub reports for the file.

How each repo id and file name was confirmed (against copies of public Hub pages and public
code; none is known to be gated, and a gated repo gets a clear "set HF_TOKEN" error):

- qwen2.5-0.5b: the URL ``Qwen/Qwen2.5-0.5B-Instruct-GGUF/resolve/main/qwen2.5-0.5b-instruct-
  q4_k_m.gguf`` is used verbatim by several public projects (an installer script, an app's model
  list); one gives its size as 468 MiB (= 491 MB). Qwen's other GGUF repos use the same naming.
- qwen2.5-1.5b: the model card ``Qwen/Qwen2.5-1.5B-Instruct-GGUF/README.md`` (licence
  apache-2.0); public scripts pin ``qwen2.5-1.5b-instruct-q4_k_m.gguf`` at 1,117,320,736 bytes.
- gemma3-1b: llama.cpp usage notes run ``llama-server -hf ggml-org/gemma-3-1b-it-GGUF``; a
  public app downloads ``ggml-org/gemma-3-1b-it-GGUF/resolve/main/gemma-3-1b-it-Q4_K_M.gguf``;
  the same file name is 806 MB in the unsloth and lmstudio-community copies of that model.
- llama3.2-1b: bartowski's model card lists ``Llama-3.2-1B-Instruct-Q4_K_M.gguf``, 0.81 GB.
- llama3.2-3b: the repo's file tree lists ``Llama-3.2-3B-Instruct-Q4_K_M.gguf``, 2.02 GB,
  licence llama3.2.
- smollm2-1.7b: the repo's file tree lists ``smollm2-1.7b-instruct-q4_k_m.gguf``, 1.06 GB,
  licence apache-2.0.

Anything else on the Hub: ``python -m localbot.download REPO FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    repo: str
    file: str
    size: int
    """Approximate size in bytes (for ``--list``; the Hub's exact size is checked on download)."""
    licence: str
    description: str


CATALOGUE: tuple[CatalogueEntry, ...] = (
    CatalogueEntry(
        name="qwen2.5-0.5b",
        repo="Qwen/Qwen2.5-0.5B-Instruct-GGUF",
        file="qwen2.5-0.5b-instruct-q4_k_m.gguf",
        size=491_000_000,
        licence="Apache-2.0",
        description="Qwen2.5 0.5B Instruct: the smallest useful chat model, fast on any CPU",
    ),
    CatalogueEntry(
        name="qwen2.5-1.5b",
        repo="Qwen/Qwen2.5-1.5B-Instruct-GGUF",
        file="qwen2.5-1.5b-instruct-q4_k_m.gguf",
        size=1_117_000_000,
        licence="Apache-2.0",
        description="Qwen2.5 1.5B Instruct: a good default for a laptop",
    ),
    CatalogueEntry(
        name="gemma3-1b",
        repo="ggml-org/gemma-3-1b-it-GGUF",
        file="gemma-3-1b-it-Q4_K_M.gguf",
        size=806_000_000,
        licence="Gemma Terms of Use (ai.google.dev/gemma/terms)",
        description="Gemma 3 1B instruct, converted by the llama.cpp team",
    ),
    CatalogueEntry(
        name="llama3.2-1b",
        repo="bartowski/Llama-3.2-1B-Instruct-GGUF",
        file="Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        size=808_000_000,
        licence="Llama 3.2 Community License (with Meta's acceptable use policy)",
        description="Llama 3.2 1B Instruct",
    ),
    CatalogueEntry(
        name="llama3.2-3b",
        repo="bartowski/Llama-3.2-3B-Instruct-GGUF",
        file="Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        size=2_020_000_000,
        licence="Llama 3.2 Community License (with Meta's acceptable use policy)",
        description="Llama 3.2 3B Instruct: the strongest here, wants 4 GB of free RAM",
    ),
    CatalogueEntry(
        name="smollm2-1.7b",
        repo="HuggingFaceTB/SmolLM2-1.7B-Instruct-GGUF",
        file="smollm2-1.7b-instruct-q4_k_m.gguf",
        size=1_060_000_000,
        licence="Apache-2.0",
        description="SmolLM2 1.7B Instruct, by Hugging Face",
    ),
)


def find(name: str) -> CatalogueEntry | None:
    """The catalogue entry called ``name`` (case-insensitive), if any."""
    wanted = name.lower()
    return next((entry for entry in CATALOGUE if entry.name == wanted), None)


def find_file(repo: str, file: str) -> CatalogueEntry | None:
    """The catalogue entry for this repo and file, if any."""
    return next((e for e in CATALOGUE if e.repo == repo and e.file == file), None)
