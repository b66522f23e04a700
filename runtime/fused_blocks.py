"""Fused transformer blocks for Qwen-Image and Z-Image: one QKV projection per stream, QK-norm and
RoPE in one kernel, AdaLN modulate and the FP8 activation quantization in one kernel.

diffusers' attention processors for these models run three projections on the same input
(``to_q``, ``to_k``, ``to_v``; Qwen-Image's text stream three more) and apply RoPE as complex
multiplication. ``fuse_blocks_`` replaces, in every attention of the model:

* the three projections of a stream by one Linear of their concatenated rows (``to_qkv``, and
  ``to_added_qkv`` for Qwen-Image's text stream, diffusers' own names for fused projections):
  one GEMM of N = 3 x 3072 instead of three of 3072, which fills the GPU better at the text
  stream's 256 rows, and one launch instead of three in eager mode. FP8 layers stay FP8 with the
  same codes: per-tensor parts become one row-wise (per-channel) layer whose rows carry their
  part's scale, which is the same GEMM (``Fp8Linear`` already hands cuBLASLt its per-tensor scale
  repeated per row); per-channel and 128x128-block parts concatenate their scales. The
  activation is quantized once, as before;
* the attention processor by one that splits the fused output with views and, on a CUDA GPU
  (BF16, no autograd, diffusers' ``RMSNorm`` QK-norms), runs each stream's QK-RMSNorm and RoPE as
  one Triton kernel (``triton_kernels.qk_norm_rope_cuda``; a custom op under ``torch.compile``)
  that reads the fused projection's q, k and v once and writes them straight into the joint
  text|image attention inputs: eager diffusers spends about twenty kernels per stream on this
  (the norms' float32 steps, the complex RoPE, the concatenating copies), Inductor one kernel per
  tensor. Measured on an H200 (bench/RESULTS.md, "A 1.5x step"): Qwen-Image's fused eager FP8
  step 171.8 -> 112.7 ms; compiled with static scales, 93.3 ms against 98.4 with Inductor doing
  it. Elsewhere (CPU, other norms) the processor applies RoPE with real-valued cos/sin under
  ``torch.compile`` (Inductor fuses real arithmetic with the QK-norm and the concatenation;
  complex arithmetic it leaves to separate kernels) and, in eager mode, writes the rotated
  queries and keys straight into the joint buffer instead of concatenating copies;
* and in each Qwen-Image block, eager on a CUDA GPU, AdaLN's ``x * (1 + scale) + shift`` (three
  kernels in diffusers' ``_modulate``) by one Triton kernel that also writes the result's
  per-token FP8 codes when the block's projections are per-tensor/per-channel FP8: the
  projection then finds its input already quantized (``kernels.share_quantized_activation``)
  and launches only its GEMM. Same roundings as torch, so the same bits; under torch.compile
  (which fuses this itself), on the CPU, with autograd or the per-token ``modulate_index``
  (Qwen-Image-Edit), diffusers' own ``_modulate`` runs;
* and, for Qwen-Image, a text mask that masks nothing (what QwenImagePipeline passes for one
  prompt: every token real) is dropped before the model runs. diffusers turns any mask into a
  joint text|image mask for SDPA, which then cannot take its fastest kernel: on an H200 at
  1024x1024, attention took 0.65 ms per block with the mask and 0.40 ms without, and a compiled
  pass went 127.3 -> 115.1 ms (FP8), 154.8 -> 140.5 ms (BF16). Masking with all-True keys is
  attention without a mask, so only the SDPA kernel changes. Deciding needs the mask's values on
  the host: read once per mask tensor (a pipeline passes the same one at every step), never
  under ``torch.compile``.

Outputs: eager, the same operations on the same values as diffusers' processor (RoPE is its
complex multiplication; only the GEMMs are wider), so they match it to the GEMMs' summation
order; the QK kernel rounds as torch does except for its variance's float32 summation order,
which moves 2-5 values in a million by one BF16 step (measured on an H200 at real widths);
compiled without the kernel, RoPE's real form rounds like the complex one up to the order of two
float32 products (tests/test_fused_blocks.py and tests/test_gpu_fused_blocks.py state each bound).

    >>> from omni_fp8 import fuse_blocks_, unfuse_blocks_
    >>> fuse_blocks_(pipe.transformer)    # after quantize_ / loading and fuse_lora; before
    >>> image = pipe(prompt).images[0]       # enable_cuda_graphs or torch.compile
    >>> unfuse_blocks_(pipe.transformer)  # back, bit for bit (to save, or to load a LoRA)

The model's parameter names change while fused (``attn.to_qkv.*`` instead of ``attn.to_q.*``...),
so unfuse before ``save_pretrained`` or loading a LoRA; ``fuse_blocks_`` refuses layers that
carry LoRA adapters (fuse them into the weights and unload them first).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from omni_fp8.converter.errors import ConfigError

from .fp8_linear import Fp8Linear
from .kernels import device_has_fp8, share_quantized_activation
from .triton_kernels import (
    GEMV_MAX_ROWS,
    HAVE_TRITON,
    modulate_cuda,
    qk_norm_rope_cuda,
    qk_norm_rope_op,
    qk_norm_rope_supports,
)

__all__ = ["fuse_blocks_", "unfuse_blocks_", "FusedQwenImageAttnProcessor", "FusedZImageAttnProcessor"]

# stream: (fused module name, its parts in output order)
_QKV = ("to_qkv", ("to_q", "to_k", "to_v"))
_ADDED_QKV = ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))


def fuse_blocks_(model: nn.Module) -> nn.Module:
    """Fuse every Qwen-Image / Z-Image attention and Qwen-Image modulation of ``model`` in place
    (see the module docstring); returns ``model``. Calling it again changes nothing."""
    attentions = _attentions(model, "fuse_blocks_")
    _refuse_offloading(model)
    for name, attn, fused_cls in attentions:  # all checked before any is changed
        if isinstance(attn.processor, _FusedProcessor):
            continue
        for stream in fused_cls.streams:
            for part in stream[1]:
                _check_fusable(f"{name}.{part}", getattr(attn, part))
    for name, attn, fused_cls in attentions:
        if isinstance(attn.processor, _FusedProcessor):
            continue
        original = attn.processor
        for fused_name, parts in fused_cls.streams:
            layers = [getattr(attn, p) for p in parts]
            attn.add_module(fused_name, _fuse_linears(layers, parts))
            for p in parts:
                delattr(attn, p)
        processor = fused_cls(original)
        processor._attention_backend = getattr(original, "_attention_backend", None)
        processor._parallel_config = getattr(original, "_parallel_config", None)
        attn.set_processor(processor)
    for block in model.modules():
        if type(block).__name__ == "QwenImageTransformerBlock" and not isinstance(block.__dict__.get("_modulate"), _Modulate):
            block._modulate = _Modulate(block._modulate, quantize=_feeds_per_token_fp8(block))
    for module in model.modules():
        if type(module).__name__ == "QwenImageTransformer2DModel" and _MASK_HOOK not in module.__dict__:
            module.__dict__[_MASK_HOOK] = module.register_forward_pre_hook(_FullMaskDropper(), with_kwargs=True)
    return model


def unfuse_blocks_(model: nn.Module) -> nn.Module:
    """Undo ``fuse_blocks_``: the original projections (same codes and scales, bit for bit) and
    diffusers' processors; returns ``model``."""
    for block in model.modules():
        if isinstance(block.__dict__.get("_modulate"), _Modulate):
            del block.__dict__["_modulate"]
        handle = block.__dict__.pop(_MASK_HOOK, None)
        if handle is not None:
            handle.remove()
    for _, attn, _ in _attentions(model, "unfuse_blocks_"):
        processor = attn.processor
        if not isinstance(processor, _FusedProcessor):
            continue
        for fused_name, _ in processor.streams:
            fused = getattr(attn, fused_name)
            for part, layer in zip(fused.omni_fused_parts, _split_linear(fused)):
                attn.add_module(part[0], layer)
            delattr(attn, fused_name)
        original = processor.original
        original._attention_backend = processor._attention_backend
        original._parallel_config = processor._parallel_config
        attn.set_processor(original)
    return model


