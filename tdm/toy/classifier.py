"""Digit classifier for evaluation: its penultimate features define the FID space and its
predictions measure prompt adherence. Trained on the digits held out from the toy teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_digits_tensors, split_indices


class DigitClassifier(nn.Module):
    """Small CNN on (B, 1, 8, 8) images in [-1, 1]; `features` gives (B, 128) post-ReLU activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _random_shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel (pad by 1 with background, random 8x8 crop)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2, x.shape[0]), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(x.shape[0])])


def train_classifier(holdout_fraction: float, seed: int, epochs: int = 60) -> tuple[DigitClassifier, dict]:
    """Train on the held-out digits; report accuracy on the teacher's split (images it never saw)."""
    x, y = load_digits_tensors()
    teacher_idx, hold_idx = split_indices(y, holdout_fraction, seed)
    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    xh, yh = x[hold_idx], y[hold_idx]
    for _ in range(epochs):
        perm = torch.randperm(len(xh), generator=g)
        for i in range(0, len(xh), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(_random_shift(xh[b], g)), yh[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        acc = (model(x[teacher_idx]).argmax(1) == y[teacher_idx]).float().mean().item()
    return model, {"classifier_accuracy": 100.0 * acc, "classifier_train_examples": len(hold_idx)}
