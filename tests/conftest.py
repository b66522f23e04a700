"""Fixtures: real diffusers transformers at toy sizes, saved the way diffusers saves them.

The session-scoped source folders are shared by many tests and must never change: the
``untouched`` helper hashes them before and after the tests that matter.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
from omni_fp8.converter.demo import save_checkpoint, save_tiny_pipeline, tiny_qwen_image, tiny_z_image
from safetensors import safe_open

FP8 = torch.float8_e4m3fn


def reference_fp8(w: torch.Tensor, block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract written the obvious way, block by block: what numerics.py must equal bit for bit."""
    w32 = w.float()
    tiny = torch.finfo(torch.float32).tiny  # the scale's floor, 2**-126
    if block is None:
        amax = w32.abs().max()
        s = (amax / 448).clamp_min(tiny) if amax > 0 else torch.tensor(1.0)
        return (w32 / s).clamp(-448, 448).to(FP8), s.reshape(())
    bn, bk = block
    n, k = w.shape
    q = torch.empty(n, k, dtype=FP8)
    scales = torch.empty(math.ceil(n / bn), math.ceil(k / bk))
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = w32[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk]
            amax = tile.abs().max()
            s = (amax / 448).clamp_min(tiny) if amax > 0 else torch.tensor(1.0)
            scales[i, j] = s
            q[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk] = (tile / s).clamp(-448, 448).to(FP8)
    return q, scales


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def count_calls(monkeypatch, module, name: str) -> dict[str, int]:
    """Wrap ``module.name`` so every call is counted in the returned ``{"n": ...}``, then still made."""
    calls = {"n": 0}
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder, through the safetensors library (not our reader)."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 and mode of every file below ``folder``: equal before and after means untouched."""
    digest = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            st = path.stat()
            digest[path.relative_to(folder).as_posix()] = (
                hashlib.sha256(path.read_bytes()).hexdigest() + f":{st.st_mode:o}:{st.st_mtime_ns}"
            )
    return digest


@pytest.fixture(scope="session", autouse=True)
def structure_cache(tmp_path_factory) -> Path:
    """The model-structure cache of this test run (the CLI subprocesses inherit it), never the user's."""
    import os

    folder = tmp_path_factory.mktemp("omni-fp8-cache")
    os.environ["OMNI_FP8_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def qwen_src(tmp_path_factory) -> Path:
    """Tiny Qwen-Image transformer, BF16, four shards plus index."""
    folder = tmp_path_factory.mktemp("qwen") / "transformer"
    save_checkpoint(tiny_qwen_image(seed=1), folder)
    return folder


@pytest.fixture(scope="session")
def zimage_src(tmp_path_factory) -> Path:
    """Tiny Z-Image transformer in FP32, as Z-Image-Turbo ships, one file and no index."""
    folder = tmp_path_factory.mktemp("zimage") / "transformer"
    save_checkpoint(tiny_z_image(seed=2), folder, dtype=torch.float32, max_shard_size="100MB")
    return folder


@pytest.fixture(scope="session")
def qwen_pipeline(tmp_path_factory) -> Path:
    """A saved QwenImagePipeline folder (BF16), exactly as save_pretrained lays it out, plus a README."""
    root = tmp_path_factory.mktemp("pipeline") / "Qwen-Image"
    save_tiny_pipeline(root, arch="qwen-image", seed=1)
    (root / "README.md").write_text("# tiny pipeline\n")
    return root


@pytest.fixture
def copy_of(tmp_path):
    """A private copy of a session fixture, for tests that damage their source on purpose."""
    import shutil

    def make(folder: Path) -> Path:
        dst = tmp_path / ("copy-" + Path(folder).name)
        shutil.copytree(folder, dst)
        return dst

    return make


def hf_cache_copy(folder: Path, cache: Path, repo_id: str, commit: str = "0" * 39 + "1") -> tuple[Path, Path]:
    """``folder`` laid out as the Hugging Face cache lays out a download: content-addressed blobs,
    a snapshot of relative symbolic links to them, and ``refs/main``. Returns (repo folder, snapshot)."""
    import os

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo, snapshot


@pytest.fixture(scope="session")
def zimage_pipeline(tmp_path_factory) -> Path:
    """A complete Z-Image pipeline folder (BF16): tiny Qwen3 text encoder, tokenizer, VAE, scheduler."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("zpipeline") / "Z-Image", arch="z-image", seed=2)


@pytest.fixture
def pipeline_folder(request):
    """The saved tiny pipeline of a family: ``pipeline_folder("qwen-image")`` or ``("z-image")``."""
    names = {"qwen-image": "qwen_pipeline", "z-image": "zimage_pipeline"}
    return lambda arch: request.getfixturevalue(names[arch])
