"""Nothing lost: existing outputs, overlapping folders, killed and interrupted runs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tree_digest

from omni_fp8 import convert, verify
from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image
from omni_fp8.converter.errors import OutputExistsError
from omni_fp8.converter.source import MANIFEST_NAME


def test_existing_output_needs_force(qwen_src, tmp_path):
    out = tmp_path / "out"
    convert(qwen_src, out, progress=False)
    with pytest.raises(OutputExistsError, match=r"already exists; pass --force \(force=True\) to replace it"):
        convert(qwen_src, out, progress=False)
    first = (out / MANIFEST_NAME).read_text()
    convert(qwen_src, out, config={"weight_block_size": [32, 32]}, force=True, progress=False)
    assert (out / MANIFEST_NAME).read_text() != first and verify(out).ok
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the replaced output is gone, no leftovers


def test_force_never_deletes_a_folder_that_is_not_ours(qwen_src, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="is not an omni-fp8 output"):
        convert(qwen_src, out, force=True, progress=False)
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_output_overlapping_the_source_is_refused(copy_of, qwen_src, where):
    src = copy_of(qwen_src)
    out = {"same": src, "inside": src / "fp8", "parent": src.parent}[where]
    before = tree_digest(src)
    with pytest.raises(OutputExistsError, match="overlaps the source"):
        convert(src, out, force=True, progress=False)
    assert tree_digest(src) == before


@pytest.fixture(scope="module")
def big_src(tmp_path_factory) -> Path:
    """About 75 MB of BF16: long enough for a test to interrupt the conversion midway."""
    model = tiny_qwen_image(num_attention_heads=8, attention_head_dim=64, num_layers=4, joint_attention_dim=512,
                            axes_dims_rope=(16, 24, 24))
    return save_checkpoint(model, tmp_path_factory.mktemp("big") / "src", max_shard_size="8MB")


def start_conversion(src: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "omni_fp8.converter.cli", "convert", str(src), str(out), "--quiet",
           "--max-shard-size", "4MB"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_partial_shard(out: Path, proc: subprocess.Popen) -> Path:
    """Poll until the run is midway: its staging folder holds a second shard."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for staging in out.parent.glob(f".{out.name}.omni-fp8-partial-*"):
            if list(staging.glob("*-00002-of-*.safetensors")):
                return staging
        assert proc.poll() is None, "the conversion finished before it could be interrupted"
        time.sleep(0.001)
    raise AssertionError("no staging folder appeared")


def test_kill_9_midway_leaves_nothing_that_looks_complete(big_src, tmp_path):
    out = tmp_path / "out"
    before = tree_digest(big_src)
    proc = start_conversion(big_src, out)
    staging = wait_for_partial_shard(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert not (staging / MANIFEST_NAME).exists()
    assert [p.name for p in tmp_path.iterdir()] == [staging.name]  # hidden, and only this
    assert tree_digest(big_src) == before

    # The next run finishes, and clears what the killed run left behind.
    convert(big_src, out, progress=False)
    assert verify(out).ok
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_ctrl_c_cleans_up_and_exits_130(big_src, tmp_path):
    out = tmp_path / "out"
    proc = start_conversion(big_src, out)
    wait_for_partial_shard(out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.decode().strip().splitlines()[-1] == "interrupted: nothing was published"
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_fails_in_one_line(qwen_src, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "omni_fp8.converter.cli", "convert", str(qwen_src),
                           str(blocker / "out"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_folder_created_at_out_during_the_run_is_never_replaced(big_src, tmp_path):
    out = tmp_path / "out"
    proc = start_conversion(big_src, out)
    wait_for_partial_shard(out, proc)
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.decode().startswith(f"error: {out}: appeared while converting")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_runs_to_the_same_out_one_wins_and_nothing_is_lost(big_src, tmp_path):
    out = tmp_path / "out"
    procs = [start_conversion(big_src, out) for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read().decode()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    # Caught at publish if both ran at once, or at the start if the winner was already done.
    assert "appeared while converting" in loser or "already exists; pass --force" in loser, loser
    assert verify(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_refuses_an_output_swapped_during_the_run(big_src, tmp_path):
    out = tmp_path / "out"
    convert(big_src, out, progress=False, max_shard_size="4MB")
    cmd = [sys.executable, "-m", "omni_fp8.converter.cli", "convert", str(big_src), str(out), "--quiet",
           "--max-shard-size", "4MB", "--force"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_partial_shard(out, proc)
    out.rename(tmp_path / "earlier")
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "changed while converting" in err.decode()
    assert (out / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "out"]
