import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

TINY = [
    "model.preset=DiT-tiny/4", "model.in_channels=1", "model.input_size=32", "model.num_classes=10",
    "train.global_batch=16", "train.total_images=128", "train.log_every_images=32", "train.checkpoint_every_images=64",
    "train.lr=0.001", "sample.steps=3", "sample.per_class=1", "eval.num_images=20", "eval.batch=20",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def tiny_config(*extra):
    from ldmkit.config import load_config

    return load_config(overrides=TINY + list(extra))


def state_of(run_dir):
    from ldmkit.train.state import latest_checkpoint, load_checkpoint

    return load_checkpoint(latest_checkpoint(run_dir))
