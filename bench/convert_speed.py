"""Conversion speed and peak memory: omni-convert against llm-compressor and a naive script.

Writes a real-width Qwen-Image checkpoint with few blocks (8 blocks = 5.5 GB BF16 in 2 GB shards),
then converts it, each tool in its own process with the source warm in the page cache (with
``--cold``: evicted from it, and warm too, each tool both ways):

* omni-fp8      ``omni-convert convert SRC OUT --preset none`` (every aligned Linear, per-tensor),
                first with an empty model-structure cache (``OMNI_FP8_CACHE``: the model is built
                with diffusers, as on a first conversion), then again with the structure cached
* llm-compressor ``model_free_ptq(SRC, OUT, scheme="FP8_DYNAMIC", ignore=["re:.*norm.*"])`` with
                 its default ``max_workers=1`` and with 2 ("x2"), run with the Python of a separate
                 venv (``--llmc-python``; it is not a dependency)
* naive         ``load_file`` a shard, quantize with the one-liner, ``save_file`` it

and prints wall time, GB/s of source and peak RSS (``ru_maxrss`` of the child) with ratios
against omni-fp8. Timings vary run to run on shared machines; compare ratios within one run, and
use ``--repeat`` for min / median / max.

``--cold`` evicts the source from the page cache before each cold run (``posix_fadvise(DONTNEED)``
after ``sync``; no root needed) and checks with ``mincore`` that nothing of it stayed resident. It
also measures the disk itself first, reading a source shard and writing a scratch file with
``O_DIRECT`` (no page cache either way), so the cold rates can be read against what the disk
gives. omni-fp8's streaming rate is its source bytes over its time minus its start-up (imports
and the plan), measured as ``omni-convert inspect`` of the same source.

Peak RSS counts the pages of the source a process has mapped and touched (omni-fp8 maps one
tensor at a time), not the page cache it does not map.

    python bench/convert_speed.py --blocks 8 --llmc-python .bench/llmc-venv/bin/python
    python bench/convert_speed.py --blocks 8 --cold --repeat 3 --skip-naive
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
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
    """Run a command under ``/usr/bin/time``: wall seconds, peak RSS (bytes), CPU seconds and exit status.

    GNU time forks the command from its own small process, so the peak RSS is the command's
    alone (a child forked straight from this process would inherit this process's peak).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", report.name, *cmd],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        seconds = time.perf_counter() - start
        peak_kib, user, system = report.read().strip().splitlines()[-1].split()
    return {"seconds": seconds, "peak_rss": int(peak_kib) * 1024, "cpu_seconds": float(user) + float(system),
            "returncode": proc.returncode, "stderr_tail": proc.stderr.decode(errors="replace")[-2000:]}


def warm(folder: Path) -> int:
    """Read every file once so each tool starts with the source in the page cache; return its size."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return total


def evict(folder: Path) -> int:
    """Drop ``folder``'s files from the page cache; return the bytes still resident (mapped elsewhere)."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return sum(resident_bytes(p) for p in folder.rglob("*") if p.is_file())


def resident_bytes(path: Path) -> int:
    """How much of a file is in the page cache (the converter's own ``mincore`` check; Linux)."""
    from omni_fp8.converter.readahead import resident_fraction

    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        return round(resident_fraction(fd, 0, size) * size)
    finally:
        os.close(fd)


def disk_bandwidth(read_path: Path, scratch: Path, write_bytes: int = 2 << 30) -> tuple[float, float]:
    """GB/s reading ``read_path`` and writing ``write_bytes`` to ``scratch``, both with ``O_DIRECT``.

    Neither goes through the page cache, so this is the device (and whatever the host caches
    below a VM's disk), not memory. The scratch file is fsynced, then deleted.
    """
    block = 16 << 20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(block))
    fd = os.open(read_path, os.O_RDONLY | os.O_DIRECT)
    try:
        start, got = time.perf_counter(), 0
        while n := os.readv(fd, [buf]):
            got += n
        read_rate = got / (time.perf_counter() - start) / 1e9
    finally:
        os.close(fd)
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(write_bytes // block):
            os.write(fd, buf)
        os.fsync(fd)
        write_rate = write_bytes / (time.perf_counter() - start) / 1e9
    finally:
        os.close(fd)
        scratch.unlink()
    return read_rate, write_rate


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/convert"))
    parser.add_argument("--llmc-python", default=".bench/llmc-venv/bin/python",
                        help="Python of a venv with llmcompressor installed (skipped if missing)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--cold", action="store_true",
                        help="run every tool with the source evicted from the page cache, and warm; measure the disk")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and regime (min / median / max)")
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

    regimes = ("warm", "cold") if args.cold else ("warm",)
    if args.cold:
        shard = max(src.glob("*.safetensors"), key=lambda p: p.stat().st_size)
        read_rate, write_rate = disk_bandwidth(shard, args.workdir / "out-disk-test")
        print(f"disk (O_DIRECT): read {read_rate:.2f} GB/s ({shard.name}), write {write_rate:.2f} GB/s (2 GiB)",
              flush=True)
    # omni-fp8's fixed start-up (imports, the model on the meta device, the plan), to tell it from streaming.
    startup_cmd = [sys.executable, "-m", "omni_fp8.converter.cli", "inspect", str(src), "--preset", "none", "--json"]

    results: dict[str, dict[str, list[dict]]] = {}
    startup: dict[str, list[float]] = {}
    structure_cache = args.workdir / "structure-cache"  # emptied for "omni-fp8", filled by it for "cached"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMNI_FP8_CACHE": str(structure_cache)}
    for rep in range(args.repeat):
        for regime in regimes:
            os.sync()
            resident = evict(src) if regime == "cold" else warm(src)
            shutil.rmtree(structure_cache, ignore_errors=True)
            startup.setdefault(regime, []).append(run_measured(startup_cmd, env=env)["seconds"])
            for name, cmd in runs.items():
                out = args.workdir / ("out-" + name.replace(" ", "-").replace("/", "-"))
                shutil.rmtree(out, ignore_errors=True)
                if name == "omni-fp8":
                    shutil.rmtree(structure_cache, ignore_errors=True)  # the first conversion of this config
                os.sync()  # no write-back of the previous run competes with this one
                resident = evict(src) if regime == "cold" else warm(src)
                r = run_measured([c.replace("{out}", str(out)) for c in cmd], env=env)
                r["output_bytes"] = folder_bytes(out) if out.exists() else 0
                r["resident_before"] = resident
                results.setdefault(name, {}).setdefault(regime, []).append(r)
                status = "ok" if r["returncode"] == 0 else f"FAILED ({r['returncode']}): {r['stderr_tail'][-300:]}"
                note = f", {resident / 2**20:.0f} MiB of the source still cached" if regime == "cold" else ""
                print(f"[{rep + 1}/{args.repeat} {regime}] {name}: {r['seconds']:.1f} s "
                      f"({r['cpu_seconds']:.1f} s CPU), peak RSS {r['peak_rss'] / 2**20:.0f} MiB, {status}{note}", flush=True)
                shutil.rmtree(out, ignore_errors=True)

    shutil.rmtree(structure_cache, ignore_errors=True)
    print()
    print(f"{'tool':<18} {'cache':<5} {'seconds min/med/max':>20} {'GB/s':>5} {'streaming':>9} {'peak RSS':>9} "
          f"{'output':>8} {'time vs omni-fp8':>16}")
    for regime in regimes:
        base = statistics.median(r["seconds"] for r in results["omni-fp8"][regime])
        fixed = statistics.median(startup[regime])
        for name, per_regime in results.items():
            rs = per_regime[regime]
            secs = sorted(r["seconds"] for r in rs)
            med = statistics.median(secs)
            stream = f"{source_bytes / (med - fixed) / 1e9:>9.2f}" if name == "omni-fp8" else f"{'':>9}"
            print(f"{name:<18} {regime:<5} {secs[0]:>6.1f} {med:>6.1f} {secs[-1]:>6.1f} "
                  f"{source_bytes / med / 1e9:>5.2f} {stream} {max(r['peak_rss'] for r in rs) / 2**20:>5.0f} MiB "
                  f"{rs[0]['output_bytes'] / 1e9:>5.2f} GB {med / base:>15.2f}x")
        print(f"{'(omni start-up)':<18} {regime:<5} {min(startup[regime]):>6.1f} {fixed:>6.1f} "
              f"{max(startup[regime]):>6.1f}   (omni-convert inspect: imports and plan, no tensor read)")
    if args.json:
        args.json.write_text(json.dumps({"source_bytes": source_bytes, "blocks": args.blocks, "startup": startup,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
