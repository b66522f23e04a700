"""The lab's pieces: Fashion-MNIST, the lab DiT's tokens and sampler, the lab CNN and the metrics.

The lab DiT is a real diffusers ``QwenImageTransformer2DModel`` (4 blocks, 4 heads x 32) trained
with rectified flow on 32x32 Fashion-MNIST in pixel space: a 4x4 pixel patch is one 16-channel
token (8x8 = 64 tokens), and four learned tokens per class stand in for the text. The lab CNN is
a small Fashion-MNIST classifier whose features serve as the perceptual network (an LPIPS-style
distance) and as the FID/KID feature space.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
DIT_DIR = FIXTURES / "lab-dit"
CLASS_TOKENS = FIXTURES / "class_tokens.safetensors"
CNN_WEIGHTS = FIXTURES / "lab-cnn.safetensors"
DATA_DIR = HERE.parents[1] / ".lab-data"

IMAGE, PATCH = 32, 4
GRID = IMAGE // PATCH  # 8x8 tokens
TEXT_TOKENS, TEXT_DIM = 4, 64
DIT_CONFIG = {
    "patch_size": 2, "in_channels": PATCH * PATCH, "out_channels": 4, "num_layers": 4,
    "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": TEXT_DIM,
    "axes_dims_rope": (8, 12, 12),
}
CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def dit_config(blocks: int, heads: int = 4) -> dict:
    """The lab DiT's config with ``blocks`` blocks of ``heads`` x 32 channels (width ``32 * heads``):
    heads stay 32 wide, the size the RoPE axes (8 + 12 + 12) are laid out for."""
    return {**DIT_CONFIG, "num_layers": blocks, "num_attention_heads": heads}


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float [N, 1, 32, 32] in [-1, 1] (28x28 padded with background) and labels [N].

    Fetched once from Debian's ``dataset-fashion-mnist`` package into ``.lab-data/``.
    """
    folder = DATA_DIR / "usr/share/datasets/fashion-mnist"
    if not folder.is_dir():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(DATA_DIR)], check=True)
            shutil.copy(deb, DATA_DIR / deb.name)
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = torch.frombuffer(bytearray(f.read()[16:]), dtype=torch.uint8).view(-1, 1, 28, 28)
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = torch.frombuffer(bytearray(f.read()[8:]), dtype=torch.uint8).long()
    x = images.float() / 127.5 - 1
    return F.pad(x, (2, 2, 2, 2), value=-1.0), labels


def to_tokens(images: torch.Tensor) -> torch.Tensor:
    """[B, 1, 32, 32] -> [B, 64, 16]: one token per 4x4 patch."""
    b = images.shape[0]
    return images.reshape(b, GRID, PATCH, GRID, PATCH).permute(0, 1, 3, 2, 4).reshape(b, GRID * GRID, PATCH * PATCH)


