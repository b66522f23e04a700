"""Train the lab's fixtures on Fashion-MNIST: the lab DiT and the lab CNN (CPU is enough).

    python bench/quality_lab/train.py cnn                 # ~2 min on 2 cores, 90% test accuracy
    python bench/quality_lab/train.py dit --steps 2500    # ~12 min on 2 cores (records inputs too)
    python bench/quality_lab/train.py inputs              # only re-record the sample inputs

Writes bench/quality_lab/fixtures/: ``lab-cnn.safetensors``, ``lab-dit/`` (a diffusers folder,
BF16), ``class_tokens.safetensors`` and ``lab-dit/sample_inputs.safetensors`` (recorded
transformer inputs of a few sampling runs, for ``omni-convert suggest``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quality_lab import lab  # noqa: E402


def train_cnn(epochs: int, seed: int) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    x, y = lab.fashion_mnist("train")
    xt, yt = lab.fashion_mnist("test")
    cnn = lab.LabCNN()
    opt = torch.optim.AdamW(cnn.parameters(), lr=2e-3)
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 256):
            idx = perm[i : i + 256]
            loss = F.cross_entropy(cnn(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (cnn(xt).argmax(1) == yt).float().mean()
        print(f"cnn epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.3f}", flush=True)
    lab.FIXTURES.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, lab.CNN_WEIGHTS)


def train_dit(steps: int, batch: int, seed: int) -> None:
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    x, y = lab.fashion_mnist("train")
    model = QwenImageTransformer2DModel(**lab.DIT_CONFIG)
    tokens = lab.ClassTokens()
    params = list(model.parameters()) + list(tokens.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,))
        data = lab.to_tokens(x[idx])
        noise = torch.randn_like(data)
        t = torch.sigmoid(torch.randn(batch))  # logit-normal timesteps, as rectified-flow DiTs train
        xt = (1 - t)[:, None, None] * data + t[:, None, None] * noise
        v = lab.velocity(model, xt, t, tokens(y[idx]))
        loss = F.mse_loss(v, noise - data)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            print(f"dit step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    lab.FIXTURES.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(lab.DIT_DIR, safe_serialization=True)
    save_file({"table": tokens.table.detach().contiguous()}, lab.CLASS_TOKENS)
    record_sample_inputs()


def record_sample_inputs() -> None:
    """Recorded transformer inputs of a sampling run (16 images, every other of 10 steps): what
    ``omni-convert suggest`` replays for the lab model."""
    from omni_fp8 import load_transformer, record_inputs, save_inputs

    model = load_transformer(lab.DIT_DIR, progress=False)
    seeds, labels = lab.seeds_and_labels(16)
    with record_inputs(model) as calls:
        lab.sample(model, lab.load_class_tokens()(labels).detach(), seeds, steps=10)
    save_inputs(lab.DIT_DIR / "sample_inputs.safetensors", calls[::2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["cnn", "dit", "inputs"])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.what == "cnn":
        train_cnn(a.epochs, a.seed)
    elif a.what == "dit":
        train_dit(a.steps, a.batch, a.seed)
    else:
        record_sample_inputs()


if __name__ == "__main__":
    main()
