"""The safetensors file format, read strictly and written as a stream.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
tensor bytes, offsets relative to the end of the header.

``read_header`` checks everything safetensors itself checks before any tensor is touched: header
size capped, valid JSON, known dtypes, byte counts that equal shape x dtype, offsets contiguous
and exactly covering the file. So a truncated download or a hostile file is refused before the
converter writes a byte. ``read_tensor`` then maps one tensor at a time.

``ShardWriter`` writes a file whose header is known in advance (the plan fixes every output
tensor's dtype and shape), then takes tensors one at a time, hashing as it goes (``sink.py``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import CorruptCheckpointError, PickleCheckpointError
from .sink import BackgroundHash, FileSink

__all__ = [
    "DTYPES",
    "TensorInfo",
    "SafetensorsHeader",
    "read_header",
    "parse_header",
    "read_tensor",
    "ShardWriter",
    "dtype_name",
]

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault the pages in with one call

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
# Magic numbers of what people mistake for safetensors: a zip (torch.save) or a raw pickle.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name for a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return _NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: the tensors in file order, the metadata, and the file's size."""

    path: Path
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]
    file_size: int

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def json_metadata(self, key: str, damaged: Callable[[str], Exception]) -> dict:
        """The JSON object a tool stored under ``key`` in ``__metadata__`` (our calibration and
        recorded-inputs files); ``damaged(why)`` is the one-line error for a file without it."""
        raw = self.metadata.get(key)
        if raw is None:
            raise damaged(f"no {key!r} metadata")
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise damaged("its metadata is not valid JSON") from e
        if not isinstance(value, dict):
            raise damaged("its metadata is not a JSON object")
        return value


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate a safetensors header; raise ``CorruptCheckpointError`` naming the problem."""
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        head = f.read(9)
        prefix = head[:8]
        # A header length can begin with a pickle's magic bytes too (640 is 80 02 00 ...); its JSON cannot.
        if prefix.startswith(_PICKLE_MAGIC) and head[8:9] != b"{":
            raise PickleCheckpointError(
                f"{path}: this is a pickle (torch.save) checkpoint named .safetensors; omni-fp8 never "
                "unpickles. Re-save it with safetensors on a machine you trust.",
                path=path,
            )
        if len(prefix) < 8:
            raise _corrupt(path, f"the file is {size} bytes, too short to hold a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise _corrupt(path, f"its header claims {header_len} bytes (limit {MAX_HEADER_BYTES})")
        if 8 + header_len > size:
            raise _corrupt(path, f"the header needs {8 + header_len} bytes but the file has {size}")
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError as e:
        raise _corrupt(path, "its header nests JSON too deeply to be a tensor table") from e
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _corrupt(path, f"its header is not valid UTF-8 JSON ({e})") from e
    return parse_header(path, header, data_start=8 + header_len, file_size=size)


def parse_header(path: Path, header: object, *, data_start: int, file_size: int) -> SafetensorsHeader:
    """Validate a decoded header table (``{name: {dtype, shape, data_offsets}, "__metadata__": ...}``).

    ``read_header`` hands it a file's own header; a header read remotely (from the Hugging Face
    Hub, without the file) goes through the same checks, so a plan never rests on a table that
    a local read would have refused.
    """
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    header = dict(header)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ must map strings to strings")

    entries: list[TensorInfo] = []
    for name, entry in header.items():
        entries.append(_parse_entry(path, name, entry, data_start))
    entries.sort(key=lambda t: (t.begin, t.end))
    expected = data_start
    for info in entries:
        if info.begin != expected:
            what = "overlaps the previous tensor" if info.begin < expected else "leaves a gap before it"
            raise _corrupt(path, f"tensor {info.name!r} {what} (data_offsets are not contiguous)")
        expected = info.end
    if expected != file_size:
        if expected > file_size:
            raise _corrupt(
                path, f"the tensors need {expected} bytes but the file has {file_size}: the file is truncated"
            )
        raise _corrupt(path, f"{file_size - expected} trailing bytes after the last tensor")
    return SafetensorsHeader(
        path=path, tensors={t.name: t for t in entries}, metadata=metadata, file_size=file_size
    )


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(path, f"tensor {name!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _corrupt(path, f"tensor {name!r} has malformed data_offsets {offsets!r}")
    needed = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != needed:
        raise _corrupt(
            path,
            f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {needed}",
        )
    return TensorInfo(
        name=name,
        file=path,
        dtype=dtype,
        shape=tuple(shape),
        begin=data_start + offsets[0],
        end=data_start + offsets[1],
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    """One tensor of an open file: a zero-copy, read-only view of a memory map of just its bytes.

    Mapping only this tensor's pages (not the whole file, as ``safe_open`` does) keeps the
    process's resident memory to the tensors in hand; the mapping goes away with the tensor.
    Compared with ``readinto``, it saves a full copy of every byte read.
    """
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.torch_dtype)
    if os.fstat(f.fileno()).st_size < info.end:  # mapping past the end would crash on access
        raise _corrupt(info.file, f"tensor {info.name!r} ends past the end of the file (it shrank)")
    start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
    region = mmap.mmap(
        f.fileno(), info.end - start, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ, offset=start
    )
    with warnings.catch_warnings():  # torch warns that the buffer is read-only; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        data = torch.frombuffer(region, dtype=torch.uint8, offset=info.begin - start, count=info.nbytes)
    return data.view(info.torch_dtype).reshape(info.shape)


def _corrupt(path: Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: not a valid safetensors file: {why}. Re-download or re-save it.", path=path
    )


class ShardWriter:
    """Stream tensors into a safetensors file whose layout is fixed up front.

    Tensors must be written in the order given, with exactly the declared dtype and shape;
    ``close()`` refuses a file with tensors missing. The SHA-256 of the file is computed while
    writing, so the manifest needs no second read.

        >>> with ShardWriter(path, [("a", torch.float32, (2,))]) as w:  # doctest: +SKIP
        ...     w.write("a", torch.ones(2))
    """

    def __init__(
        self,
        path: str | Path,
        layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        *,
        direct: bool = True,
    ) -> None:
        self.path = Path(path)
        self._layout = list(layout)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dtype, shape in self._layout:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": dtype_name(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned, as safetensors does
        self._file = FileSink(self.path, direct=direct)
        self._sha = BackgroundHash()
        self._next = 0
        try:
            self._emit(torch.frombuffer(bytearray(struct.pack("<Q", len(raw)) + raw), dtype=torch.uint8))
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor, *, on_done: Callable[[], None] | None = None) -> None:
        """Append the next tensor of the layout; ``on_done`` runs once its bytes are no longer needed."""
        if self._next >= len(self._layout):
            raise ValueError(f"{self.path}: {name!r} is not in this shard's layout")
        want_name, dtype, shape = self._layout[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.path}: expected {want_name} {dtype}{list(shape)}, "
                f"got {name} {tensor.dtype}{list(tensor.shape)}"
            )
        self._emit(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8), on_done)
        self._next += 1

    @property
    def size(self) -> int:
        return self._file.size

    def _emit(self, data: torch.Tensor, on_done: Callable[[], None] | None = None) -> None:
        self._file.write(data)
        self._sha.update(memoryview(data.numpy()), on_done)

    def close(self) -> str:
        """Finish the file and return its SHA-256 hex digest."""
        try:
            self._file.close()
        finally:
            digest = self._sha.hexdigest()
        if self._next != len(self._layout):
            missing = [n for n, _, _ in self._layout[self._next :]]
            raise ValueError(f"{self.path}: closed with {len(missing)} tensors unwritten ({missing[0]}, ...)")
        return digest

    def abort(self) -> None:
        self._file.abort()
        self._sha.hexdigest()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
