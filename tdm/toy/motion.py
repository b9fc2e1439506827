"""The embedded toy video data: scikit-learn's `load_digits` (shipped inside the package, nothing is
downloaded), each 8x8 digit sliding two pixels per frame in one of four directions across a 16x16 canvas
over 5 frames along the canvas's centre line (TRACK). Captions are "a handwritten digit <d> moving
<direction>" (40).

Every training video runs on the same track. With random starting places the tiny teacher (2 blocks,
64 wide) learned to denoise but not to read its caption: place is a mode no caption names, and after
1,600 steps the wrong caption cost it 0.0006 more loss at sigma 0.5, against 0.056 on one track
(README, "the toy video teacher"). Two pixels a frame is half a patch, so the motion is visible to it.
The evaluation classifier still trains on random places, so it judges digits and motion wherever a
student draws them.

Videos are (C, F, H, W) = (1, 5, 16, 16) in [-1, 1] (background -1), the Wan layout of the toy video
teacher (tdm.toy.video_teacher).
"""
from __future__ import annotations

import torch

from .data import load_digits_tensors

DIRECTIONS = ("left", "right", "up", "down")
FRAMES, CANVAS, DIGIT = 5, 16, 8
FPS = 4.0
STEP = 2                            # pixels per frame: half a patch of the toy transformer, so motion shows
TRAVEL = STEP * (FRAMES - 1)        # pixels travelled along the direction
SLACK = CANVAS - DIGIT              # free pixels across the canvas
#: (along, across) start of the training track: the travel centred on the canvas
TRACK = ((SLACK - TRAVEL) // 2, SLACK // 2)
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
    """(top, left) of the digit in each frame: STEP pixels per frame in `direction`, starting `along` pixels
    into its range of travel (0..SLACK-TRAVEL) and `across` pixels across it (0..SLACK)."""
    name = DIRECTIONS[direction]
    path = [along + STEP * f for f in range(FRAMES)]
    if name in ("left", "up"):
        path = [along + TRAVEL - STEP * f for f in range(FRAMES)]
    if name in ("left", "right"):
        return [(across, p) for p in path]
    return [(p, across) for p in path]


def random_placements(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) random (along, across) starting places."""
    along = torch.randint(0, SLACK - TRAVEL + 1, (n,), generator=generator)
    across = torch.randint(0, SLACK + 1, (n,), generator=generator)
    return torch.stack([along, across], 1)


def render(digits: torch.Tensor, directions: torch.Tensor, places: torch.Tensor | None = None) -> torch.Tensor:
    """Videos (N, 1, F, 16, 16) in [-1, 1] of digits (N, 1, 8, 8) in [-1, 1] moving in `directions` (N,)
    from `places` (N, 2) (None: the TRACK)."""
    if places is None:
        places = torch.tensor([TRACK] * len(digits))
    out = torch.full((len(digits), 1, FRAMES, CANVAS, CANVAS), -1.0)
    for i, (img, d, (a, c)) in enumerate(zip(digits, directions.tolist(), places.tolist())):
        for f, (top, left) in enumerate(offsets(d, a, c)):
            out[i, :, f, top:top + DIGIT, left:left + DIGIT] = img
    return out


class MovingDigits:
    """Digits of `indices` (into load_digits) in all four directions."""

    def __init__(self, indices: torch.Tensor):
        x, y = load_digits_tensors()
        n = len(indices)
        self.images = x[indices].repeat(len(DIRECTIONS), 1, 1, 1)
        self.digits = y[indices].repeat(len(DIRECTIONS))
        self.directions = torch.arange(len(DIRECTIONS)).repeat_interleave(n)

    def __len__(self) -> int:
        return len(self.digits)

    def videos(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Videos of `rows` on the TRACK, or each from a random place drawn with `generator`."""
        places = None if generator is None else random_placements(len(rows), generator)
        return render(self.images[rows], self.directions[rows], places)


def moving_digits(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every digit of `indices` in all four directions on the TRACK: videos (4N, 1, F, 16, 16), digit
    labels (4N,) and direction labels (4N,)."""
    data = MovingDigits(indices)
    rows = torch.arange(len(data))
    return data.videos(rows), data.digits, data.directions


def caption_index(digits: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Row of VIDEO_CAPTIONS for (digit, direction) pairs (N,)."""
    return digits * len(DIRECTIONS) + directions
