"""Load omni-fp8 folders with vllm-omni's own classes and loader, on a CPU, and check every number.

Run inside the environment ``bench/interop/setup_vllm_env.sh`` builds (vllm 0.30.0, vllm-omni 0.30.0):

    bash bench/interop/setup_vllm_env.sh && .bench/vllm-venv/bin/python bench/interop/vllm_omni_load.py

For tiny Qwen-Image and Z-Image checkpoints, each converted with the default target and with
``--target vllm-omni``, it builds vllm-omni's transformer from the folder's config.json (its
``TransformerConfig.from_dict`` reads our ``quantization_config`` into vLLM's ``Fp8Config``), fills it
through ``DiffusersPipelineLoader.load_weights``, and then:

* compares every loaded parameter with what the folder holds (fused ``to_qkv``/``add_kv_proj``/
  ``w13`` with their parts' rows; per-shard scale vectors with the parts' scales);
* runs vLLM's post-load processing (the requantization of fused parts to one scale) and checks
  the fused FP8 codes are still the folder's, bit for bit;
* for Z-Image, builds the text encoder the way vllm-omni does (``create_transformers_model``
  under the checkpoint's FP8 config) and counts the Linears it would make FP8;
* runs the forward on the same inputs as vllm-omni's own model built without quantization from
  the BF16 source, and prints the relative L2 error.

What stands in for hardware: vLLM's compiled ``scaled_fp8_quant`` is replaced by the same
arithmetic in torch (divide, clamp, cast), ``SiluAndMul`` skips looking up its compiled op (its
CPU forward is torch's), and the attention uses vllm-omni's torch SDPA backend. Exit status 1 if a ``--target vllm-omni`` folder does not load exactly as written.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

FP8 = torch.float8_e4m3fn
# vllm-omni's fused Linears and the checkpoint parts they load, in row order
# (load_weights' stacked_params_mapping in qwen_image_transformer.py and z_image_transformer.py).
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "add_kv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
         "w13": ("w1", "w3")}


def _quiet() -> None:
    for name in ("vllm", "vllm_omni", "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def make_sources(root: Path) -> dict[str, Path]:
    """Tiny BF16 checkpoints: a Qwen-Image transformer folder and a Z-Image pipeline with its text encoder."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image, tiny_z_image

    qwen = save_checkpoint(tiny_qwen_image(seed=1), root / "qwen-image-bf16")
    zimage = root / "z-image-bf16"
    save_checkpoint(tiny_z_image(seed=2), zimage / "transformer")
    torch.manual_seed(4)
    encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           vocab_size=64, tie_word_embeddings=True))
    encoder.to(torch.bfloat16).save_pretrained(zimage / "text_encoder")
    (zimage / "model_index.json").write_text(json.dumps({
        "_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"]}))
    return {"qwen-image": qwen, "z-image": zimage}


class Harness:
    """vllm-omni's diffusion config, a single-process gloo group, and its loader, set up once."""

    def __init__(self) -> None:
        from vllm_omni.diffusion.attention.backends import sdpa
        from vllm_omni.platforms import current_omni_platform

        # The platform has no attention backend on a CPU: use vllm-omni's torch SDPA one.
        type(current_omni_platform).get_diffusion_attn_backend_cls = classmethod(
            lambda cls, *a, **k: "vllm_omni.diffusion.attention.backends.sdpa.SDPABackend")
        for value in vars(sdpa).values():
            if isinstance(value, type) and "forward_cuda" in vars(value):
                value.forward = value.forward_cuda
        import vllm._custom_ops as ops

        def scaled_fp8_quant(x, scale=None, *args, **kwargs):  # vLLM's kernel, in torch: x / scale, clamped, cast
            return (x.float() / scale.float()).clamp(-448.0, 448.0).to(FP8), scale

        ops.scaled_fp8_quant = scaled_fp8_quant
        from vllm.model_executor.custom_op import CustomOp
        from vllm.model_executor.layers.activation import SiluAndMul

        # Its __init__ looks up the compiled op even where forward_cpu runs the torch one.
        SiluAndMul.__init__ = lambda self, *, compile_native=True: CustomOp.__init__(self, compile_native=compile_native)
        self.dist_ready = False

    def context(self, folder_config: dict, model_path: Path):
        from vllm.config import set_current_vllm_config
        from vllm_omni.diffusion.data import OmniDiffusionConfig, TransformerConfig
        from vllm_omni.diffusion.forward_context import set_forward_context
        from vllm_omni.diffusion.vllm_config import create_diffusion_vllm_config

        tf = TransformerConfig.from_dict(folder_config)
        od = OmniDiffusionConfig(model=str(model_path), tf_model_config=tf, dtype=torch.bfloat16)
        vc = create_diffusion_vllm_config(torch.device("cpu"), od)
        return od, vc, (set_forward_context(vllm_config=vc, omni_diffusion_config=od), set_current_vllm_config(vc))

    def init_dist(self) -> None:
        if self.dist_ready:
            return
        from vllm.distributed import init_distributed_environment, initialize_model_parallel

        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="tcp://127.0.0.1:29517")
        initialize_model_parallel(1, 1)
        self.dist_ready = True


def build(family: str, od, params: dict, quant_config):
    if family == "qwen-image":
        from vllm_omni.diffusion.models.qwen_image.qwen_image_transformer import QwenImageTransformer2DModel as cls

        kwargs = {"od_config": od}
    else:
        from vllm_omni.diffusion.models.z_image.z_image_transformer import ZImageTransformer2DModel as cls

        kwargs = {}
    import inspect

    accepted = inspect.signature(cls.__init__).parameters  # diffusers' config has keys vllm-omni does not take
    params = {k: v for k, v in params.items() if k in accepted}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as DiffusersPipelineLoader.load_model does
    try:
        return cls(quant_config=quant_config, **kwargs, **params)
    finally:
        torch.set_default_dtype(previous)


def load_into(model, folder: Path, subfolder: str | None, od):
    from vllm.config import LoadConfig
    from vllm_omni.diffusion.model_loader.diffusers_loader import DiffusersPipelineLoader

    class Pipeline(torch.nn.Module):  # the one component a pipeline's weights_sources would name
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer
            self.weights_sources = [DiffusersPipelineLoader.ComponentSource(
                model_or_path=str(folder), subfolder=subfolder, revision=None, prefix="transformer.")]

        def load_weights(self, weights):
            names = self.transformer.load_weights((n.removeprefix("transformer."), t) for n, t in weights)
            return {f"transformer.{n}" for n in names}

    pipeline = Pipeline(model)
    loader = DiffusersPipelineLoader(LoadConfig(), od)
    loader.load_weights(pipeline)
    return loader, pipeline


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def expected(module: str, param: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What the folder says ``module.param`` holds, in vllm-omni's names."""
    name = f"{module}.{param}"
    candidates = [name, name.replace(".to_out.", ".to_out.0.")]
    for cand in candidates:
        if cand in tensors:
            return tensors[cand]
    parent, _, last = module.rpartition(".")
    if last in FUSED:
        parts = [tensors.get(f"{parent}.{p}.{param}") for p in FUSED[last]]
        if all(p is not None for p in parts):
            if param == "weight_scale":
                return torch.stack([p.reshape(()) for p in parts])
            return torch.cat(parts)
    return None


def compare_loaded(model, tensors) -> tuple[int, int, list[str]]:
    """(exact, differing, first differences): every vLLM Linear parameter against the folder."""
    from vllm.model_executor.layers.linear import LinearBase

    exact, differ, notes = 0, 0, []
    for module_name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        for param, value in module.named_parameters(recurse=False):
            want = expected(module_name, param, tensors)
            if want is None:
                differ += 1
                notes.append(f"{module_name}.{param}: not in the folder (left uninitialized)")
                continue
            if value.numel() == want.numel():  # vLLM keeps a per-tensor scale as [1]
                want = want.reshape(value.shape)
            same = value.dtype == want.dtype and value.shape == want.shape and torch.equal(
                value.detach().reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8))
            if same:
                exact += 1
            else:
                differ += 1
                notes.append(f"{module_name}.{param}: {value.dtype}{list(value.shape)} loaded, folder has "
                             f"{want.dtype}{list(want.shape)}" + (" (FP8 codes taken as numbers)"
                                                                  if want.dtype == FP8 and value.dtype != FP8 else ""))
    return exact, differ, notes


def requantized_exact(model, tensors) -> tuple[int, int]:
    """After vLLM's post-load processing: fused FP8 Linears still hold the folder's codes and scale."""
    good = bad = 0
    for module_name, module in model.named_modules():
        last = module_name.rpartition(".")[2]
        weight = getattr(module, "weight", None)
        if last not in FUSED or weight is None or weight.dtype != FP8:
            continue
        want = expected(module_name, "weight", tensors)
        scales = expected(module_name, "weight_scale", tensors)
        codes = weight.detach().t().contiguous()  # vLLM keeps it transposed for the GEMM
        ok = torch.equal(codes.view(torch.uint8), want.view(torch.uint8)) and torch.equal(
            module.weight_scale.detach().reshape(()).float(), scales.max())
        good, bad = good + ok, bad + (not ok)
    return good, bad


def forward(family: str, model) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        if family == "qwen-image":
            return model(hidden_states=torch.randn(1, 16, 16, dtype=torch.bfloat16),
                         encoder_hidden_states=torch.randn(1, 7, 32, dtype=torch.bfloat16),
                         encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.int64),
                         timestep=torch.tensor([0.5], dtype=torch.bfloat16), img_shapes=[[(1, 4, 4)]],
                         txt_seq_lens=[7], return_dict=False)[0].float()
        x = [torch.randn(16, 1, 8, 8, dtype=torch.bfloat16)]
        out = model(x, torch.tensor([0.5], dtype=torch.bfloat16), [torch.randn(7, 32, dtype=torch.bfloat16)])
        out = out[0] if isinstance(out, tuple) else out
        return torch.stack([o.float() for o in out])