def from_tokens(tokens: torch.Tensor) -> torch.Tensor:
    b = tokens.shape[0]
    return tokens.reshape(b, GRID, GRID, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(b, 1, IMAGE, IMAGE)


class ClassTokens(nn.Module):
    """Four learned tokens per class: the lab's stand-in for a text encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(len(CLASSES), TEXT_TOKENS, TEXT_DIM) * 0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table[labels]


def velocity(transformer: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The transformer called as QwenImagePipeline calls it: tokens, text tokens, t in [0, 1]."""
    b = x.shape[0]
    return transformer(
        hidden_states=x, encoder_hidden_states=text,
        encoder_hidden_states_mask=torch.ones(b, text.shape[1], dtype=torch.bool, device=x.device),
        timestep=t, img_shapes=[[(1, GRID, GRID)]] * b, return_dict=False,
    )[0]


@torch.no_grad()
def sample(transformer: nn.Module, text: torch.Tensor, seeds: list[int], *, steps: int = 20,
           dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> torch.Tensor:
    """Euler sampling of the rectified flow from t=1 (noise) to 0; images [N, 1, 32, 32] on the CPU.

    Each seed draws its own noise (on the CPU, so a GPU run starts from the same noise), so any
    subset of samples is reproducible.
    """
    noise = torch.stack([torch.randn(GRID * GRID, PATCH * PATCH, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = noise.to(device=device, dtype=dtype)
    text = text.to(device=device, dtype=dtype)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = torch.full((x.shape[0],), float(ts[i]), dtype=dtype, device=device)
        v = velocity(transformer, x, t, text).to(torch.float32)
        x = (x.to(torch.float32) + float(ts[i + 1] - ts[i]) * v).to(dtype)
    return from_tokens(x.to(device="cpu", dtype=torch.float32)).clamp(-1, 1)


class LabCNN(nn.Module):
    """A small Fashion-MNIST classifier (90% test accuracy); its features are the lab's eyes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, len(CLASSES))

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of both convolutions and the 128-d embedding, for 32x32 inputs."""
        x = images[:, :, 2:30, 2:30].to(torch.float32)
        f1 = F.relu(self.conv1(x))
        f2 = F.relu(self.conv2(F.max_pool2d(f1, 2)))
        emb = F.relu(self.fc1(F.max_pool2d(f2, 2).flatten(1)))
        return [f1, f2, emb]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(images)[-1])


def load_cnn() -> LabCNN:
    from safetensors.torch import load_file

    cnn = LabCNN()
    cnn.load_state_dict(load_file(CNN_WEIGHTS))
    return cnn.eval()


def load_class_tokens(path: Path = CLASS_TOKENS) -> ClassTokens:
    from safetensors.torch import load_file

    tokens = ClassTokens()
    tokens.load_state_dict(load_file(path))
    return tokens.eval()


# ---- metrics: every one compares a set of images against the BF16 model's, pair by pair ----

def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR in dB over pairs, for images in [-1, 1] (peak-to-peak 2)."""
    mse = (images - reference).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float | None:
    """Mean SSIM (torchmetrics, the optional ``lab`` extra); None where it is not installed."""
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure
    except ImportError:
        return None
    return float(structural_similarity_index_measure((images + 1) / 2, (reference + 1) / 2, data_range=1.0))


@torch.no_grad()
def perceptual(cnn: LabCNN, images: torch.Tensor, reference: torch.Tensor) -> float:
    """LPIPS-style distance: channel-normalised lab-CNN feature maps, squared differences
    averaged over space, summed over the two convolutions, averaged over pairs."""
    total = torch.zeros(images.shape[0])
    for a, b in zip(cnn.features(images)[:2], cnn.features(reference)[:2]):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total += (a - b).pow(2).sum(1).mean((1, 2))
    return float(total.mean())


@torch.no_grad()
def embeddings(cnn: LabCNN, images: torch.Tensor) -> torch.Tensor:
    return cnn.features(images)[-1].to(torch.float64)


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between two sets of lab-CNN embeddings [N, 128]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm(cov_a)
    cross = _sqrtm(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a + cov_b - 2 * cross))


def kid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kernel inception distance (unbiased MMD^2, cubic polynomial kernel) on lab-CNN embeddings.

    The two sets are paired (same seeds), so the cross term leaves out each pair as the within-set
    terms leave out the diagonal; identical sets give exactly 0.
    """
    d, n = a.shape[1], a.shape[0]

    def off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
        return (k.sum() - k.trace()) / (n * (n - 1))

    def kernel(x, y):
        return (x @ y.T / d + 1) ** 3

    return float(off_diagonal_mean(kernel(a, a)) + off_diagonal_mean(kernel(b, b)) - 2 * off_diagonal_mean(kernel(a, b)))


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


@torch.no_grad()
def class_accuracy(cnn: LabCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """How often the lab CNN sees the asked class in a model's samples: does the model draw at all?"""
    return float((cnn(images).argmax(1) == labels).float().mean())


def seeds_and_labels(n: int) -> tuple[list[int], torch.Tensor]:
    """The fixed evaluation set: n (seed, class) pairs, classes in turn."""
    return list(range(1000, 1000 + n)), torch.arange(n) % len(CLASSES)
