"""Writing a converted folder's files: streamed shards, the index, JSON, carried-over files.

Shards are laid out from the plan before any tensor is read (every output dtype and shape is
known), so each shard's header is written first and its tensors follow one at a time; the process
never holds more than the tensor in hand and a small queue of finished ones. A weight and its
scale always share a shard. File names and the index follow diffusers
(``diffusion_pytorch_model-00001-of-00003.safetensors`` and
``diffusion_pytorch_model.safetensors.index.json``), so the output looks like any diffusers folder.

Everything is written into a hidden staging folder (``output.py``) and published only when
complete, manifest last: an interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SourceNotFoundError
from .numerics import FP8_DTYPE, cast_checked, quantize_weight, shared_scale, weight_amax
from .plan import KEPT, Plan, TensorPlan
from .safetensors_format import ShardWriter, TensorInfo
from .source import INDEX_NAME

__all__ = [
    "FileRecord",
    "FileTensor",
    "write_file",
    "SharedScales",
    "assign_shards",
    "shard_filename",
    "write_shards",
    "write_index",
    "write_json",
    "hash_file",
    "carry_over",
]

_QUEUE_DEPTH = 2  # finished tensors waiting for the writer thread: the bounded write buffer
_POOL_BUFFERS = 4  # quantized weights in flight: filling, queued, being written, being hashed
_HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


def shard_filename(index: int, count: int) -> str:
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


def assign_shards(tensors: Sequence[TensorPlan], max_shard_size: int) -> list[list[TensorPlan]]:
    """Greedy, in source order: start a new shard when the next tensor (with its scale) would not fit.

    A single tensor larger than the limit gets a shard of its own, as diffusers does.
    """
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        nbytes = sum(o.nbytes for o in t.outputs)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def write_shards(
    plan: Plan,
    folder: Path,
    *,
    max_shard_size: int,
    on_tensor: Callable[[TensorPlan], None] | None = None,
) -> tuple[dict[str, FileRecord], dict[str, str]]:
    """Write every shard of ``plan`` into ``folder``; return file records and the weight map.

    The calling thread maps and quantizes; a writer thread writes and each shard hashes itself in
    a third, so the arithmetic, the disk and SHA-256 overlap. ``on_tensor`` is called after each source tensor (progress bars).
    """
    groups = assign_shards(plan.tensors, max_shard_size)
    records: dict[str, FileRecord] = {}
    weight_map: dict[str, str] = {}
    largest = max((math.prod(t.source.shape) for t in plan.tensors if t.scheme != KEPT), default=0)
    pool = _BufferPool(largest, count=_POOL_BUFFERS)
    # Items: (writer, name, tensor, on_done) to write, (writer, "", None, None) to close that
    # shard, None to stop.
    work: queue.Queue[tuple[ShardWriter, str, torch.Tensor | None, Callable[[], None] | None] | None]
    work = queue.Queue(_QUEUE_DEPTH)
    failure: list[BaseException] = []

    def drain() -> None:
        while (item := work.get()) is not None:
            writer, name, tensor, on_done = item
            try:
                if failure:
                    continue  # keep draining so the producer never blocks on a dead consumer
                if tensor is None:
                    records[writer.path.name] = FileRecord(writer.size, writer.close())
                else:
                    writer.write(name, tensor, on_done=on_done)
                    on_done = None  # the writer's hasher calls it
            except BaseException as e:  # re-raised in the calling thread
                failure.append(e)
            finally:
                if on_done is not None:
                    on_done()

    thread = threading.Thread(target=drain, name="omni-fp8-writer", daemon=True)
    thread.start()
    writers: list[ShardWriter] = []
    torch_threads = torch.get_num_threads()
    # Leave a core to the writer and hasher threads: on 2 cores, two torch threads fighting them
    # for the CPU made the whole conversion slower (measured in bench/RESULTS.md).
    torch.set_num_threads(max(1, min(torch_threads, (os.cpu_count() or 2) - 1)))
    try:
        with plan.source.open_reader(order=read_order(plan, [t for group in groups for t in group])) as reader:
            scales = SharedScales(plan, reader)
            for i, group in enumerate(groups, 1):
                filename = shard_filename(i, len(groups))
                writer = ShardWriter(folder / filename, [(o.name, o.dtype, o.shape) for t in group for o in t.outputs])
                writers.append(writer)
                for t in group:
                    for name, tensor, on_done in _convert_tensor(t, reader.read(t.source), pool, scales):
                        if failure:
                            raise failure[0]
                        work.put((writer, name, tensor, on_done))
                        weight_map[name] = filename
                    if on_tensor is not None:
                        on_tensor(t)
                work.put((writer, "", None, None))
    finally:
        torch.set_num_threads(torch_threads)
        work.put(None)
        thread.join()
        for w in writers:
            w.abort()
    if failure:
        raise failure[0]
    return records, weight_map


class _BufferPool:
    """A few reusable buffers for quantized weights.

    A fresh 50 MB allocation per weight costs the kernel a page fault and a zeroed page for every
    4 KiB of it (measured: as much system time as the arithmetic takes); these buffers are
    faulted in once and cycle between the quantizer, the writer and the hasher. Their number also
    bounds how many finished weights can wait for the disk.
    """

    def __init__(self, elements: int, *, count: int) -> None:
        self._elements = elements
        self._free: queue.Queue[torch.Tensor | None] = queue.Queue()
        for _ in range(count):
            self._free.put(None)  # allocated on first use

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, Callable[[], None]]:
        """An FP8 tensor of ``shape`` on a pooled buffer, and the callback that gives it back."""
        buf = self._free.get()
        if buf is None:
            buf = torch.empty(self._elements, dtype=FP8_DTYPE)
        return buf[: math.prod(shape)].view(shape), functools.partial(self._free.put, buf)


class SharedScales:
    """The one scale of each fused group, computed when its first part is written.

    Every part's ``max(|W|)`` is read first (the parts sit next to each other in a checkpoint, so
    the second read comes from the page cache), then ``shared_scale`` combines them; each part is
    then quantized with it. Costs one extra pass over the fused weights, no extra memory.
    """

    def __init__(self, plan: Plan, reader: Any) -> None:
        self._groups = plan.scale_groups
        self._reader = reader
        self._scales: dict[str, torch.Tensor] = {}
        self._rows: dict[str, torch.Tensor] = {}  # per-channel scales, from quantizing the weight until written

    def quantize(self, t: TensorPlan, tensor: torch.Tensor) -> torch.Tensor:
        """``t``'s FP8 codes for a single-file layout, keeping per-row scales for their own tensor."""
        if t.per_channel:
            q, rows = quantize_weight(tensor, per_channel=True, name=t.name)
            self._rows[t.name] = rows
            return q
        return quantize_weight(tensor, t.block_size, name=t.name, scale=self.scale_of(t, tensor))[0]

    def row_scales(self, t: TensorPlan) -> torch.Tensor:
        """One float32 scale per output row ``[N]``: a per-channel weight's own, else its scale repeated."""
        rows = self._rows.pop(t.name, None)
        if rows is None and t.per_channel:
            rows = quantize_weight(self._reader.read(t.source), per_channel=True, name=t.name)[1]
        if rows is None:
            return self.scale_of(t).expand(t.source.shape[0]).contiguous()
        return rows.reshape(-1)

    def scale_of(self, t: TensorPlan, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """A per-tensor FP8 weight's scale: its group's, else its own (the same formula, one part).

        ``tensor`` is ``t``'s source when the caller holds it, so it is not read again.
        """
        scale = self.for_tensor(t, tensor)
        if scale is None:
            scale = self._scales.get(t.name)
        if scale is None:
            source = self._reader.read(t.source) if tensor is None else tensor
            scale = shared_scale([weight_amax(source, name=t.name)])
            self._scales[t.name] = scale
        return scale

    def for_tensor(self, t: TensorPlan, tensor: torch.Tensor | None = None) -> torch.Tensor | None:
        """``t``'s group scale, or ``None`` outside a group; the other parts are read in the order
        ``read_order`` announces."""
        if t.scale_group is None:
            return None
        scale = self._scales.get(t.scale_group)
        if scale is None:
            parts = self._groups[t.scale_group]
            scale = shared_scale([
                weight_amax(tensor if tensor is not None and p.name == t.name else self._reader.read(p.source),
                            name=p.name)
                for p in parts
            ])
            self._scales[t.scale_group] = scale
        return scale


def read_order(plan: Plan, parts: Sequence[TensorPlan]) -> list[TensorInfo]:
    """The source tensors a writer reads, in order, for ``parts`` written in that order.

    Each part is read in its turn; the first quantized part of a scale group also reads the
    group's other parts for their shared scale (``SharedScales.for_tensor``), which are read
    again in their turn. The reader holds what it read past the page cache until its last read.
    """
    order: list[TensorInfo] = []
    seen: set[str] = set()
    groups = plan.scale_groups
    for t in parts:
        order.append(t.source)
        if t.scale_group is not None and t.scheme != KEPT and t.scale_group not in seen:
            seen.add(t.scale_group)
            order += [p.source for p in groups[t.scale_group] if p.name != t.name]
    return order


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a single-file export, made from plan tensors (an engine's layout, ``export_*.py``).

    ``role`` says what of ``parts`` it holds, concatenated along dim 0 in order: ``data`` (the FP8
    codes of quantized parts, the tensors of kept ones), ``scale`` (the parts' one per-tensor
    scale, 0-dim), ``row_scale`` (one scale per output row: a per-channel weight's own, else the
    per-tensor scale repeated) or ``constant``.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: tuple[TensorPlan, ...] = ()
    role: str = "data"
    constant: torch.Tensor | None = None


def write_file(
    plan: Plan,
    tensors: Sequence[FileTensor],
    path: Path,
    *,
    metadata: dict[str, str],
    on_tensor: Callable[[int], None] | None = None,
) -> FileRecord:
    """Write one safetensors file laid out as ``tensors`` (renamed, fused, re-laid-out plan tensors).

    Quantization goes through the same numerics as a folder; a fused tensor is its parts'
    codes, each quantized with the group's shared scale, so it equals quantizing the fused
    weight. ``on_tensor`` gets the source bytes of each finished data tensor (progress bars).
    """
    writer = ShardWriter(path, [(t.name, t.dtype, t.shape) for t in tensors], metadata)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(torch_threads, (os.cpu_count() or 2) - 1)))
    try:
        order = read_order(plan, [p for t in tensors if t.role == "data" for p in t.parts])
        with plan.source.open_reader(order=order) as reader:
            scales = SharedScales(plan, reader)
            for t in tensors:
                writer.write(t.name, _file_tensor(t, reader, scales))
                if on_tensor is not None and t.role == "data":
                    on_tensor(sum(p.source.nbytes for p in t.parts))
        return FileRecord(writer.size, writer.close())
    except BaseException:
        writer.abort()
        raise
    finally:
        torch.set_num_threads(torch_threads)


