"""``Fp8Linear``: a drop-in ``nn.Linear`` whose weight is stored in FP8.

It holds what a converted checkpoint holds, under the same names, so ``state_dict()`` round-trips
with the files: ``weight`` (float8_e4m3fn ``[out, in]``), ``weight_scale`` (float32 scalar) or
``weight_scale_inv`` (float32 block grid), ``input_scale`` (float32 scalar, static activations
only) and ``bias`` in the compute dtype. The matmul is ``kernels.fp8_linear``.

    >>> layer = Fp8Linear.from_linear(torch.nn.Linear(64, 32))
    >>> layer
    Fp8Linear(in_features=64, out_features=32, bias=True, scheme=fp8_tensor)
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from omni_fp8.converter.numerics import FP8_DTYPE, block_scale_shape, check_scale, dequantize_weight, quantize_weight
from omni_fp8.converter.options import parse_block_size

from .kernels import eager_linear, fp8_linear, gemm_for, gemm_scale_layout, no_fp8_gemm_error

__all__ = ["Fp8Linear", "replace_linears"]


class Fp8Linear(nn.Module):
    """``y = x @ (q * s).T + b`` with FP8 ``q``; activations are quantized per token on the fly,
    or with one calibrated ``input_scale`` (``static=True``).

    Args:
        block_size: ``None`` for one weight scale (``weight_scale``), ``(bn, bk)`` for one per
            block (``weight_scale_inv``).
        per_channel: One scale per output row (``weight_scale`` ``[out, 1]``), as compressed-tensors,
            ModelOpt and BFL ``fp8r`` checkpoints store them.
        static: Static activations: an ``input_scale`` parameter (float32 scalar, from calibration)
            quantizes every token, instead of a per-token scale computed on the fly.
        dtype: dtype of the bias (the compute dtype); the output takes the input's dtype.
        force_fp8_gemm: Refuse to run on a device without FP8 matmuls instead of emulating them.

    ``layer.fast_accum = True`` lets cuBLASLt accumulate per-tensor/per-channel GEMMs in its
    faster, less exact mode, as diffusers' ``fp8r`` layer does (the layer re-plans its GEMM when
    it is set). Off by default; bench/RESULTS.md has what it gains and costs.
    """

    _fast_accum = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: tuple[int, int] | None = None,
        per_channel: bool = False,
        static: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        force_fp8_gemm: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = parse_block_size(block_size) if block_size is not None else None
        if per_channel and self.block_size is not None:
            raise ValueError("an Fp8Linear has per-channel or block scales, not both")
        self.per_channel = per_channel
        self._scale_key = "weight_scale" if self.block_size is None else "weight_scale_inv"
        self.force_fp8_gemm = force_fp8_gemm
        self._compute_dtype = dtype if dtype is not None and dtype.is_floating_point and dtype != FP8_DTYPE else None
        self._gemm_fn = None
        self._eager = None
        self._placed_for: tuple | None = None
        # The bias goes first: diffusers reports a model's dtype as its first floating parameter's,
        # and that should be the compute dtype, not float8.
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.register_load_state_dict_post_hook(Fp8Linear._after_load)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        if self.block_size is None:
            shape = (out_features, 1) if per_channel else ()
            self.weight_scale = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device), requires_grad=False)
        else:
            grid = block_scale_shape((out_features, in_features), self.block_size)
            self.weight_scale_inv = nn.Parameter(torch.ones(grid, dtype=torch.float32, device=device), requires_grad=False)
        if static:
            self.input_scale = nn.Parameter(torch.ones((), dtype=torch.float32, device=device), requires_grad=False)
        else:
            self.register_parameter("input_scale", None)
        self._place()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, block_size: tuple[int, int] | None = None, *, per_channel: bool = False,
        force_fp8_gemm: bool = False, input_scale: torch.Tensor | None = None,
    ) -> Fp8Linear:
        """Quantize an existing ``nn.Linear`` with the converter's numerics (``input_scale``: static
        activations with that calibrated scale, ``numerics.activation_scale``)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            per_channel=per_channel,
            static=input_scale is not None,
            device="meta",
            dtype=linear.bias.dtype if linear.bias is not None else linear.weight.dtype,
            force_fp8_gemm=force_fp8_gemm,
        )
        q, scale = layer.quantize(linear.weight.detach())
        layer.load_quantized(q, scale, None if linear.bias is None else linear.bias.detach(), input_scale=input_scale)
        return layer

    def quantize(self, weight: torch.Tensor, *, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
        """``weight`` in this layer's scheme with the shared numerics (a LoRA merge re-quantizes so)."""
        return quantize_weight(weight, self.block_size, per_channel=self.per_channel, name=name)

    def load_quantized(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
                       input_scale: torch.Tensor | None = None) -> None:
        """Adopt already-quantized tensors (same shapes as ``self``'s), e.g. fresh from a shard."""
        if (input_scale is None) != (self.input_scale is None):
            raise ValueError(f"Fp8Linear({self.extra_repr()}) takes {'an' if self.static else 'no'} input_scale")
        expected = (self.weight.shape, self.scale.shape, None if self.bias is None else self.bias.shape)
        got = (weight.shape, scale.shape, None if bias is None else bias.shape)
        if weight.dtype != FP8_DTYPE or got[:2] != expected[:2] or (bias is not None and got[2] != expected[2]):
            raise ValueError(f"Fp8Linear({self.extra_repr()}) cannot take {weight.dtype} tensors of shapes {got}")
        check_scale(scale.to(torch.float32), name=self.scale_name, where=f"Fp8Linear({self.extra_repr()})")
        self.weight = nn.Parameter(weight, requires_grad=False)
        setattr(self, self.scale_name, nn.Parameter(scale.to(torch.float32), requires_grad=False))
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        if input_scale is not None:
            input_scale = input_scale.to(device=weight.device, dtype=torch.float32).reshape(())
            check_scale(input_scale, name="input_scale", where=f"Fp8Linear({self.extra_repr()})")
            self.input_scale = nn.Parameter(input_scale, requires_grad=False)
        self._place(rescale=True)

    @property
    def static(self) -> bool:
        """Whether activations are quantized with a calibrated ``input_scale``."""
        return self._parameters.get("input_scale") is not None

    @property
    def activation_scheme(self) -> str:
        return "static" if self.static else "dynamic"

    @property
    def scheme(self) -> str:
        if self.block_size is not None:
            return "fp8_block"
        return "fp8_channel" if self.per_channel else "fp8_tensor"

    @property
    def scale_name(self) -> str:
        return self._scale_key

    @property
    def scale(self) -> torch.Tensor:
        return getattr(self, self.scale_name)

    @property
    def fast_accum(self) -> bool:
        return self._fast_accum

    @fast_accum.setter
    def fast_accum(self, value: bool) -> None:
        self._fast_accum = bool(value)
        self._place()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes in: its bias's, else the one it was built for (float32 at worst).

        peft reads this to create LoRA adapters in the compute dtype instead of float8.
        """
        if self.bias is not None and self.bias.dtype != FP8_DTYPE:
            return self.bias.dtype
        return self._compute_dtype or torch.float32

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype) -> None:
        self._compute_dtype = dtype

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.weight, self.scale, self.block_size, dtype)

    def set_quantized_(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """Write new FP8 codes and scale into the existing tensors, in place.

        Offloading hooks keep the layer's Parameter objects (group offload snapshots them), so
        merging a LoRA must change their contents, never replace them; the GEMM plan is redone.
        """
        self.weight.data.copy_(weight)
        self.scale.data.copy_(scale.reshape(self.scale.shape))
        self._place(rescale=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            if self._placed_for != self._where():
                self._place()  # moved by something that bypasses .to() (offloading hooks): re-plan once
            if self._eager is not None and x.dtype == torch.bfloat16:
                return self._eager(x)
        return fp8_linear(x, self.weight, self.scale, self.bias, self.block_size, self._gemm_fn,
                          self._buffers.get("gemm_scale"), self._parameters.get("input_scale"), self._fast_accum)

    def extra_repr(self) -> str:
        block = f"{self.block_size[0]}x{self.block_size[1]}" if self.block_size else None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"scheme={self.scheme}" + (f", block_size={block}" if block else "")
            + (", activations=static" if self.static else "")
        )

    def __getstate__(self) -> dict:
        """Copies and pickles drop the per-call plan (it refers to this layer's own tensors); the
        copy makes its own at its first forward."""
        state = self.__dict__.copy()
        state["_eager"], state["_placed_for"] = None, None
        return state

    def _where(self) -> tuple:
        """Where the weight and scale live now: the GEMM plan is valid while this stays the same."""
        params = self._parameters
        weight, gemm_scale, input_scale = params["weight"], self._buffers.get("gemm_scale"), params.get("input_scale")
        return (weight.device, weight.data_ptr(), params[self._scale_key].data_ptr(),
                None if gemm_scale is None else gemm_scale.data_ptr(),
                None if input_scale is None else input_scale.data_ptr())

    def _after_load(self, *_: object) -> None:
        """After ``load_state_dict``: refuse a scale the contract never writes, then pick the kernel."""
        if self.scale.device.type != "meta":
            check_scale(self.scale, name=self.scale_name, where=f"Fp8Linear({self.extra_repr()})")
        if self.static and self.input_scale.device.type != "meta":
            check_scale(self.input_scale, name="input_scale", where=f"Fp8Linear({self.extra_repr()})")
        self._place(rescale=True)

    def _place(self, *_: object, rescale: bool = False) -> None:
        """Decide the kernel for the device the weight is on: when placed, loaded or moved.

        ``.to()`` calls this through ``_apply``; moves that bypass it (group offloading assigns
        ``.data``, sequential offloading installs new Parameters) are caught by ``forward``, which
        compares where the tensors are with where they were when planned, so the FP8 GEMM follows
        the weight whichever way it moved, and nothing is re-planned while nothing moves.

        The GEMM's scale layout is a non-persistent buffer, so torch.compile treats it as an
        input like the weight and one compiled block serves every block (a plain attribute would
        be guarded per module and recompile for each). It always exists once the scale is real
        (offloading hooks snapshot and move every buffer when they are set up, so one created
        later would be unknown to them), its values follow the scale (``rescale``, or first
        placement), and a move only moves it, keeping the same tensor object.
        """
        device = self.weight.device
        if device.type == "meta" or self.scale.device.type == "meta" or (
                self.static and self.input_scale.device.type == "meta"):
            self._gemm_fn, self._eager, self._placed_for = None, None, None
            return
        buf = self._buffers.get("gemm_scale")
        if rescale or buf is None or buf.device.type == "meta":
            layout = gemm_scale_layout(self.scale.detach(), self.out_features, self.block_size).to(device)
            if buf is None:
                self.register_buffer("gemm_scale", layout, persistent=False)
            else:
                buf.data = layout
        elif buf.device != device:
            buf.data = buf.data.to(device)
        self._gemm_fn = gemm_for(device, (self.out_features, self.in_features), self.block_size, self._fast_accum)
        self._eager = eager_linear(self)
        self._placed_for = self._where()
        if self.force_fp8_gemm and self._gemm_fn is None:
            raise no_fp8_gemm_error(device, self.scheme)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Let ``.to(device)`` move the FP8 weight and scales, but never let ``.to(dtype)`` cast them.

        ``Module.to(torch.bfloat16)`` casts every floating tensor, FP8 ones included; here only the
        bias follows a dtype change, the weight stays FP8 and the scales float32. Parameters keep
        their identity (``.data`` is replaced), as ``Module._apply`` does.
        """
        target = fn(torch.empty(0, device=self.weight.device, dtype=self.compute_dtype))
        for name in ("weight", self.scale_name, *(("input_scale",) if self.static else ())):
            param = getattr(self, name)
            param.data = param.data.to(target.device)
        if "gemm_scale" in self._buffers:
            self.gemm_scale.data = self.gemm_scale.data.to(target.device)
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        elif target.dtype.is_floating_point:
            self._compute_dtype = target.dtype
        self._place()
        return self


def replace_linears(
    model: nn.Module, schemes: dict[str, str], block_size: tuple[int, int] | None, *, force_fp8_gemm: bool = False,
    static: Collection[str] = (),
) -> None:
    """Replace every Linear that ``schemes`` marks for FP8 with an empty (meta) ``Fp8Linear``.

    The loaders then fill the new layers tensor by tensor; ``schemes`` maps module name to
    ``"fp8_tensor"``, ``"fp8_channel"``, ``"fp8_block"`` or ``"kept"`` (the plan's names);
    the layers named in ``static`` get an ``input_scale`` (static activations).
    """
    for name, scheme in schemes.items():
        if scheme == "kept":
            continue
        linear = model.get_submodule(name)
        layer = Fp8Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            block_size=block_size if scheme == "fp8_block" else None, per_channel=scheme == "fp8_channel",
            static=name in static, device="meta", dtype=linear.weight.dtype, force_fp8_gemm=force_fp8_gemm,
        )
        model.set_submodule(name, layer)
