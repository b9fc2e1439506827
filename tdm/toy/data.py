"""The embedded toy dataset: scikit-learn's `load_digits` (1,797 8x8 images, 10 classes), shipped
inside the scikit-learn package, so nothing is downloaded. Captions are "a handwritten digit <d>".
"""
from __future__ import annotations

import numpy as np
import torch

CAPTIONS = [f"a handwritten digit {d}" for d in range(10)]


def caption_label(prompt: str) -> int | None:
    """The digit a prompt asks for, or None if it is not one of the toy captions."""
    try:
        return CAPTIONS.index(prompt.strip())
    except ValueError:
        return None


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as images (N, 1, 8, 8) in [-1, 1] (raw 0..16 scaled) and labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


def split_indices(labels: torch.Tensor, holdout_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split into (teacher_train, holdout) indices; the holdout trains the evaluation classifier."""
    g = torch.Generator().manual_seed(seed)
    train, hold = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_hold = int(round(len(idx) * holdout_fraction))
        hold.append(idx[:n_hold])
        train.append(idx[n_hold:])
    return torch.cat(train).sort().values, torch.cat(hold).sort().values
