"""A small digit classifier trained by ldmkit on the embedded MNIST digits, used to check that generated
digits show the class they were conditioned on (the demo's main metric and the conditioning probe's judge)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitClassifier(nn.Module):
    """Three conv blocks and two linear layers; input [B, 1, 32, 32] in [-1, 1]."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, 16), block(16, 32), block(32, 64))  # -> [B, 64, 4, 4]
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (background -1), a cheap augmentation."""
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    H, W = x.shape[-2:]
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + H, dx : dx + W] for i, (dy, dx) in enumerate(offsets.tolist())])


def train_classifier(
    images, labels, epochs: int = 20, batch: int = 64, seed: int = 0, lr: float = 2e-3
) -> DigitClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier(int(labels.max()) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(labels) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for lo in range(0, len(labels), batch):
            idx = perm[lo : lo + batch]
            loss = F.cross_entropy(model(random_shift(images[idx], gen)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[lo : lo + batch].float().cpu()).argmax(1) for lo in range(0, len(images), batch)])


def accuracy(model, images, labels) -> float:
    return (predict(model, images) == labels.cpu()).float().mean().item()


def load_or_train_classifier(data_cfg, path: str | Path, epochs: int = 20) -> tuple[DigitClassifier, float]:
    """The classifier saved at path, or one trained on the training split and saved there.
    Returns (model, held-out accuracy)."""
    from ..data.datasets import build_dataset

    path = Path(path)
    test = build_dataset(data_cfg, "held_out")
    if path.is_file():
        from ..checkpoint import load_file

        state = load_file(path)
        model = DigitClassifier()
        model.load_state_dict(state)
    else:
        train = build_dataset(data_cfg, "train")
        model = train_classifier(train.images, train.labels, epochs=epochs)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model, accuracy(model, test.images, test.labels)