def _attentions(model: nn.Module, purpose: str) -> list[tuple[str, nn.Module, type]]:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{purpose} takes a diffusers transformer (torch model), not {type(model).__name__}.")
    found = []
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        kind = type(processor).__name__
        if isinstance(processor, _FusedProcessor):
            found.append((name, module, type(processor)))
        elif kind in _PROCESSORS:
            found.append((name, module, _PROCESSORS[kind]))
    if not found:
        raise ConfigError(
            f"{purpose}: {type(model).__name__} has no Qwen-Image or Z-Image attention (diffusers' "
            "QwenDoubleStreamAttnProcessor2_0 / ZSingleStreamAttnProcessor); pass such a transformer."
        )
    return found


def _refuse_offloading(model: nn.Module) -> None:
    """Offloading hooks know the layers they were set up with; a fused layer made afterwards
    would stay wherever its parts were (the CPU)."""
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        offload = [h for h in getattr(registry, "hooks", {}) if "offload" in h]
        if offload or (name and hasattr(module, "_hf_hook")):
            raise ConfigError(
                f"fuse_blocks_: {name or type(model).__name__} has offloading hooks "
                f"({', '.join(offload) or 'accelerate'}); call fuse_blocks_ before enabling offloading."
            )


def _check_fusable(name: str, layer: nn.Module) -> None:
    if hasattr(layer, "lora_A") or hasattr(layer, "base_layer"):
        raise ConfigError(
            f"fuse_blocks_: {name} carries LoRA adapters; fuse them into the weights and unload them "
            "first (pipe.fuse_lora(); pipe.unload_lora_weights()), or load the LoRA after unfuse_blocks_."
        )
    if not isinstance(layer, (nn.Linear, Fp8Linear)):
        raise ConfigError(f"fuse_blocks_: {name} is a {type(layer).__name__}, not a Linear; it cannot be fused.")
    weight = layer.weight
    if weight.device.type == "meta":
        raise ConfigError(f"fuse_blocks_: {name} has no weights yet (meta device); load the model first.")


