"""One rank of a context-parallel ``Omni`` run, launched by ``torchrun`` from the parallel tests.

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel_worker.py RESULT.npz CASES.json [--cpu]

Each case is ``{"folder", "omni": Omni kwargs, "params": sampling params, "prompt"}``; rank 0
writes every case's image (uint8 array) and its skipped-step count to ``RESULT.npz``. With
``--cpu`` the ranks run on the CPU over Gloo: diffusers places rank r on accelerator
``r % device_count``, and a CPU-only torch counts no accelerator, so the count is set to 1 here
(the CPU is the one "device" every rank shares), which is all it takes for CI to run the
parallel code path without GPUs.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist


def main() -> None:
    out, cases_path = sys.argv[1], sys.argv[2]
    cpu = "--cpu" in sys.argv[3:]
    if cpu:
        torch.accelerator.device_count = lambda: 1
        dist.init_process_group("gloo")
    else:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    from omni_fp8 import Omni, OmniDiffusionSamplingParams

    results = {}
    for index, case in enumerate(json.loads(open(cases_path).read())):
        omni = Omni(case["folder"], progress=False, **case["omni"])
        output = omni.generate(case["prompt"], OmniDiffusionSamplingParams(**case["params"]))[0]
        results[f"image{index}"] = np.asarray(output.images[0])
        skipped = output.timings.steps_skipped
        results[f"skipped{index}"] = np.array(-1 if skipped is None else skipped)
        results[f"step_s{index}"] = np.array(output.timings.step_s)
    if dist.get_rank() == 0:
        np.savez(out, **results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
