"""The embedded toy video data: scikit-learn's `load_digits` (shipped inside the package, nothing is
downloaded), each 8x8 digit sliding one pixel per frame in one of four directions across a 16x16 canvas
over 5 frames, from a random place. Captions are "a handwritten digit <d> moving <direction>" (40).

Where a digit starts is random and carries no meaning: only the digit and its direction do. A video
transformer with relative (rotary) positions, like Wan's, cannot tell absolute positions apart, so a
caption must not depend on them.

Videos are (C, F, H, W) = (1, 5, 16, 16) in [-1, 1] (background -1), the Wan layout of the toy video
teacher (tdm.toy.video_teacher).
"""
from __future__ import annotations

import torch

from .data import load_digits_tensors

DIRECTIONS = ("left", "right", "up", "down")
FRAMES, CANVAS, DIGIT = 5, 16, 8
FPS = 4.0
TRAVEL = FRAMES - 1                 # pixels travelled along the direction
SLACK = CANVAS - DIGIT              # free pixels across the canvas
#: caption i asks for digit i // 4 moving DIRECTIONS[i % 4]
VIDEO_CAPTIONS = [f"a handwritten digit {d} moving {m}" for d in range(10) for m in DIRECTIONS]


def caption_target(prompt: str) -> tuple[int, int] | None:
    """(digit, direction index) a prompt asks for, or None if it is not one of the toy's captions."""
    try:
        i = VIDEO_CAPTIONS.index(prompt.strip())
    except ValueError:
        return None
    return i // len(DIRECTIONS), i % len(DIRECTIONS)


def offsets(direction: int, along: int, across: int) -> list[tuple[int, int]]:
    """(top, left) of the digit in each frame: one pixel per frame in `direction`, starting `along` pixels
    into its range of travel (0..SLACK-TRAVEL) and `across` pixels across it (0..SLACK)."""
    name = DIRECTIONS[direction]
    path = [along + f for f in range(FRAMES)]
    if name in ("left", "up"):
        path = [along + TRAVEL - f for f in range(FRAMES)]
    if name in ("left", "right"):
        return [(across, p) for p in path]
    return [(p, across) for p in path]


def random_placements(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) random (along, across) starting places."""
    along = torch.randint(0, SLACK - TRAVEL + 1, (n,), generator=generator)
    across = torch.randint(0, SLACK + 1, (n,), generator=generator)
    return torch.stack([along, across], 1)


def render(digits: torch.Tensor, directions: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """Videos (N, 1, F, 16, 16) in [-1, 1] of digits (N, 1, 8, 8) in [-1, 1] moving in `directions` (N,)
    from `places` (N, 2)."""
    out = torch.full((len(digits), 1, FRAMES, CANVAS, CANVAS), -1.0)
    for i, (img, d, (a, c)) in enumerate(zip(digits, directions.tolist(), places.tolist())):
        for f, (top, left) in enumerate(offsets(d, a, c)):
            out[i, :, f, top:top + DIGIT, left:left + DIGIT] = img
    return out


class MovingDigits:
    """Digits of `indices` (into load_digits) in all four directions; `sample` draws random places."""

    def __init__(self, indices: torch.Tensor):
        x, y = load_digits_tensors()
        n = len(indices)
        self.images = x[indices].repeat(len(DIRECTIONS), 1, 1, 1)
        self.digits = y[indices].repeat(len(DIRECTIONS))
        self.directions = torch.arange(len(DIRECTIONS)).repeat_interleave(n)

    def __len__(self) -> int:
        return len(self.digits)

    def videos(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Videos of `rows`, each from a random place."""
        return render(self.images[rows], self.directions[rows], random_placements(len(rows), generator))


def moving_digits(indices: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every digit of `indices` in all four directions, each from a place drawn with `seed`: videos
    (4N, 1, F, 16, 16), digit labels (4N,) and direction labels (4N,)."""
    data = MovingDigits(indices)
    rows = torch.arange(len(data))
    return data.videos(rows, torch.Generator().manual_seed(seed)), data.digits, data.directions


def caption_index(digits: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Row of VIDEO_CAPTIONS for (digit, direction) pairs (N,)."""
    return digits * len(DIRECTIONS) + directions
