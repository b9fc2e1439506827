"""The embedded toy video data: scikit-learn's `load_digits` (shipped inside the package, nothing is
downloaded), each 8x8 digit sliding one pixel per frame in one of four directions across a 12x12
canvas over 5 frames. Captions are "a handwritten digit <d> moving <direction>" (40 of them).

Videos are (C, F, H, W) = (1, 5, 12, 12) in [-1, 1] (background -1), the Wan layout of the toy video
teacher (tdm.toy.video_teacher).
"""
from __future__ import annotations

import torch

from .data import load_digits_tensors

DIRECTIONS = ("left", "right", "up", "down")
FRAMES, CANVAS, DIGIT = 5, 12, 8
FPS = 4.0
#: caption i asks for digit i // 4 moving DIRECTIONS[i % 4]
VIDEO_CAPTIONS = [f"a handwritten digit {d} moving {m}" for d in range(10) for m in DIRECTIONS]


def caption_target(prompt: str) -> tuple[int, int] | None:
    """(digit, direction index) a prompt asks for, or None if it is not one of the toy's captions."""
    try:
        i = VIDEO_CAPTIONS.index(prompt.strip())
    except ValueError:
        return None
    return i // len(DIRECTIONS), i % len(DIRECTIONS)


def offsets(direction: int) -> list[tuple[int, int]]:
    """(top, left) of the digit in each frame: a full traverse of the free 4 pixels, centred across it."""
    span = CANVAS - DIGIT                      # 4 free pixels: positions 0..4, one per frame
    mid = span // 2
    path = list(range(FRAMES))                 # 0, 1, 2, 3, 4
    name = DIRECTIONS[direction]
    if name == "left":
        return [(mid, span - p) for p in path]
    if name == "right":
        return [(mid, p) for p in path]
    if name == "up":
        return [(span - p, mid) for p in path]
    return [(p, mid) for p in path]


def render(digits: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Videos (N, 1, F, 12, 12) in [-1, 1] of digits (N, 1, 8, 8) in [-1, 1] moving in `directions` (N,)."""
    out = torch.full((len(digits), 1, FRAMES, CANVAS, CANVAS), -1.0)
    for i, (img, d) in enumerate(zip(digits, directions.tolist())):
        for f, (top, left) in enumerate(offsets(d)):
            out[i, :, f, top:top + DIGIT, left:left + DIGIT] = img
    return out


def moving_digits(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every digit of `indices` (into load_digits) in all four directions: videos (4N, 1, F, 12, 12),
    digit labels (4N,) and direction labels (4N,)."""
    x, y = load_digits_tensors()
    x, y = x[indices], y[indices]
    n = len(indices)
    dirs = torch.arange(len(DIRECTIONS)).repeat_interleave(n)
    return render(x.repeat(len(DIRECTIONS), 1, 1, 1), dirs), y.repeat(len(DIRECTIONS)), dirs


def caption_index(digits: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Row of VIDEO_CAPTIONS for (digit, direction) pairs (N,)."""
    return digits * len(DIRECTIONS) + directions
