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
from safetensors import safe_open

from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image, tiny_z_image

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


def tiny_qwen_tokenizer():
    """A byte-level Qwen2 tokenizer built in memory: one token per byte plus Qwen's chat markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    return Qwen2TokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def tiny_qwen_pipeline(transformer, dtype=torch.bfloat16):
    """A real QwenImagePipeline: tiny Qwen2.5-VL text encoder (width 32 = the transformer's
    joint_attention_dim), tiny VAE with 4 latent channels, the given transformer."""
    import transformers
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer()
    n = len(tokenizer)
    torch.manual_seed(3)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the default bos/eos ids lie outside this vocab
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1e6, "vocab_size": n,
                     "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32},
        hidden_size=32, vocab_size=n, vision_start_token_id=n + 1, vision_end_token_id=n + 2, vision_token_id=n + 3,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformers.logging.set_verbosity(verbosity)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer).to(dtype=dtype)


@pytest.fixture(scope="session")
def qwen_pipeline(tmp_path_factory) -> Path:
    """A saved QwenImagePipeline folder (BF16), exactly as save_pretrained lays it out, plus a README."""
    root = tmp_path_factory.mktemp("pipeline") / "Qwen-Image"
    tiny_qwen_pipeline(tiny_qwen_image(seed=1)).save_pretrained(root, max_shard_size="200KB")
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


def tiny_qwen3_encoder():
    """A tiny Qwen3 causal LM, the kind of text encoder Z-Image pipelines carry."""
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(4)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    config = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=64, tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config).eval()
    transformers.logging.set_verbosity(verbosity)
    return model


@pytest.fixture(scope="session")
def zimage_pipeline(tmp_path_factory) -> Path:
    """A Z-Image pipeline folder: model_index.json, the tiny transformer and a tiny Qwen3 text encoder."""
    import json

    root = tmp_path_factory.mktemp("zpipeline") / "Z-Image"
    save_checkpoint(tiny_z_image(seed=2), root / "transformer", dtype=torch.bfloat16)
    tiny_qwen3_encoder().to(torch.bfloat16).save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"]}))
    return root
