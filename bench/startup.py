"""Start-up cost of the command line: fresh processes, against ``import torch`` alone.

On a tiny checkpoint the work is a few milliseconds, so what a user waits for is imports: torch,
and whatever the command pulls in to build the model on the meta device. Each command runs
``--runs`` times in a fresh process, round-robin so that noise spreads over all of them:

* ``import torch``             the baseline every command pays
* ``omni-convert --help``
* ``inspect OUT``              a converted folder: manifest only
* ``verify OUT``               re-hash a converted folder
* ``inspect SRC``              the plan for a source: needs the model's structure
* ``convert, first time``      a new model config: the structure is built with diffusers (an empty
                               ``OMNI_FP8_CACHE`` folder for every run)
* ``convert``                  the same config converted before: its structure comes from the cache

    flock /tmp/omni-bench.lock python bench/startup.py --runs 10

The source is a tiny random Qwen-Image transformer (2 blocks, width 64, BF16, four shards) made
with ``omni_fp8.converter.demo``; the conversion is ``--preset none --quiet``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "omni_fp8.converter.cli"]


def make_source(folder: Path) -> Path:
    from omni_fp8.converter.demo import save_checkpoint, tiny_qwen_image

    return save_checkpoint(tiny_qwen_image(seed=1), folder / "qwen-image-tiny")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="fresh processes per command")
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="omni-startup-") as tmp:
        tmp = Path(tmp)
        src, out, cache = make_source(tmp), tmp / "out", tmp / "cache"
        base_env = {**os.environ, "TQDM_DISABLE": "1"}
        warm_env = {**base_env, "OMNI_FP8_CACHE": str(cache)}
        convert = [*CLI, "convert", str(src), str(out), "--preset", "none", "--quiet"]
        timed(convert, warm_env)  # the folder inspect and verify read (each round ends by writing it again)

        def fresh_out() -> None:
            shutil.rmtree(out, ignore_errors=True)

        def cold_env() -> dict[str, str]:
            folder = tempfile.mkdtemp(dir=tmp, prefix="cold-cache-")
            return {**base_env, "OMNI_FP8_CACHE": folder}

        commands = {
            "import torch": (lambda: [sys.executable, "-c", "import torch"], lambda: base_env, None),
            "omni-convert --help": (lambda: [*CLI, "--help"], lambda: base_env, None),
            "inspect OUT (converted)": (lambda: [*CLI, "inspect", str(out)], lambda: warm_env, None),
            "verify OUT": (lambda: [*CLI, "verify", str(out), "--quiet"], lambda: warm_env, None),
            "inspect SRC (plan)": (lambda: [*CLI, "inspect", str(src)], lambda: warm_env, None),
            "convert, first time": (lambda: convert, cold_env, fresh_out),
            "convert": (lambda: convert, lambda: warm_env, fresh_out),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for i in range(args.runs):
            for name, (cmd, env, before) in commands.items():
                if before:
                    before()
                times[name].append(timed(cmd(), env()))
            print(f"run {i + 1}/{args.runs} done", file=sys.stderr, flush=True)

    base = statistics.median(times["import torch"])
    print(f"{'command':<26} {'min':>6} {'median':>7} {'max':>6} {'median - import torch':>22}")
    for name, ts in times.items():
        med = statistics.median(ts)
        delta = "" if name == "import torch" else f"{med - base:+.2f} s"
        print(f"{name:<26} {min(ts):>6.2f} {med:>7.2f} {max(ts):>6.2f} {delta:>22}")
    if args.json:
        args.json.write_text(json.dumps({"runs": args.runs, "seconds": times}, indent=2) + "\n")


if __name__ == "__main__":
    main()
