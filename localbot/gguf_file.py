"""Check a GGUF file and read its metadata before llama.cpp sees it.

llama.cpp reports a wrong or damaged file as a C-level log line and a generic ``ValueError``;
reading the header ourselves lets us say exactly what is wrong (missing, not GGUF, unsupported
version, truncated) and gives cheap access to the metadata (architecture, chat template, trained
context) without loading any weights. Only scalar and string metadata values are kept; arrays (the
vocabulary) are skipped over.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from localbot.errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format for scalars.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9

# ggml tensor types -> (elements per block, bytes per block), for the truncation check.
# Types missing here are skipped by that check (llama.cpp still checks bounds when loading).
_TYPE_SIZES = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 36),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    30: (1, 2),
}


@dataclass(frozen=True)
class GGUFInfo:
    """What the header of a GGUF file says."""

    path: Path
    version: int
    tensor_count: int
    metadata: dict[str, Any] = field(repr=False)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path) -> None:
        self.fh, self.path = fh, path

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise ModelFileError(
                f"{self.path} is truncated (its GGUF header ends early); download or copy it again"
            )
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            self.skip_array(item_type, count)
            return None
        raise ModelFileError(f"{self.path} is corrupt (unknown GGUF value type {vtype})")

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` length-prefixed strings (a 262k-entry vocabulary, for one) by walking
        1 MiB blocks, not one read per string: the check stays cheap at every start."""
        length = struct.Struct("<Q").unpack_from
        buf, pos = b"", 0
        while count:
            if len(buf) - pos < 8:
                buf, pos = buf[pos:] + self.fh.read(1 << 20), 0
                if len(buf) < 8:
                    self.read(8)  # past the end of the file: raises "truncated"
            pos += 8 + length(buf, pos)[0]
            count -= 1
            if pos > len(buf):  # a string longer than the block: skip the rest on disk
                self.fh.seek(pos - len(buf), 1)
                buf, pos = b"", 0
        self.fh.seek(pos - len(buf), 1)  # give back what was read past the last string

    def skip_array(self, item_type: int, count: int) -> None:
        if item_type in _SCALARS:
            self.fh.seek(struct.calcsize("<" + _SCALARS[item_type]) * count, 1)
        elif item_type == _STRING:
            self.skip_strings(count)
        else:
            for _ in range(count):
                self.value(item_type)


def read_gguf(path: str | Path) -> GGUFInfo:
    """Validate ``path`` as a complete GGUF file and return its header metadata.

    Raises ModelFileError with a one-line reason for a missing file, a directory, a file that is not
    GGUF, an unsupported GGUF version, or a file shorter than its tensors say it should be.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"model file not found: {path} (give the path to a .gguf file)")
    if not path.is_file():
        raise ModelFileError(f"{path} is not a file (give the path to a .gguf file)")
    size = path.stat().st_size
    with path.open("rb") as fh:
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFileError(
                f"{path} is not a GGUF model file (it starts with {magic!r}, not b'GGUF'); "
                "localbot needs a llama.cpp .gguf file"
            )
        reader = _Reader(fh, path)
        version = reader.unpack("I")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFileError(
                f"{path} uses GGUF version {version}; this llama.cpp reads versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        tensor_count, kv_count = reader.unpack("Q"), reader.unpack("Q")
        if tensor_count > 1_000_000 or kv_count > 1_000_000:
            raise ModelFileError(f"{path} is corrupt (implausible GGUF header counts)")
        metadata = {}
        for _ in range(kv_count):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("I"))
        data_end = _tensor_data_end(reader, tensor_count, metadata)
    if data_end is not None and data_end > size:
        raise ModelFileError(
            f"{path} is truncated ({size:,} bytes, its tensors need {data_end:,}); "
            "download or copy it again"
        )
    return GGUFInfo(path=path, version=version, tensor_count=tensor_count, metadata=metadata)


def _tensor_data_end(reader: _Reader, tensor_count: int, metadata: dict[str, Any]) -> int | None:
    """Byte offset where the last tensor's data ends, or None when a tensor type is unknown."""
    end_in_data, known = 0, True
    for _ in range(tensor_count):
        reader.string()
        n_dims = reader.unpack("I")
        elements = 1
        for _ in range(n_dims):
            elements *= reader.unpack("Q")
        ggml_type, offset = reader.unpack("I"), reader.unpack("Q")
        if ggml_type not in _TYPE_SIZES:
            known = False
            continue
        block, nbytes = _TYPE_SIZES[ggml_type]
        end_in_data = max(end_in_data, offset + elements // block * nbytes)
    alignment = int(metadata.get("general.alignment") or DEFAULT_ALIGNMENT)
    header_end = reader.fh.tell()
    data_start = (header_end + alignment - 1) // alignment * alignment
    return data_start + end_in_data if known else None