def _fuse_linears(layers: list[nn.Module], names: tuple[str, ...]) -> nn.Module:
    """One Linear computing ``torch.cat([layer(x) for layer in layers], -1)``.

    Parts that cannot share one layer (mixed FP8 / high precision, FP8 schemes that differ, block
    rows that do not align, static parts with different input scales) stay separate, inside a ``_Stacked`` module: the processor splits its
    output the same way, so nothing else needs to know.
    """
    outs = [layer.out_features for layer in layers]
    first = layers[0]
    biases = [layer.bias for layer in layers]
    if any((b is None) != (biases[0] is None) for b in biases):
        fused: nn.Module = _Stacked(layers)
    elif all(type(layer) is nn.Linear for layer in layers) and len({(l.weight.dtype, l.weight.device) for l in layers}) == 1:
        fused = nn.Linear(first.in_features, sum(outs), bias=biases[0] is not None, device="meta")
        with torch.no_grad():
            fused.weight = nn.Parameter(torch.cat([l.weight.detach() for l in layers]), requires_grad=False)
            if biases[0] is not None:
                fused.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    elif all(isinstance(l, Fp8Linear) for l in layers) and _same_fp8(layers):
        fused = _fuse_fp8(layers)
    else:
        fused = _Stacked(layers)
    fused.omni_fused_parts = tuple((name, layer.out_features, _kind(layer)) for name, layer in zip(names, layers))
    return fused


def _kind(layer: nn.Module) -> str:
    return layer.scheme if isinstance(layer, Fp8Linear) else "linear"


def _same_fp8(layers: list[Fp8Linear]) -> bool:
    first = layers[0]
    same = all(l.block_size == first.block_size and l.weight.device == first.weight.device
               and l.compute_dtype == first.compute_dtype and l.fast_accum == first.fast_accum
               and l.static == first.static for l in layers)
    if same and first.static:  # one activation quantization serves all parts only with one input scale
        same = all(torch.equal(l.input_scale, first.input_scale) for l in layers)
    if same and first.block_size is not None:  # each part must end on a block row
        same = all(l.out_features % first.block_size[0] == 0 for l in layers[:-1])
    return same


def _fuse_fp8(layers: list[Fp8Linear]) -> Fp8Linear:
    first = layers[0]
    blocked = first.block_size is not None
    fused = Fp8Linear(first.in_features, sum(l.out_features for l in layers), bias=first.bias is not None,
                      block_size=first.block_size, per_channel=not blocked, static=first.static, device="meta",
                      dtype=first.compute_dtype, force_fp8_gemm=first.force_fp8_gemm)
    with torch.no_grad():
        weight = torch.cat([l.weight.detach() for l in layers])
        if blocked:
            scale = torch.cat([l.scale.detach() for l in layers])
        else:  # a per-tensor part's scale repeated on each of its rows: the same row-wise GEMM
            scale = torch.cat([l.scale.detach().reshape(-1, 1).expand(l.out_features, 1) for l in layers])
        bias = None if first.bias is None else torch.cat([l.bias.detach() for l in layers])
        input_scale = first.input_scale.detach() if first.static else None  # the parts' one scale (_same_fp8)
        fused.load_quantized(weight, scale.contiguous(), bias, input_scale=input_scale)
    fused.fast_accum = first.fast_accum
    return fused


