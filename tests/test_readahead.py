"""Reading ahead (``readahead.py``): the same bytes, a bounded look-ahead, the same errors, no stray thread.

Most tests shrink the chunk to one page and the budget to a few pages, so the toy checkpoints
exercise every path of the thread (chunks, waiting on the budget, touching) that a 40 GB one does.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import hf_cache_copy, load_tensors, same_bits, tree_digest
from omni_fp8.converter import readahead
from omni_fp8.converter.convert import convert, execute
from omni_fp8.converter.errors import OmniFp8Error, NonFiniteWeightError
from omni_fp8.converter.options import Fp8Config
from omni_fp8.converter.plan import make_plan
from omni_fp8.converter.safetensors_format import read_header
from omni_fp8.converter.source import open_source
from safetensors.torch import load_file, save_file

PAGE = 4096


def readahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "omni-fp8-readahead"]


@pytest.fixture
def small_steps(monkeypatch):
    """One page per chunk, two chunks in flight: the thread waits on the budget all the time."""
    monkeypatch.setattr(readahead, "_CHUNK", PAGE)
    monkeypatch.setattr(readahead, "_IN_FLIGHT", 2 * PAGE)


def output_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("budget", [PAGE, 16 * PAGE, readahead.DEFAULT_BUDGET])
def test_conversion_is_bit_identical_with_and_without_readahead(qwen_src, tmp_path, monkeypatch, small_steps, budget):
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 0)
    convert(qwen_src, tmp_path / "off", progress=False)
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", budget)
    convert(qwen_src, tmp_path / "on", progress=False)
    off, on = output_bytes(tmp_path / "off"), output_bytes(tmp_path / "on")
    assert off and off == on
    assert not readahead_threads()


def test_single_file_export_reads_ahead_in_its_own_order(qwen_src, tmp_path, monkeypatch, small_steps):
    # ComfyUI's layout fuses and reorders tensors: the reader is told that order.
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 0)
    convert(qwen_src, tmp_path / "off.safetensors", target="comfyui", progress=False)
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 8 * PAGE)
    convert(qwen_src, tmp_path / "on.safetensors", target="comfyui", progress=False)
    off, on = load_file(tmp_path / "off.safetensors"), load_file(tmp_path / "on.safetensors")  # metadata has times
    assert off.keys() == on.keys() and all(same_bits(off[k], on[k]) for k in off)


def test_reader_yields_the_files_tensors(qwen_src, small_steps):
    source = open_source(qwen_src)
    expected = load_tensors(qwen_src)
    with source.open_reader() as reader:
        assert readahead_threads()
        got = {info.name: reader.read(info).clone() for info in source.tensors}
    assert got.keys() == expected.keys()
    assert all(same_bits(got[name], expected[name]) for name in expected)
    assert not readahead_threads()


def test_a_model_in_the_hugging_face_cache_reads_ahead_through_its_links(qwen_src, tmp_path, monkeypatch, small_steps):
    _, snapshot = hf_cache_copy(qwen_src, tmp_path / "hub", "org/tiny")
    opened: list[str] = []
    real_open = os.open
    def recording_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(readahead.os, "open", recording_open)
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 8 * PAGE)
    convert(snapshot, tmp_path / "out", progress=False)
    assert any(p.startswith(str(snapshot)) for p in opened)
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 0)
    convert(qwen_src, tmp_path / "ref", progress=False)
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "ref")


# --- the budget ------------------------------------------------------------------------------------


def one_file_checkpoint(path: Path, tensors: int, pages: int) -> None:
    save_file({f"t{i:02d}": torch.full((pages * PAGE // 4,), float(i)) for i in range(tensors)}, path)


def test_the_thread_never_asks_for_more_than_the_budget_past_the_consumer(tmp_path, monkeypatch, small_steps):
    path = tmp_path / "w.safetensors"
    one_file_checkpoint(path, tensors=12, pages=4)
    infos = list(read_header(path).tensors.values())
    data_start, total = infos[0].begin, infos[-1].end - infos[0].begin
    budget = 6 * PAGE
    asked: list[tuple[int, int]] = []  # (end of a range asked for, in data bytes; the consumer's position then)
    holder: list[readahead.Readahead] = []
    started = threading.Event()

    def advise(fd, offset, length, _advice):
        started.wait(5)
        asked.append((offset + length - data_start, holder[0]._taken))

    monkeypatch.setattr(readahead, "_ADVISE", advise)
    ra = readahead.Readahead(infos, budget=budget)
    holder.append(ra)
    started.set()
    try:
        for info in infos:
            allowed = min(total, info.begin - data_start + budget)
            deadline = time.monotonic() + 5
            while (not asked or asked[-1][0] < allowed) and time.monotonic() < deadline:
                time.sleep(0.001)  # let the thread go as far as the budget allows
            ra.reached(info)
    finally:
        ra.close()
    assert all(end <= taken + budget for end, taken in asked), asked
    assert ra.peak_ahead == budget  # it did go as far as allowed
    assert max(end for end, _ in asked) == total  # and on to the end


def test_ranges_read_twice_are_read_ahead_once(tmp_path, monkeypatch, small_steps):
    path = tmp_path / "w.safetensors"
    one_file_checkpoint(path, tensors=3, pages=2)
    infos = list(read_header(path).tensors.values())
    asked: list[int] = []
    monkeypatch.setattr(readahead, "_ADVISE", lambda fd, offset, length, advice: asked.append(offset))
    ra = readahead.Readahead([infos[0], infos[1], infos[0], infos[1], infos[2]], budget=1 << 20)
    ra._thread.join(5)
    ra.close()
    assert sorted(asked) == sorted(set(asked)) and len(asked) == 6


# --- errors ----------------------------------------------------------------------------------------


def truncate_a_shard(src: Path) -> None:
    shard = sorted(src.glob("*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 64)


def damage_a_header(src: Path) -> None:
    shard = sorted(src.glob("*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[9:14] = b"@@@@@"
    shard.write_bytes(bytes(raw))


def nan_in_a_late_weight(src: Path) -> None:
    infos = [t for shard in sorted(src.glob("*.safetensors")) for t in read_header(shard).tensors.values()]
    info = [t for t in infos if ".attn.to_" in t.name and t.name.endswith(".weight")][-1]  # FP8 in every preset
    with open(info.file, "r+b") as f:
        f.seek(info.begin + 2 * 5)
        f.write(struct.pack("<H", 0x7FC0))  # a BF16 NaN, the sixth element


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
@pytest.mark.parametrize("damage", [truncate_a_shard, damage_a_header, nan_in_a_late_weight, "shrinks after planning"])
def test_errors_read_the_same_with_and_without_readahead(copy_of, qwen_src, tmp_path, monkeypatch, small_steps,
                                                         damage, direct, request):
    if direct:
        request.getfixturevalue("force_direct")  # every tensor read past the page cache
    src = copy_of(qwen_src)
    errors = []
    for budget in (0, 4 * PAGE if not direct else readahead.DEFAULT_BUDGET):
        monkeypatch.setattr(readahead, "DEFAULT_BUDGET", budget)
        out = tmp_path / f"out-{budget}"
        with pytest.raises(OmniFp8Error) as e:
            if damage == "shrinks after planning":  # found while reading, not by the header checks
                plan = make_plan(open_source(src), Fp8Config())
                shard = sorted(src.glob("*.safetensors"))[-1]
                size = shard.stat().st_size
                truncate_a_shard(src)
                try:
                    execute(plan, out, progress=False)
                finally:
                    os.truncate(shard, size)  # for the next round
            else:
                if budget == 0:
                    damage(src)
                convert(src, out, progress=False)
        errors.append((type(e.value), str(e.value).replace(str(out), "OUT")))
        assert not out.exists()
        assert not readahead_threads()
    assert errors[0] == errors[1]
    assert "\n" not in errors[0][1]
    if damage == "shrinks after planning":
        assert "(it shrank)" in errors[0][1]


def test_a_hint_that_fails_changes_nothing(qwen_src, tmp_path, monkeypatch, small_steps):
    def advise(*_):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(readahead, "_ADVISE", advise)
    convert(qwen_src, tmp_path / "out", progress=False)
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 0)
    convert(qwen_src, tmp_path / "ref", progress=False)
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "ref")


def test_a_bug_in_the_thread_is_raised_in_the_consumer(qwen_src, tmp_path, monkeypatch, small_steps):
    def advise(*_):
        raise RuntimeError("boom in the read-ahead thread")

    monkeypatch.setattr(readahead, "_ADVISE", advise)
    monkeypatch.setattr(readahead, "_IN_FLIGHT", 1 << 30)  # nothing touched before the consumer looks
    before = tree_digest(qwen_src)
    source = open_source(qwen_src)
    with pytest.raises(RuntimeError, match="boom in the read-ahead thread"):
        with source.open_reader() as reader:
            for info in source.tensors:
                time.sleep(0.01)
                reader.read(info)
    assert not readahead_threads()
    assert tree_digest(qwen_src) == before


@pytest.mark.parametrize("stop", [NonFiniteWeightError("w: NaN"), KeyboardInterrupt()])
def test_a_conversion_stopped_part_way_leaves_no_thread(qwen_src, tmp_path, monkeypatch, small_steps, stop):
    from omni_fp8.converter import writer

    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 4 * PAGE)  # the thread is still waiting mid-way
    calls = []
    real = writer.quantize_weight

    def quantize(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            assert readahead_threads(), "the thread should be running mid-way"
            raise stop
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "quantize_weight", quantize)
    with pytest.raises(type(stop)):
        convert(qwen_src, tmp_path / "out", progress=False)
    assert len(calls) == 3
    assert not readahead_threads()
    assert not (tmp_path / "out").exists()


def test_a_file_that_cannot_be_opened_yet_is_skipped(qwen_src, small_steps):
    # A Hub shard still downloading: ``locate`` says not yet, and the thread goes on to the next.
    source = open_source(qwen_src)
    first = source.shards[0].path
    ra = readahead.Readahead(source.tensors, budget=1 << 30, locate=lambda path: None if path == first else path)
    ra._thread.join(5)
    assert not ra._thread.is_alive()
    assert ra.peak_ahead == source.data_bytes  # everything but the first shard, counted from the start
    ra.close()


# --- reading past the page cache (O_DIRECT) --------------------------------------------------------


def direct_supported(folder: Path) -> bool:
    probe = folder / ".direct-probe"
    probe.write_bytes(b"\0" * PAGE)
    try:
        fd = readahead._open_direct(probe)
        if fd >= 0:
            os.close(fd)
        return fd >= 0
    finally:
        probe.unlink()


@pytest.fixture
def force_direct(monkeypatch, tmp_path):
    """Every tensor read with O_DIRECT as if it were on disk, in one-page requests."""
    if not direct_supported(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    monkeypatch.setattr(readahead, "resident_fraction", lambda fd, begin, end: 0.0)
    monkeypatch.setattr(readahead, "_DIRECT_MIN", 1)
    monkeypatch.setattr(readahead, "_DIRECT_REQUEST", PAGE)
    made: list[readahead.Readahead] = []
    real = readahead.Readahead

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(readahead, "Readahead", recording)
    return made


TARGETS = [("omni-fp8", "out"), ("vllm-omni", "out"), ("comfyui", "out.safetensors"), ("diffusers", "out.safetensors")]


def converted(path: Path) -> dict[str, torch.Tensor]:
    if path.is_file():
        return load_file(path)
    return {k: v for p in sorted(path.rglob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.mark.parametrize(("target", "name"), TARGETS)
def test_conversion_read_past_the_page_cache_is_bit_identical(qwen_src, tmp_path, monkeypatch, force_direct,
                                                              target, name):
    convert(qwen_src, tmp_path / "direct" / name, target=target, progress=False)
    assert force_direct and all(ra.direct_bytes > 0 for ra in force_direct)
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 0)
    convert(qwen_src, tmp_path / "mapped" / name, target=target, progress=False)
    direct, mapped = converted(tmp_path / "direct" / name), converted(tmp_path / "mapped" / name)
    assert direct.keys() == mapped.keys() and all(same_bits(direct[k], mapped[k]) for k in direct)
    assert not readahead_threads()


@pytest.mark.parametrize(("target", "name"), TARGETS)
def test_the_writer_reads_exactly_what_it_announces(qwen_src, tmp_path, monkeypatch, target, name):
    # The reader keeps what it read past the page cache until the last read it was told of; a read
    # nobody announced would go to the disk again, through the page cache.
    from omni_fp8.converter import source as source_module

    announced: list[list[tuple]] = []
    real = readahead.Readahead

    def recording(order, **kwargs):
        announced.append([(i.file, i.begin, i.end) for i in order if i.nbytes])
        return real(order, **kwargs)

    reads: list[tuple] = []
    real_read = source_module._Reader.read

    def read(self, info):
        if info.nbytes:
            reads.append((info.file, info.begin, info.end))
        return real_read(self, info)

    monkeypatch.setattr(readahead, "Readahead", recording)
    monkeypatch.setattr(source_module._Reader, "read", read)
    convert(qwen_src, tmp_path / name, target=target, progress=False)
    assert len(announced) == 1
    assert reads == announced[0]
    if target == "vllm-omni":
        assert len(reads) > len(set(reads))  # fused groups' parts are read twice, and announced so


def test_a_cold_file_is_read_past_the_page_cache(tmp_path, monkeypatch):
    if not direct_supported(tmp_path) or not hasattr(os, "posix_fadvise"):
        pytest.skip("no O_DIRECT or posix_fadvise here")
    path = tmp_path / "w.safetensors"
    one_file_checkpoint(path, tensors=6, pages=64)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if readahead.resident_fraction(fd, 0, path.stat().st_size) > 0.5:
            pytest.skip("the page cache kept the file")
    finally:
        os.close(fd)
    monkeypatch.setattr(readahead, "_DIRECT_MIN", PAGE)
    infos = list(read_header(path).tensors.values())
    from omni_fp8.converter.source import _Reader, LocalFiles

    ra = readahead.Readahead(infos)
    reader = _Reader(LocalFiles(), ra)
    try:
        got = {info.name: reader.read(info) for info in infos}
    finally:
        reader.close()
    assert ra.direct_bytes == sum(i.nbytes for i in infos)
    expected = load_file(path)
    assert all(same_bits(got[k], expected[k]) for k in expected)  # kept past close: they own their buffers


def test_the_ring_is_reused_and_a_kept_tensor_keeps_its_bytes(tmp_path, force_direct):
    path = tmp_path / "w.safetensors"
    one_file_checkpoint(path, tensors=12, pages=8)
    infos = list(read_header(path).tensors.values())
    expected = load_file(path)
    ra = readahead.Readahead(infos, budget=40 * PAGE)  # a ring of four tensors
    kept = {}
    try:
        for i, info in enumerate(infos):
            ra.reached(info)
            data = ra.take(info)
            assert data is not None
            tensor = data.view(info.torch_dtype).reshape(info.shape)
            if i % 4 == 0:
                kept[info.name] = tensor[1:]  # a view: its buffer must not be handed out again
            del data, tensor
    finally:
        ra.close()
    assert ra.own_buffers <= len(kept)  # the ring serves the rest; a kept tensor stops it only behind itself
    assert all(same_bits(kept[k], expected[k][1:]) for k in kept)


def test_reads_out_of_order_and_an_early_close_neither_hang_nor_mix_up_bytes(tmp_path, force_direct):
    path = tmp_path / "w.safetensors"
    one_file_checkpoint(path, tensors=10, pages=4)
    infos = list(read_header(path).tensors.values())
    expected = load_file(path)
    from omni_fp8.converter.source import _Reader, LocalFiles

    reader = _Reader(LocalFiles(), readahead.Readahead(infos, budget=3 * 4 * PAGE))
    try:
        for i in (6, 0, 7, 7, 2):
            assert same_bits(reader.read(infos[i]), expected[infos[i].name])
    finally:
        reader.close()
    assert not readahead_threads()


def test_a_failed_direct_read_falls_back_to_the_mapping(qwen_src, tmp_path, monkeypatch, force_direct):
    def failing(*_):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(readahead.os, "preadv", failing)
    convert(qwen_src, tmp_path / "out", progress=False)
    assert force_direct[0].direct_bytes == 0
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 0)
    convert(qwen_src, tmp_path / "ref", progress=False)
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "ref")


def test_loading_reads_past_the_page_cache_to_the_same_model(qwen_src, tmp_path, monkeypatch, force_direct):
    # load_transformer reads through the same reader: a converted folder and a BF16 source, each
    # loaded with every tensor read past the page cache, give the model the mapped reads give.
    from omni_fp8 import load_transformer

    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 0)
    convert(qwen_src, tmp_path / "out", progress=False)
    expected = [load_transformer(tmp_path / "out", progress=False).state_dict(),
                load_transformer(qwen_src, quantization="fp8", progress=False).state_dict()]
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 512 << 20)
    got = [load_transformer(tmp_path / "out", progress=False).state_dict(),
           load_transformer(qwen_src, quantization="fp8", progress=False).state_dict()]
    assert len(force_direct) == 2 and all(ra.direct_bytes > 0 for ra in force_direct)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    assert not readahead_threads()


def test_a_file_whose_direct_reads_are_refused_goes_through_the_page_cache(qwen_src, tmp_path, monkeypatch,
                                                                         force_direct):
    calls = []

    def refusing(fd, buffers, offset):
        calls.append(offset)
        raise OSError(22, "Invalid argument")  # a device that wants more than 4 KiB alignment

    monkeypatch.setattr(readahead.os, "preadv", refusing)
    convert(qwen_src, tmp_path / "out", progress=False)
    shards = len(open_source(qwen_src).shards)
    assert 0 < len(calls) <= shards  # one refusal per file, then the page cache
    monkeypatch.setattr(readahead, "DEFAULT_BUDGET", 0)
    convert(qwen_src, tmp_path / "ref", progress=False)
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "ref")


def test_a_tensor_larger_than_the_ring_gets_a_buffer_of_its_own(tmp_path, force_direct):
    # The thread never waits on the consumer for a range the consumer is waiting for: with no
    # room in the ring, that read goes into a buffer of its own.
    path = tmp_path / "w.safetensors"
    one_file_checkpoint(path, tensors=4, pages=8)
    infos = list(read_header(path).tensors.values())
    expected = load_file(path)
    ra = readahead.Readahead(infos, budget=4 * PAGE)  # a ring smaller than one tensor
    try:
        got = {}
        for info in infos:
            ra.reached(info)
            data = ra.take(info)
            assert data is not None
            got[info.name] = data.view(info.torch_dtype).reshape(info.shape)
    finally:
        ra.close()
    assert ra.own_buffers == len(infos) and ra.direct_bytes == sum(i.nbytes for i in infos)
    assert all(same_bits(got[k], expected[k]) for k in expected)
