"""Tiny random-weight models of the supported families, and the no-download demo.

The models are the real diffusers classes at toy sizes, every Linear width a multiple of 16 so
FP8 GEMMs accept them. ``omni-convert demo`` saves a transformer as a sharded BF16 checkpoint and
converts it; ``tiny_pipeline`` puts one in a whole diffusers pipeline (tiny text encoder built
from a ``transformers`` config, a byte-level tokenizer built in memory, tiny VAE), which
``bench/make_tiny_pipeline.py`` saves as a folder ``Omni``, ``omni-fp8`` and ``omni-convert``
load like a downloaded one. The test suite builds its fixtures with the same functions.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .errors import OmniFp8Error

__all__ = ["tiny_qwen_image", "tiny_z_image", "save_checkpoint", "run_demo", "tiny_pipeline", "save_tiny_pipeline",
           "tiny_tokenizer", "PIPELINE_ARCHES"]

TINY_QWEN_IMAGE: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "axes_dims_rope": (8, 12, 12),
}
TINY_Z_IMAGE: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 96,  # 3 heads x 32: FFN and projection widths stay multiples of 16
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 3,
    "n_kv_heads": 3,
    "cap_feat_dim": 32,
    "axes_dims": [8, 12, 12],
    "axes_lens": [64, 32, 32],
}


def tiny_qwen_image(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ``QwenImageTransformer2DModel`` with two blocks of width 64, random weights."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**{**TINY_QWEN_IMAGE, **overrides}).eval()


def tiny_z_image(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ``ZImageTransformer2DModel`` with width 96 (3 heads), random weights."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**{**TINY_Z_IMAGE, **overrides}).eval()
    with torch.no_grad():  # the pad tokens start at zero; make them count like trained ones
        for name, p in model.named_parameters():
            if name.endswith("pad_token"):
                p.normal_()
    return model


def save_checkpoint(
    model: torch.nn.Module, folder: str | Path, *, dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "200KB"
) -> Path:
    """Save as diffusers does (config.json, sharded safetensors, index) in ``dtype``."""
    import diffusers

    folder = Path(folder)
    previous = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()  # .to(dtype) on a diffusers model warns about fp32 modules
    try:
        model.to(dtype).save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    finally:
        diffusers.logging.set_verbosity(previous)
    return folder


PIPELINE_ARCHES = ("qwen-image", "z-image")
# The pipelines' prompt format (Qwen's chat markers); ZImagePipeline applies it through the tokenizer.
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> Any:
    """A byte-level Qwen2 tokenizer built in memory: one token per byte plus Qwen's chat markers.

    Both pipelines' real tokenizers are Qwen BPE vocabularies of 150k tokens; a byte per token
    keeps the text encoder's embedding tiny while every prompt still encodes and decodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    return Qwen2TokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                              chat_template=_CHAT_TEMPLATE)


def tiny_pipeline(arch: str = "qwen-image", *, transformer: torch.nn.Module | None = None, seed: int = 0,
                  dtype: torch.dtype = torch.bfloat16) -> Any:
    """A real ``QwenImagePipeline`` or ``ZImagePipeline`` with tiny random components.

    The text encoder's width is the transformer's text width (32), so prompts run end to end:
    tokenizer -> text encoder -> transformer -> VAE decode. ``transformer`` defaults to
    ``tiny_qwen_image(seed)`` / ``tiny_z_image(seed)`` (with RoPE tables long enough for 512-token
    prompts); needs ``transformers`` and ``tokenizers``.
    """
    import diffusers
    import transformers

    if arch not in PIPELINE_ARCHES:
        from .errors import ConfigError

        raise ConfigError(f"unknown arch {arch!r}; use one of {', '.join(PIPELINE_ARCHES)}.")
    if transformer is None:
        if arch == "qwen-image":
            transformer = tiny_qwen_image(seed=seed)
        else:
            transformer = tiny_z_image(seed=seed, axes_lens=[1024, 64, 64])
    tokenizer = tiny_tokenizer()
    levels = transformers.logging.get_verbosity(), diffusers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the configs' default bos/eos ids lie outside this vocab
    diffusers.logging.set_verbosity_error()  # .to(dtype) of a diffusers model warns about float32 modules
    try:
        torch.manual_seed(seed + 3)
        build = _tiny_qwen_pipeline if arch == "qwen-image" else _tiny_z_image_pipeline
        return build(tokenizer, transformer).to(dtype=dtype)
    finally:
        transformers.logging.set_verbosity(levels[0])
        diffusers.logging.set_verbosity(levels[1])


def _tiny_qwen_pipeline(tokenizer: Any, transformer: torch.nn.Module) -> Any:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = len(tokenizer)
    width = transformer.config.joint_attention_dim
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": width, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1e6, "vocab_size": n,
                     "rope_scaling": {"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": width},
        hidden_size=width, vocab_size=n, vision_start_token_id=n + 1, vision_end_token_id=n + 2, vision_token_id=n + 3,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    latent = transformer.config.in_channels // 4  # the pipeline packs 2x2 latent patches into one token
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=latent, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * latent,
                                 latents_std=[1.0] * latent)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)