def _file_tensor(t: FileTensor, reader: Any, scales: SharedScales) -> torch.Tensor:
    if t.role == "constant":
        assert t.constant is not None
        return t.constant
    if t.role == "scale":
        return scales.scale_of(t.parts[0])
    if t.role == "row_scale":
        return scales.row_scales(t.parts[0]).reshape(t.shape)
    pieces = []
    for part in t.parts:
        tensor = reader.read(part.source)
        if part.scheme == KEPT:
            out_dtype = part.outputs[0].dtype
            pieces.append(tensor if tensor.dtype == out_dtype else cast_checked(tensor, out_dtype, name=part.name))
        else:
            pieces.append(scales.quantize(part, tensor))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _convert_tensor(
    t: TensorPlan, tensor: torch.Tensor, pool: _BufferPool, scales: SharedScales
) -> Iterator[tuple[str, torch.Tensor, Callable[[], None] | None]]:
    if t.scheme == KEPT:
        out_dtype = t.outputs[0].dtype
        yield t.name, tensor if tensor.dtype == out_dtype else cast_checked(tensor, out_dtype, name=t.name), None
        return
    out, give_back = pool.take(t.source.shape)
    try:
        q, scale = quantize_weight(tensor, t.block_size, per_channel=t.per_channel, name=t.name, out=out,
                                   scale=scales.for_tensor(t, tensor))
    except BaseException:
        give_back()
        raise
    yield t.name, q, give_back
    yield t.scale_name, scale, None
    if t.input_scale is not None:
        yield t.input_scale_name, torch.tensor(t.input_scale, dtype=torch.float32), None


def write_json(path: Path, value: Any) -> FileRecord:
    """Write JSON the way diffusers does (indented, sorted keys, trailing newline), atomically."""
    data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return FileRecord(len(data), hashlib.sha256(data).hexdigest())


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> FileRecord:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return write_json(folder / INDEX_NAME, index)


def hash_file(path: Path) -> FileRecord:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return FileRecord(size, sha.hexdigest())


def carry_over(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst``, or copy it where links fail; return ``"link"`` or ``"copy"``.

    A hard link costs no space and shares the source's bytes, which nothing here ever writes to.
    A symbolic link (a Hugging Face cache snapshot is made of them) is resolved first: the
    output holds the file, never a link that would point outside it.
    """
    real = Path(os.path.realpath(src))
    if not real.is_file():
        raise SourceNotFoundError(f"{src}: not a regular file any more (it changed during the run).", path=src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(real, dst, follow_symlinks=False)
        return "link"
    except OSError:
        shutil.copyfile(real, dst)
        shutil.copystat(real, dst)
        return "copy"
