"""A pipeline folder at real widths for the GPU benchmarks: random weights, fewer blocks.

The transformer is ``step_speed.build`` (Qwen-Image's or Z-Image's real configuration, seeded
random weights, ``blocks`` blocks instead of 60 / 30), the VAE the real one's configuration
(Qwen-Image's ``AutoencoderKLQwenImage`` defaults; Z-Image's 16-channel ``AutoencoderKL``), the
text encoder the real one's widths (Qwen2.5-VL-7B's 3584 / Qwen3-4B's 2560, heads and MLP) with
one layer, the tokenizer ``omni_fp8.converter.demo.tiny_tokenizer``. Saved with diffusers'
``save_pretrained`` in BF16, it loads through ``Omni`` exactly as a downloaded pipeline does, so
the benchmarks time the real code path: diffusers' pipeline, our FP8 layers, our caches.

Per step, the transformer's time scales with its blocks; text encoding and VAE decoding are
outside the denoising time the benchmarks report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_speed import MODELS, build  # noqa: E402

DEPTH = {"qwen-image": 60, "z-image": 30}


def save_real_width_pipeline(out: Path, model: str, blocks: int, *, seed: int = 0) -> Path:
    """Write the pipeline to ``out`` (kept if it is already there: building 5 GB takes a minute)."""
    out = Path(out)
    if (out / "model_index.json").is_file():
        return out
    import diffusers
    import transformers
    from omni_fp8.converter.demo import tiny_tokenizer

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    transformer = build(model, blocks, seed=seed).to("cpu")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    if model == "qwen-image":
        pipe = _qwen_image(transformer, tokenizer)
    else:
        pipe = _z_image(transformer, tokenizer)
    pipe.to(dtype=torch.bfloat16).save_pretrained(out)
    return out


def _qwen_image(transformer, tokenizer):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = len(tokenizer)
    width = MODELS["qwen-image"]["config"]["joint_attention_dim"]  # Qwen2.5-VL-7B's hidden size
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": width, "intermediate_size": 18944, "num_hidden_layers": 1,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1e6, "vocab_size": n,
                     "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": width},
        hidden_size=width, vocab_size=n, vision_start_token_id=n + 1, vision_end_token_id=n + 2, vision_token_id=n + 3,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift_terminal=0.02, use_dynamic_shifting=True,
                                                time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=AutoencoderKLQwenImage().eval(), text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)


def _z_image(transformer, tokenizer):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    width = MODELS["z-image"]["config"]["cap_feat_dim"]  # Qwen3-4B's hidden size
    config = Qwen3Config(hidden_size=width, intermediate_size=9728, num_hidden_layers=1, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=len(tokenizer), tie_word_embeddings=True)
    text_encoder = Qwen3ForCausalLM(config).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=16, norm_num_groups=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False).eval()
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