def _tiny_z_image_pipeline(tokenizer: Any, transformer: torch.nn.Module) -> Any:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    width = transformer.config.cap_feat_dim
    config = Qwen3Config(hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=len(tokenizer), tie_word_embeddings=True)
    text_encoder = Qwen3ForCausalLM(config).eval()
    # Z-Image-Turbo's VAE: 16 latent channels, its scaling and shift factors; two levels instead of four.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=transformer.config.in_channels, norm_num_groups=8, scaling_factor=0.3611,
                        shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # a shifted schedule, as distilled flow models use
    return ZImagePipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def save_tiny_pipeline(out: str | Path, *, arch: str = "qwen-image", seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16, max_shard_size: str = "200KB") -> Path:
    """``tiny_pipeline(arch)`` saved by diffusers' ``save_pretrained`` (a complete pipeline folder).

    ``OUT`` must not exist or be empty: nothing of the user's is overwritten. Small shards, so the
    transformer is sharded with an index as real checkpoints are.
    """
    import diffusers

    from .errors import OutputExistsError

    out = Path(out)
    if out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out}: already exists and is not empty; choose a new folder.", path=out)
    pipe = tiny_pipeline(arch, seed=seed, dtype=dtype)
    previous = diffusers.logging.get_verbosity()
    diffusers.logging.set_verbosity_error()
    try:
        pipe.save_pretrained(out, max_shard_size=max_shard_size)
    finally:
        diffusers.logging.set_verbosity(previous)
    return out


def run_demo(out: str | Path, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build a tiny Qwen-Image transformer, save it as BF16 shards and convert it to FP8.

    Returns paths, the conversion result and the relative L2 error of every dequantized FP8
    weight against its BF16 source (the worst and the mean).
    """
    from safetensors import safe_open

    from .convert import convert
    from .errors import OutputExistsError
    from .numerics import dequantize_weight
    from .writer import hash_file, write_json

    out = Path(out)
    src, dst = out / "qwen-image-tiny-bf16", out / "qwen-image-tiny-fp8"
    if out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise OutputExistsError(f"{out}: already exists; pass --force to replace it.", path=out)
        _check_earlier_demo(out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(tiny_qwen_image(), src)
    record = {"files": {f"{src.name}/{p.name}": hash_file(p).to_dict() for p in sorted(src.iterdir())}}
    write_json(out / _DEMO_RECORD, record)
    result = convert(src, dst, progress=progress)

    errors = []
    source_tensors = _load_folder(src)
    for entry in result.manifest["tensors"]:
        if entry["scheme"] not in ("fp8_tensor", "fp8_channel", "fp8_block"):
            continue
        with safe_open(dst / entry["shard"], "pt") as f:
            q = f.get_tensor(entry["name"])
            scale = f.get_tensor(entry["scale"])
        block = result.manifest["quantization_config"]["weight_block_size"]
        w = source_tensors[entry["name"]].float()
        deq = dequantize_weight(q, scale, tuple(block) if block else None)
        errors.append(((deq - w).norm() / w.norm()).item())
    return {
        "source": str(src),
        "output": str(dst),
        "result": result,
        "weight_rel_l2_max": max(errors),
        "weight_rel_l2_mean": sum(errors) / len(errors),
    }


_DEMO_RECORD = ".omni-fp8-demo.json"


def _check_earlier_demo(out: Path) -> None:
    """``--force`` deletes ``out`` only if the demo wrote every file in it (its record says which)."""
    from .errors import OutputExistsError
    from .manifest import read_manifest
    from .output import unlisted_files
    from .source import read_json

    def refuse(why: str) -> OutputExistsError:
        return OutputExistsError(
            f"{out}: exists and is not an earlier demo output ({why}); nothing was deleted. Choose another folder.",
            path=out,
        )

    if out.is_symlink() or not out.is_dir() or not (out / _DEMO_RECORD).is_file():
        raise refuse(f"it has no {_DEMO_RECORD}")
    try:
        listed = dict(read_json(out / _DEMO_RECORD, "the demo record")["files"])
        fp8 = out / "qwen-image-tiny-fp8"
        if fp8.exists():
            listed.update({f"{fp8.name}/{rel}": None for rel in read_manifest(fp8)["files"]})
            listed[f"{fp8.name}/fp8_manifest.json"] = None
    except (OmniFp8Error, KeyError, TypeError, ValueError) as e:
        raise refuse("its records are damaged") from e
    extra = [rel for rel in unlisted_files(out, listed) if rel != _DEMO_RECORD]
    if extra:
        raise refuse(f"it holds files the demo did not write: {', '.join(extra[:3])}")


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors
