"""Loading a real-width Qwen-Image transformer: BF16 with diffusers, FP8 at load time, FP8 converted.

Uses the checkpoint of ``bench/checkpoints.py`` (8 blocks = 5.5 GB BF16 by default), converts it
once with ``omni-convert`` (untimed), then loads it three ways, each in a fresh process:

* ``diffusers bf16``  ``QwenImageTransformer2DModel.from_pretrained(SRC, dtype=bfloat16)``
* ``fp8 at load``     ``load_transformer(SRC, quantization="fp8", quantization_config={"preset": "none"})``
* ``fp8 converted``   ``load_transformer(OUT)``
* ``diffusers fp8 on the fly`` / ``diffusers fp8 converted``: diffusers' own ``from_pretrained``
  with the FP8 quantizer (``quantization_config=Fp8Config(preset="none")`` / the converted folder)

and prints the load time (inside the process, imports excluded, checkpoint warm in the page
cache), the peak RSS of the process (``/usr/bin/time``; every page of the loaded model touched, so
a model left as lazy views of its files counts as it will once used) and, with ``--device cuda``,
the peak GPU memory allocated.

    python bench/load_memory.py --blocks 8                  # CPU
    python bench/load_memory.py --blocks 8 --device cuda    # GPU: also GPU peak memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import write_qwen_image  # noqa: E402

CHILD = r"""
import json, sys, time, torch
kind, path, device = sys.argv[1:4]
from diffusers import QwenImageTransformer2DModel
from omni_fp8 import load_transformer
if device == "cuda":
    torch.cuda.init()
start = time.perf_counter()
if kind == "diffusers bf16":
    model = QwenImageTransformer2DModel.from_pretrained(path, dtype=torch.bfloat16).to(device)
elif kind == "fp8 at load":
    model = load_transformer(path, quantization="fp8", quantization_config={"preset": "none"}, device=device, progress=False)
elif kind == "diffusers fp8 on the fly":
    from omni_fp8 import Fp8Config
    model = QwenImageTransformer2DModel.from_pretrained(path, quantization_config=Fp8Config(preset="none"), dtype=torch.bfloat16).to(device)
elif kind == "diffusers fp8 converted":
    model = QwenImageTransformer2DModel.from_pretrained(path, dtype=torch.bfloat16).to(device)
else:
    model = load_transformer(path, device=device, progress=False)
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
# Touch one byte of every page of every tensor: diffusers may leave weights as lazy views of the
# files (accelerate installed), and RSS should count the model as it is once used.
for t in model.state_dict().values():
    if t.device.type == "cpu" and t.numel():
        t.reshape(-1).view(torch.uint8)[::4096].sum()
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
gpu_peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
print("RESULT " + json.dumps({"seconds": seconds, "weight_bytes": weights, "gpu_peak": gpu_peak}))
"""


def run(kind: str, path: Path, device: str) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, sys.executable, "-c", CHILD,
                               kind, str(path), device], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
        peak_kib = int(report.read().strip().splitlines()[-1])
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "peak_rss": peak_kib * 1024}


def warm(folder: Path) -> None:
    """Read the checkpoint once, so every load starts with it in the page cache."""
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/convert"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    src = write_qwen_image(args.workdir / f"qwen-image-{args.blocks}blocks-bf16", blocks=args.blocks)
    out = args.workdir / f"qwen-image-{args.blocks}blocks-fp8"
    subprocess.run([sys.executable, "-m", "omni_fp8.converter.cli", "convert", str(src), str(out), "--preset", "none",
                    "--quiet", "--force"], check=True, stdout=subprocess.DEVNULL)
    source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))

    results = {}
    for kind, path in (("diffusers bf16", src), ("fp8 at load", src), ("fp8 converted", out),
                       ("diffusers fp8 on the fly", src), ("diffusers fp8 converted", out)):
        os.sync()
        warm(path)
        results[kind] = run(kind, path, args.device)
        r = results[kind]
        print(f"{kind}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)

    base = results["diffusers bf16"]
    print(f"\nQwen-Image, real widths, {args.blocks} blocks, {source_bytes / 1e9:.2f} GB BF16, device {args.device}")
    gpu = args.device == "cuda"
    print(f"{'load':<24} {'seconds':>8} {'weights':>9} {'peak RSS':>9} {'RSS vs BF16':>12}" + (f" {'GPU peak':>9}" if gpu else ""))
    for kind, r in results.items():
        print(f"{kind:<24} {r['seconds']:>8.1f} {r['weight_bytes'] / 2**30:>5.2f} GiB {r['peak_rss'] / 2**30:>5.2f} GiB "
              f"{r['peak_rss'] / base['peak_rss']:>11.2f}x" + (f" {r['gpu_peak'] / 2**30:>5.2f} GiB" if gpu else ""))
    if args.json:
        args.json.write_text(json.dumps({"blocks": args.blocks, "device": args.device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
