"""Check a GGUF file and read its metadata before llama.cpp sees it.

llama.cpp reports a wrong or damaged file as a C-level log line and a generic ``ValueError`` (and
aborts the process on some, e.g. a ``general.alignment`` that is not a uint32); reading the header
ourselves lets us say exactly what is wrong (missing, unreadable, not GGUF, unsupported version,
truncated, corrupt) and gives cheap access to the metadata (architecture, chat template, trained
context) without loading any weights. Only scalar and string metadata values are kept; arrays (the
vocabulary) are skipped over.

The file may be hostile, so every count and length is checked against the bytes that remain
before anything is allocated, multiplied or looped over, and the limits are llama.cpp's own
(``ggml/src/gguf.cpp``): strings and arrays of at most 2^30, no arrays of arrays, at most 4
dimensions per tensor, tensor names under 64 bytes, element counts that fit an int64, tensors
packed in order. The header is read through ``mmap``: only the pages walked are touched, so the
check costs the same for a 200 MB and a 20 GB model.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localbot.atomic import FileTypeError, open_regular
from localbot.errors import ModelFileError, quoted

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# llama.cpp's limits (ggml.h, gguf.cpp): a file outside them is refused there too.
MAX_DIMS = 4
MAX_NAME = 64
MAX_STRING = 1 << 30
MAX_ARRAY = 1 << 30
INT64_MAX = (1 << 63) - 1

# GGUF value types -> struct format for scalars.
SCALAR_FORMATS = {
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
_UINT32, _STRING, _ARRAY = 4, 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

# Smallest possible encodings, to reject counts that the remaining bytes cannot hold:
# a key/value pair is a key length, a 1-byte key, a type and a 1-byte value; a tensor info is
# a name length, a dimension count, a type and an offset.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 4 + 8

# ggml tensor types -> (elements per block, bytes per block) from ggml-common.h's block structs,
# for the size checks. A type missing here (a newer one, or Q8_1, which only exists at run time and
# whose size the gguf package and ggml disagree on) stops those checks: llama.cpp decides then.
_TYPE_SIZES = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
    42: (64, 18),  # Q2_0
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


def _show(raw: bytes) -> str:
    """A key or tensor name from the file, quoted for a one-line message."""
    return quoted(raw[:200].decode("utf-8", errors="replace"), 60)


class _Header:
    """A cursor over the mapped file that refuses to read past its end."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)

    def corrupt(self, why: str) -> ModelFileError:
        return ModelFileError(
            f"{self.path} is corrupt ({why}); download or copy it again, or use another .gguf file"
        )

    def past_end(self, what: str, need: int) -> ModelFileError:
        return ModelFileError(
            f"{self.path} is truncated or corrupt ({what} at byte {self.pos:,} needs {need:,} "
            f"bytes, the file has {self.end - self.pos:,} left); download or copy it again"
        )

    def skip(self, n: int, what: str) -> int:
        """Advance over ``n`` bytes; return where they start."""
        if n > self.end - self.pos:
            raise self.past_end(what, n)
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.skip(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.skip(8, what))[0]

    def count(self, what: str, min_bytes_each: int, limit: int) -> int:
        """A count that the remaining bytes can hold (checked before anything loops over it)."""
        n = self.u64(what)
        if n > limit:
            raise self.corrupt(f"{what} is {n:,}, more than llama.cpp's limit of {limit:,}")
        if n * min_bytes_each > self.end - self.pos:
            raise self.past_end(f"{what} of {n:,}", n * min_bytes_each)
        return n

    def string(self, what: str) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > MAX_STRING:
            raise self.corrupt(f"{what} claims {n:,} bytes, more than llama.cpp's limit")
        return self.buf[self.skip(n, what) : self.pos]

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` length-prefixed strings (a 262k-entry vocabulary, for one) in a tight
        loop over the mapping: one unpack and one add per string."""
        buf, pos, last = self.buf, self.pos, self.end - 8
        unpack = _U64.unpack_from
        for i in range(count):
            if pos > last:  # also where a huge length landed: it is caught here, never used
                raise ModelFileError(
                    f"{self.path} is truncated or corrupt (string {i:,} of {count:,} in {what} "
                    "runs past the end of the file); download or copy it again"
                )
            pos += 8 + unpack(buf, pos)[0]
        if pos > self.end:
            raise ModelFileError(
                f"{self.path} is truncated or corrupt (the last string in {what} runs past the "
                "end of the file); download or copy it again"
            )
        self.pos = pos


def read_gguf(path: str | Path) -> GGUFInfo:
    """Validate ``path`` as a complete GGUF file and return its header metadata.

    Raises ModelFileError with a one-line reason for a missing or unreadable file, a directory, a
    file that is not GGUF, an unsupported GGUF version, a header that breaks llama.cpp's limits,
    or a file shorter than its tensors say it should be.
    """
    path = Path(path).expanduser()
    try:
        fd, info = open_regular(path)  # never blocks on a FIFO; refuses anything not a file
    except FileNotFoundError:
        raise ModelFileError(
            f"model file not found: {path} (give the path to a .gguf file)"
        ) from None
    except FileTypeError:
        raise ModelFileError(f"{path} is not a file (give the path to a .gguf file)") from None
    except OSError as err:  # permission denied, a loop of links, a file used as a directory
        raise ModelFileError(
            f"cannot open the model file {path}: {err.strerror or err} "
            "(check its permissions, or give another .gguf file)"
        ) from None
    except ValueError:  # a NUL in the path (only possible from Python)
        raise ModelFileError(f"{quoted(str(path))} is not a usable file path") from None
    try:
        return _read_open(fd, info.st_size, path)
    except OSError as err:  # an I/O error, or a file that cannot be mapped
        raise ModelFileError(f"cannot read the model file {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)


def _read_open(fd: int, size: int, path: Path) -> GGUFInfo:
    magic = os.read(fd, 4)  # at offset 0: just opened
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF model file (it starts with {magic!r}, not b'GGUF'); "
            "localbot needs a llama.cpp .gguf file"
        )
    with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as buf:
        header = _Header(buf, path)
        header.skip(4, "the magic")
        version = header.u32("the GGUF version")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFileError(
                f"{path} uses GGUF version {version}; this llama.cpp reads versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        tensor_count = header.u64("the tensor count")
        kv_count = header.count("the metadata count", _MIN_KV_BYTES, INT64_MAX)
        metadata, alignment = _read_metadata(header, kv_count)
        if tensor_count * _MIN_TENSOR_BYTES > header.end - header.pos:
            raise header.past_end(
                f"the tensor count of {tensor_count:,}", tensor_count * _MIN_TENSOR_BYTES
            )
        data_end = _tensor_data_end(header, tensor_count, alignment)
    if data_end is not None and data_end > size:
        raise ModelFileError(
            f"{path} is truncated ({size:,} bytes, its tensors need {data_end:,}); "
            "download or copy it again"
        )
    return GGUFInfo(path=path, version=version, tensor_count=tensor_count, metadata=metadata)


def _read_metadata(header: _Header, kv_count: int) -> tuple[dict[str, Any], int]:
    """The scalar and string values by key (arrays skipped), and the data alignment."""
    metadata: dict[str, Any] = {}
    seen: set[bytes] = set()
    alignment = DEFAULT_ALIGNMENT
    for i in range(kv_count):
        raw_key = header.string(f"metadata key {i}")
        if not raw_key:
            raise header.corrupt(f"metadata key {i} is empty")
        if raw_key in seen:
            raise header.corrupt(f"metadata key {_show(raw_key)} appears twice")
        seen.add(raw_key)
        key = raw_key.decode("utf-8", errors="replace")
        vtype = header.u32(f"the type of {_show(raw_key)}")
        value = _read_value(header, raw_key, vtype)
        if key == "general.alignment":
            if vtype != _UINT32:
                raise header.corrupt(f"general.alignment has GGUF type {vtype}, not uint32")
            if not value or value & (value - 1):
                raise header.corrupt(f"general.alignment is {value:,}, not a power of two")
            alignment = value
        metadata[key] = value  # None for an array: the key is there, its items are not kept
    return metadata, alignment


def _read_value(header: _Header, raw_key: bytes, vtype: int) -> Any:
    what = f"the value of {_show(raw_key)}"
    if vtype in SCALAR_FORMATS:
        fmt = "<" + SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, header.buf, header.skip(struct.calcsize(fmt), what))[0]
    if vtype == _STRING:
        return header.string(what).decode("utf-8", errors="replace")
    if vtype != _ARRAY:
        raise header.corrupt(f"{_show(raw_key)} has unknown GGUF value type {vtype}")
    item_type = header.u32(f"the item type of {_show(raw_key)}")
    if item_type in SCALAR_FORMATS:
        item_size = struct.calcsize("<" + SCALAR_FORMATS[item_type])
        count = header.count(f"the length of array {_show(raw_key)}", item_size, MAX_ARRAY)
        header.skip(count * item_size, what)
    elif item_type == _STRING:
        count = header.count(f"the length of array {_show(raw_key)}", 8, MAX_ARRAY)
        header.skip_strings(count, what)
    else:  # llama.cpp refuses arrays of arrays, so nesting never goes deeper than this
        raise header.corrupt(f"array {_show(raw_key)} has items of type {item_type}")
    return None


def _tensor_data_end(header: _Header, tensor_count: int, alignment: int) -> int | None:
    """Byte offset where the last tensor's data ends, or None when a tensor type is unknown."""
    seen: set[bytes] = set()
    end_in_data = packed = 0
    known = True
    for i in range(tensor_count):
        name = header.string(f"the name of tensor {i}")
        shown = _show(name)
        if len(name) >= MAX_NAME:
            raise header.corrupt(f"tensor {i} has a {len(name):,}-byte name (limit {MAX_NAME})")
        if name in seen:
            raise header.corrupt(f"tensor {shown} appears twice")
        seen.add(name)
        n_dims = header.u32(f"the dimension count of tensor {shown}")
        if n_dims > MAX_DIMS:  # checked before reading them: no loop over 200k dimensions
            raise header.corrupt(
                f"tensor {shown} has {n_dims:,} dimensions; llama.cpp allows at most {MAX_DIMS}"
            )
        dims = [header.u64(f"a dimension of tensor {shown}") for _ in range(n_dims)]
        if any(dim > INT64_MAX for dim in dims):
            raise header.corrupt(f"tensor {shown} has a negative dimension")
        elements = 1
        for dim in dims:  # at most 4 factors under 2^63: cheap
            elements *= dim
        if elements > INT64_MAX:
            raise header.corrupt(f"tensor {shown} has more than 2^63 elements")
        ggml_type = header.u32(f"the type of tensor {shown}")
        offset = header.u64(f"the data offset of tensor {shown}")
        if ggml_type not in _TYPE_SIZES:
            known = False
            continue
        block, block_bytes = _TYPE_SIZES[ggml_type]
        if (dims[0] if dims else 1) % block:
            raise header.corrupt(f"the rows of tensor {shown} are not whole blocks of its type")
        nbytes = elements // block * block_bytes
        if known and offset != packed:  # llama.cpp wants the tensors packed in order
            where = f"at offset {offset:,}, not {packed:,}"
            raise header.corrupt(f"the data of tensor {shown} is {where}")
        packed += -(-nbytes // alignment) * alignment
        end_in_data = max(end_in_data, offset + nbytes)
    data_start = -(-header.pos // alignment) * alignment
    return data_start + end_in_data if known else None
