import os
import socket
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs the suite on pytest-xdist workers, one per core: each worker and the processes it starts get an
# equal share of the cores, so that workers do not fight over them (more threads than cores slows matrix products).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // _workers))
torch.set_num_threads(THREADS)
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


def free_port() -> int:
    """A TCP port no process listens on now: the rendezvous port of a multi-process test (workers run at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(processes: int = 2) -> list[str]:
    """The start of a `torchrun --nproc_per_node N` command line on a free rendezvous port (this interpreter)."""
    port = str(free_port())
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", port]


TINY = [
    "model.preset=DiT-tiny/4",
    "model.in_channels=1",
    "model.input_size=32",
    "model.num_classes=10",
    "train.global_batch=16",
    "train.total_images=128",
    "train.log_every_images=32",
    "train.checkpoint_every_images=64",
    "train.lr=0.001",
    "sample.steps=3",
    "sample.per_class=1",
    "eval.num_images=20",
    "eval.batch=20",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def tiny_config(*extra):
    from ldmkit.config import load_config

    return load_config(overrides=TINY + list(extra))


def state_of(run_dir):
    from ldmkit.checkpoint import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))


def make_folder(root, n=4, size=40):
    """Two ImageNet-style class folders of random RGB images, plus a corrupt file, a grayscale image and a
    non-image file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("n01440764", "n01443537"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "n01440764" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(
        root / "n01443537" / "gray.png"
    )  # grayscale: converted
    (root / "n01443537" / "notes.txt").write_text("ignored")
    return root


def save_tiny_vae(path, latent_channels=4):
    """A tiny random diffusers AutoencoderKL (downsampling 2), saved with save_pretrained."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture
def tiny_vae(tmp_path):
    return save_tiny_vae(tmp_path / "vae")


def randomised(model, seed: int = 0, scale: float = 0.1):
    """Give every parameter random values (zero-initialised outputs would make parity comparisons trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model
