"""Our safetensors reader is as strict as safetensors itself; our writer's files load with it."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import same_bits
from safetensors.torch import load_file, save_file

from omni_fp8.converter.errors import CorruptCheckpointError, PickleCheckpointError
from omni_fp8.converter.safetensors_format import ShardWriter, read_header, read_tensor


def raw_file(path, header: dict, data: bytes = b"", header_len: int | None = None) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file(
        {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
         "s": torch.tensor(2.5), "e": torch.empty(0, 3, dtype=torch.float16)},
        path, metadata={"format": "pt"},
    )
    return path


def test_reads_what_safetensors_writes(good):
    header = read_header(good)
    assert set(header.tensors) == {"a", "b", "s", "e"}
    assert header.metadata == {"format": "pt"}
    expected = load_file(good)
    with open(good, "rb") as f:
        for name, info in header.tensors.items():
            assert same_bits(read_tensor(f, info), expected[name])


def test_writer_output_loads_with_safetensors(tmp_path):
    tensors = {
        "w": torch.randn(32, 16).to(torch.float8_e4m3fn),
        "w_scale": torch.tensor(0.125),
        "bias": torch.randn(32, dtype=torch.bfloat16),
        "grid": torch.rand(2, 3),
        "flag": torch.tensor([True, False]),
    }
    path = tmp_path / "out.safetensors"
    with ShardWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]) as w:
        for k, v in tensors.items():
            w.write(k, v)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert same_bits(loaded[k], tensors[k])
    assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0  # data starts aligned
    assert read_header(path).file_size == path.stat().st_size


def test_writer_refuses_out_of_order_or_wrong_tensors(tmp_path):
    w = ShardWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(ValueError, match="expected a torch.float32"):
        w.write("b", torch.ones(2))
    w.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="closed with 1 tensors unwritten"):
        w.close()


@pytest.mark.parametrize(
    "make,why",
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "the file is 2 bytes, too short to hold a safetensors header"),
        (lambda p: p.write_bytes(struct.pack("<Q", 200_000_000) + b"{}"), "its header claims 200000000 bytes (limit 100000000)"),
        (lambda p: p.write_bytes(struct.pack("<Q", 50) + b"{}"), "the header needs 58 bytes but the file has 10"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}"), "its header is not valid UTF-8 JSON"),
        (lambda p: raw_file(p, [1, 2]), "its header is not a JSON object"),
        (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2]}}), "tensor 'a' needs exactly dtype, shape and data_offsets"),
        (lambda p: raw_file(p, {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'a' has unknown dtype 'Q4'"),
        (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'a' has a malformed shape [-2]"),
        (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8), "tensor 'a' has malformed data_offsets [8, 0]"),
        (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'a' spans 8 bytes but F32[3] needs 12"),
        (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "tensor 'b' overlaps the previous tensor"),
        (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "tensor 'a' leaves a gap before it"),
        (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 5), "the file is truncated"),
        (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9), "1 trailing bytes after the last tensor"),
        (lambda p: raw_file(p, {"__metadata__": {"k": 1}}), "__metadata__ must map strings to strings"),
    ],
)
def test_refuses_corrupt_files_with_the_reason(tmp_path, make, why):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(CorruptCheckpointError) as err:
        read_header(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a valid safetensors file: ")
    assert why in message
    assert message.endswith("Re-download or re-save it.")
    assert "\n" not in message


def test_truncated_copy_of_a_real_shard(good, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(CorruptCheckpointError, match="the file is truncated"):
        read_header(cut)


def test_pickle_named_safetensors_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)  # a zip archive holding a pickle
    with pytest.raises(PickleCheckpointError, match="pickle .* never unpickles"):
        read_header(path)


@pytest.mark.parametrize("header_len", [0x0280, 0x0380, 0x0480, 0x0580])
def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path, header_len):
    """640 bytes of header is ``80 02 00 ...`` on disk: a pickle's magic, followed by JSON, not opcodes."""
    table = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + table.ljust(header_len) + b"\0" * 8)
    assert list(read_header(path).tensors) == ["w"]