def _split_linear(fused: nn.Module) -> list[nn.Module]:
    """The parts ``_fuse_linears`` joined, as they were (FP8 codes and scales bit for bit)."""
    if isinstance(fused, _Stacked):
        return list(fused.parts)
    layers: list[nn.Module] = []
    start = 0
    for _, n, kind in fused.omni_fused_parts:
        rows = slice(start, start + n)
        bias = None if fused.bias is None else fused.bias.detach()[rows].clone()
        if kind == "linear":
            layer = nn.Linear(fused.in_features, n, bias=bias is not None, device="meta")
            layer.weight = nn.Parameter(fused.weight.detach()[rows].clone(), requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias, requires_grad=False)
        else:
            block = fused.block_size
            layer = Fp8Linear(fused.in_features, n, bias=bias is not None, block_size=block,
                              per_channel=kind == "fp8_channel", static=fused.static, device="meta",
                              dtype=fused.compute_dtype, force_fp8_gemm=fused.force_fp8_gemm)
            scale = fused.scale.detach()
            if block is not None:
                scale = scale[start // block[0]: (start + n) // block[0]].clone()
            elif kind == "fp8_channel":
                scale = scale[rows].clone()
            else:
                scale = scale[start, 0].clone()  # every row of a per-tensor part holds its scale
            layer.load_quantized(fused.weight.detach()[rows].clone(), scale, bias,
                                 input_scale=fused.input_scale.detach().clone() if fused.static else None)
            layer.fast_accum = fused.fast_accum
        layers.append(layer)
        start += n
    return layers


class _Stacked(nn.Module):
    """Projections that could not be joined into one layer, run one after another (same result)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _projections(fused: nn.Module, x: torch.Tensor, head_dim: int) -> list[torch.Tensor]:
    """q, k, v as ``[B, S, heads, head_dim]`` views of the fused projection's output."""
    sizes = [n for _, n, _ in fused.omni_fused_parts]
    if isinstance(fused, _Stacked):
        outs = [part(x) for part in fused.parts]
    else:
        outs = fused(x).split(sizes, dim=-1)
    return [o.unflatten(-1, (-1, head_dim)) for o in outs]


def _rope_real(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """``x`` rotated by interleaved pairs, in float32: ``cos_sin`` is ``view_as_real(freqs)``
    broadcast against ``[..., D/2, 2]``; the same products and sums as complex multiplication."""
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)


def _rope_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """diffusers' RoPE (complex multiplication), float32 result as ``[..., D]``: fewer kernels in
    eager mode than the real form, and the same numbers as diffusers."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs
    return torch.view_as_real(rotated).flatten(-2)


def _rope(x: torch.Tensor, freqs: torch.Tensor, head_axis: int) -> torch.Tensor:
    """RoPE of ``x`` [B, S, H, D] with diffusers' complex ``freqs``, unsqueezed at ``head_axis``;
    float32 out. Real-valued under ``torch.compile`` (fusable), complex in eager mode."""
    if torch.compiler.is_compiling():  # the real view first: Inductor generates no code for complex ops
        return _rope_real(x, torch.view_as_real(freqs).unsqueeze(head_axis))
    return _rope_complex(x, freqs.unsqueeze(head_axis))


def _qk_norm_rope(streams: list[tuple], with_v: bool) -> list[torch.Tensor] | None:
    """The joint query, key (and value) from one Triton kernel per stream, or ``None`` where it
    does not apply (then the processor runs the norms, RoPE and concatenation as before).

    ``streams``: ``(q, k, v, norm_q, norm_k, freqs)`` per stream in joint order, ``freqs`` the
    complex frequencies as diffusers passes them ([S, D/2] or [B, S, D/2]).
    """
    norms = [(_rms_norm(norm_q), _rms_norm(norm_k)) for _, _, _, norm_q, norm_k, _ in streams]
    if not streams or any(n is None for pair in norms for n in pair) or any(
            freqs is None or not torch.is_complex(freqs) for *_, freqs in streams):
        return None
    eps = {n[1] for pair in norms for n in pair}
    cos_sins = [torch.view_as_real(freqs) for *_, freqs in streams]
    if len(eps) != 1 or not all(qk_norm_rope_supports(s[0], qn[0], kn[0], cs)
                                for s, (qn, kn), cs in zip(streams, norms, cos_sins)):
        return None
    args = ([s[0] for s in streams], [s[1] for s in streams], [s[2] for s in streams] if with_v else [],
            [qn[0] for qn, _ in norms], [kn[0] for _, kn in norms], cos_sins, eps.pop())
    if torch.compiler.is_compiling():
        return qk_norm_rope_op(*args) if _COMPILED_QK_KERNEL else None
    return qk_norm_rope_cuda(*args)


def _rms_norm(norm: nn.Module | None) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of diffusers' ``RMSNorm`` with a weight and no bias, what the QK kernel computes."""
    weight = getattr(norm, "weight", None)
    if type(norm).__name__ != "RMSNorm" or weight is None or getattr(norm, "bias", None) is not None:
        return None
    return weight, norm.eps


# Whether compiled blocks call the kernel (as a custom op) or leave the norms and RoPE to Inductor
# (bench/step_speed.py --qk-inductor compares the two: 93.3 against 98.4 ms, Qwen-Image on an H200).
_COMPILED_QK_KERNEL = True


class _FusedProcessor:
    """Marks the fused processors and keeps the one they replaced (restored by unfuse)."""

    streams: tuple = ()
    _attention_backend = None
    _parallel_config = None

    def __init__(self, original: object) -> None:
        self.original = original


class FusedQwenImageAttnProcessor(_FusedProcessor):
    """diffusers' ``QwenDoubleStreamAttnProcessor2_0`` over fused projections (module docstring)."""

    streams = (_QKV, _ADDED_QKV)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is None:
            raise ValueError("FusedQwenImageAttnProcessor requires encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("FusedQwenImageAttnProcessor takes encoder_hidden_states_mask, not an attention_mask")
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads

        img_q, img_k, img_v = _projections(attn.to_qkv, hidden_states, head_dim)
        txt_q, txt_k, txt_v = _projections(attn.to_added_qkv, encoder_hidden_states, head_dim)
        img_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
        joint = _qk_norm_rope([(txt_q, txt_k, txt_v, attn.norm_added_q, attn.norm_added_k, txt_freqs),
                               (img_q, img_k, img_v, attn.norm_q, attn.norm_k, img_freqs)], with_v=True)
        if joint is not None:
            query, key, value = joint
        else:
            query, key, value = self._qkv(attn, img_q, img_k, img_v, txt_q, txt_k, txt_v, image_rotary_emb)

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        # Slices of the joint output: for one image they are already contiguous, and the Linear
        # copies them itself when they are not (batch > 1), so no .contiguous() copy here.
        img_out = attn.to_out[0](out[:, seq_txt:])
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(out[:, :seq_txt])
        return img_out, txt_out

    @staticmethod
    def _qkv(attn, img_q, img_k, img_v, txt_q, txt_k, txt_v, image_rotary_emb):
        """The joint query, key and value as diffusers computes them: each norm, RoPE, concatenation."""
        img_q, img_k = _normed(attn.norm_q, img_q), _normed(attn.norm_k, img_k)
        txt_q, txt_k = _normed(attn.norm_added_q, txt_q), _normed(attn.norm_added_k, txt_k)
        dtype = img_q.dtype
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            query = _joint(_rope(txt_q, txt_freqs, 1), _rope(img_q, img_freqs, 1), dtype)
            key = _joint(_rope(txt_k, txt_freqs, 1), _rope(img_k, img_freqs, 1), dtype)
        else:
            query, key = torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1)
        return query, key, torch.cat([txt_v, img_v], dim=1)


def _normed(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def _joint(txt: torch.Tensor, img: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat([txt, img], 1).to(dtype)``. Eager: each part is cast straight into its slice of
    the joint buffer (one kernel per part instead of a cast and then a concatenating copy);
    compiled: the concatenation, which Inductor writes from the producing kernels directly."""
    if torch.compiler.is_compiling():
        return torch.cat([txt, img], dim=1).to(dtype)
    joint = torch.empty((txt.shape[0], txt.shape[1] + img.shape[1], *txt.shape[2:]), dtype=dtype, device=txt.device)
    joint[:, : txt.shape[1]].copy_(txt)
    joint[:, txt.shape[1]:].copy_(img)
    return joint


class FusedZImageAttnProcessor(_FusedProcessor):
    """diffusers' ``ZSingleStreamAttnProcessor`` over a fused projection (module docstring)."""

    streams = (_QKV,)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        head_dim = attn.to_qkv.omni_fused_parts[0][1] // attn.heads
        query, key, value = _projections(attn.to_qkv, hidden_states, head_dim)
        joint = _qk_norm_rope([(query, key, value, attn.norm_q, attn.norm_k, freqs_cis)], with_v=False)
        if joint is not None:
            query, key = joint
        else:
            query, key = _normed(attn.norm_q, query), _normed(attn.norm_k, key)
            if freqs_cis is not None:
                dtype = query.dtype
                with torch.amp.autocast("cuda", enabled=False):
                    query = _rope(query, freqs_cis, 2).to(dtype)
                    key = _rope(key, freqs_cis, 2).to(dtype)
        dtype = query.dtype
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(dtype)
        output = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output


def _feeds_per_token_fp8(block: nn.Module) -> bool:
    """Whether the Linears reading this block's modulated activations are FP8 with per-token
    activations (per-tensor / per-channel weights): then the modulation kernel quantizes too."""
    readers = [getattr(block.attn, "to_qkv", None), getattr(block.attn, "to_added_qkv", None)]
    for mlp in (getattr(block, "img_mlp", None), getattr(block, "txt_mlp", None)):
        first = getattr(mlp, "net", [None])[0]
        readers.append(getattr(first, "proj", None))
    return any(isinstance(r, Fp8Linear) and r.block_size is None and not r.static for r in readers)


class _Modulate:
    """``QwenImageTransformerBlock._modulate`` with the one-kernel path (module docstring); set on
    the block instance, so unfusing is deleting it."""

    def __init__(self, original, quantize: bool) -> None:
        self.original = original
        self.quantize = quantize

    def __call__(self, x: torch.Tensor, mod_params: torch.Tensor, index: torch.Tensor | None = None):
        if (torch.compiler.is_compiling() or index is not None or not HAVE_TRITON or not x.is_cuda or x.dim() != 3
                or x.dtype != torch.bfloat16 or mod_params.dtype != torch.bfloat16 or torch.is_grad_enabled()):
            return self.original(x, mod_params, index)
        shift, scale, gate = mod_params.chunk(3, dim=-1)
        quantize = self.quantize and x.shape[0] * x.shape[1] > GEMV_MAX_ROWS and device_has_fp8(x.device)
        y, q, s = modulate_cuda(x, shift, scale, quantize)
        if quantize:
            share_quantized_activation(y, q, s)
        return y, gate.unsqueeze(1)


_MASK_HOOK = "_omni_fp8_full_mask_hook"
_MASK_ARG = 2  # QwenImageTransformer2DModel.forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, ...)


class _FullMaskDropper:
    """A forward pre-hook on QwenImageTransformer2DModel: a text mask with every token real
    becomes ``None`` (module docstring). Remembers its answer for the last few mask tensors,
    checked against the tensor (a weak reference) and its version counter, so a pipeline's mask
    is read from the GPU once, not at every step."""

    def __init__(self) -> None:
        self.known: dict[int, tuple[weakref.ref, int, bool]] = {}
        self.reads = 0  # host reads of a mask's values (tests count them)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positional = len(args) > _MASK_ARG
        mask = args[_MASK_ARG] if positional else kwargs.get("encoder_hidden_states_mask")
        if not isinstance(mask, torch.Tensor) or torch.compiler.is_compiling() or not self._full(mask):
            return None
        if positional:
            return (*args[:_MASK_ARG], None, *args[_MASK_ARG + 1:]), kwargs
        return args, {**kwargs, "encoder_hidden_states_mask": None}

    def _full(self, mask: torch.Tensor) -> bool:
        entry = self.known.get(id(mask))
        if entry is not None and entry[0]() is mask and entry[1] == mask._version:
            return entry[2]
        self.reads += 1
        full = bool(mask.bool().all())
        if len(self.known) >= 8:
            self.known.clear()
        self.known[id(mask)] = (weakref.ref(mask), mask._version, full)
        return full


_PROCESSORS = {"QwenDoubleStreamAttnProcessor2_0": FusedQwenImageAttnProcessor,
               "ZSingleStreamAttnProcessor": FusedZImageAttnProcessor}