def encoder_fp8_linears(folder: Path, od) -> tuple[int, int]:
    """(FP8, all) vLLM Linears in the text encoder vllm-omni builds under this checkpoint's config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.quantization.fp8 import Fp8LinearMethod
    from vllm_omni.diffusion.models.utils import create_transformers_model

    config = AutoConfig.from_pretrained(folder / "text_encoder")
    encoder = create_transformers_model(AutoModelForCausalLM, od, hf_config=config, device=torch.device("cpu"))
    linears = [m for m in encoder.modules() if isinstance(m, LinearBase)]
    return sum(isinstance(m.quant_method, Fp8LinearMethod) for m in linears), len(linears)


def run_case(h: Harness, family: str, source: Path, target: str, work: Path, reference: dict) -> dict:
    from omni_fp8 import convert

    out = work / f"{family}-{target}"
    row: dict = {"model": family, "target": target}
    try:
        convert(source, out, target=target, progress=False)
    except Exception as e:  # the converter refusing is a result too
        row.update(loads=f"refused by omni-convert: {e}")
        return row
    transformer_dir = out / "transformer" if (out / "transformer").is_dir() else out
    config = json.loads((transformer_dir / "config.json").read_text())
    params = {k: v for k, v in config.items() if not k.startswith("_") and k != "quantization_config"}
    tensors = folder_tensors(transformer_dir)
    started = time.perf_counter()
    od, _, contexts = h.context(config, out)
    with contexts[0], contexts[1]:
        h.init_dist()
        if family == "z-image":
            fp8, total = encoder_fp8_linears(out, od)
            row["encoder FP8 Linears"] = f"{fp8}/{total}"
        try:
            model = build(family, od, params, od.quantization_config)
            loader, pipeline = load_into(model, out, "transformer" if transformer_dir != out else None, od)
        except Exception as e:
            row.update(loads=f"fails: {type(e).__name__}: {str(e)[:120]}")
            return row
        exact, differ, notes = compare_loaded(model, tensors)
        loader._process_weights_after_loading(pipeline, torch.device("cpu"))
        good, bad = requantized_exact(model, tensors)
        output = forward(family, model)
    ref = reference[family]
    row.update(loads="yes", params_exact=exact, params_differ=differ, fused_requant_exact=f"{good}/{good + bad}",
               rel_l2=((output - ref).norm() / ref.norm()).item(), seconds=round(time.perf_counter() - started, 1),
               first_difference=notes[0] if notes else "")
    return row


def reference_outputs(h: Harness, sources: dict[str, Path]) -> dict[str, torch.Tensor]:
    """vllm-omni's own models, unquantized, loaded from the BF16 sources: the numbers to match."""
    outputs = {}
    for family, source in sources.items():
        transformer_dir = source / "transformer" if (source / "transformer").is_dir() else source
        config = json.loads((transformer_dir / "config.json").read_text())
        params = {k: v for k, v in config.items() if not k.startswith("_")}
        od, _, contexts = h.context(config, source)
        with contexts[0], contexts[1]:
            h.init_dist()
            model = build(family, od, params, None)
            loader, pipeline = load_into(model, source, "transformer" if transformer_dir != source else None, od)
            loader._process_weights_after_loading(pipeline, torch.device("cpu"))
            outputs[family] = forward(family, model)
    return outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    _quiet()
    from importlib.metadata import version

    versions = {p: version(p) for p in ("vllm", "vllm-omni", "torch", "diffusers", "transformers", "omni-fp8")}
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    h = Harness()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vllm-omni-load-") as tmp:
        work = Path(tmp)
        sources = make_sources(work)
        reference = reference_outputs(h, sources)
        for family in sources:
            for target in ("omni-fp8", "vllm-omni"):
                rows.append(run_case(h, family, sources[family], target, work, reference))
    columns = ["model", "target", "loads", "params_exact", "params_differ", "fused_requant_exact",
               "encoder FP8 Linears", "rel_l2", "seconds"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) and c == "rel_l2" else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")
    for row in rows:
        if row.get("first_difference"):
            print(f"{row['model']} / {row['target']}: first difference: {row['first_difference']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "rows": rows}, indent=2) + "\n")
    failed = [r for r in rows if r["target"] == "vllm-omni" and not (
        r.get("loads") == "yes" and r.get("params_differ") == 0 and r.get("rel_l2", 1) < 0.05
        and r.get("encoder FP8 Linears", "0/").startswith("0/") and r["fused_requant_exact"].split("/")[0]
        == r["fused_requant_exact"].split("/")[1])]
    for r in failed:
        print(f"error: {r['model']} --target vllm-omni does not load exactly as written: {r}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
