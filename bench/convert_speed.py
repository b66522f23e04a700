"""Conversion speed and peak memory: omni-convert against llm-compressor and a naive script.

Writes a real-width Qwen-Image checkpoint with few blocks (8 blocks = 5.5 GB BF16 in 2 GB shards),
then converts it, each tool in its own process with the source warm in the page cache:

* omni-fp8      ``omni-convert convert SRC OUT --preset none`` (every aligned Linear, per-tensor),
                first with an empty model-structure cache (``OMNI_FP8_CACHE``: the model is built
                with diffusers, as on a first conversion), then again with the structure cached
* llm-compressor ``model_free_ptq(SRC, OUT, scheme="FP8_DYNAMIC", ignore=["re:.*norm.*"])`` with
                 its default ``max_workers=1`` and with 2 ("x2"), run with the Python of a separate
                 venv (``--llmc-python``; it is not a dependency)
* naive         ``load_file`` a shard, quantize with the one-liner, ``save_file`` it

and prints wall time, GB/s of source and peak RSS (``ru_maxrss`` of the child) with ratios
against omni-fp8. Timings vary run to run on shared machines; compare ratios within one run.

    python bench/convert_speed.py --blocks 8 --llmc-python .bench/llmc-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import write_qwen_image  # noqa: E402

NAIVE = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
for shard in sorted(src.glob("*.safetensors")):
    tensors = load_file(shard)
    result = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and w.dim() == 2 and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0:
            s = w.abs().amax().float() / 448
            result[name] = (w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            result[name + "_scale"] = s
        else:
            result[name] = w
    save_file(result, out / shard.name)
"""

LLMC = r"""
import sys
from llmcompressor import model_free_ptq
model_free_ptq(sys.argv[1], sys.argv[2], scheme="FP8_DYNAMIC", ignore=["re:.*norm.*"], max_workers=int(sys.argv[3]))
"""


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command under ``/usr/bin/time``: wall seconds, peak RSS (bytes) and exit status.

    GNU time forks the command from its own small process, so the peak RSS is the command's
    alone (a child forked straight from this process would inherit this process's peak).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        seconds = time.perf_counter() - start
        peak_kib = int(report.read().strip().splitlines()[-1])
    return {"seconds": seconds, "peak_rss": peak_kib * 1024, "returncode": proc.returncode,
            "stderr_tail": proc.stderr.decode(errors="replace")[-2000:]}


def warm(folder: Path) -> None:
    """Read every file once so each tool starts with the source in the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/convert"))
    parser.add_argument("--llmc-python", default=".bench/llmc-venv/bin/python",
                        help="Python of a venv with llmcompressor installed (skipped if missing)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    src = args.workdir / f"qwen-image-{args.blocks}blocks-bf16"
    t0 = time.perf_counter()
    write_qwen_image(src, blocks=args.blocks)
    source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"source: {src} ({source_bytes / 1e9:.2f} GB, {len(list(src.glob('*.safetensors')))} shards; "
          f"ready in {time.perf_counter() - t0:.0f} s)", flush=True)

    omni = [sys.executable, "-m", "omni_fp8.converter.cli", "convert", str(src), "{out}",
            "--preset", "none", "--quiet", "--max-shard-size", "2GB"]
    runs = {
        "omni-fp8": omni,
        "omni-fp8 cached": omni,
        "llm-compressor": [args.llmc_python, "-c", LLMC, str(src), "{out}", "1"],
        "llm-compressor x2": [args.llmc_python, "-c", LLMC, str(src), "{out}", "2"],
        "naive load/save": [sys.executable, "-c", NAIVE, str(src), "{out}"],
    }
    if not Path(args.llmc_python).is_file():
        print(f"llm-compressor skipped: no {args.llmc_python}", flush=True)
        del runs["llm-compressor"], runs["llm-compressor x2"]
    if args.skip_naive:
        del runs["naive load/save"]

    results = {}
    structure_cache = args.workdir / "structure-cache"  # empty for "omni-fp8", filled by it for "cached"
    shutil.rmtree(structure_cache, ignore_errors=True)
    for name, cmd in runs.items():
        out = args.workdir / ("out-" + name.replace(" ", "-").replace("/", "-"))
        shutil.rmtree(out, ignore_errors=True)
        os.sync()  # no write-back of the previous run competes with this one
        warm(src)
        env = {**os.environ, "TQDM_DISABLE": "1", "OMNI_FP8_CACHE": str(structure_cache)}
        r = run_measured([c.replace("{out}", str(out)) for c in cmd], env=env)
        r["output_bytes"] = folder_bytes(out) if out.exists() else 0
        results[name] = r
        status = "ok" if r["returncode"] == 0 else f"FAILED ({r['returncode']}): {r['stderr_tail'][-300:]}"
        print(f"{name}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, {status}", flush=True)
        shutil.rmtree(out, ignore_errors=True)

    shutil.rmtree(structure_cache, ignore_errors=True)
    base = results["omni-fp8"]
    print()
    print(f"{'tool':<18} {'seconds':>8} {'GB/s':>6} {'peak RSS':>10} {'output':>9} {'time vs omni-fp8':>17}")
    for name, r in results.items():
        print(f"{name:<18} {r['seconds']:>8.1f} {source_bytes / r['seconds'] / 1e9:>6.2f} "
              f"{r['peak_rss'] / 2**20:>7.0f} MiB {r['output_bytes'] / 1e9:>6.2f} GB "
              f"{r['seconds'] / base['seconds']:>16.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"source_bytes": source_bytes, "blocks": args.blocks, "results": results}, indent=2))


if __name__ == "__main__":
    main()
