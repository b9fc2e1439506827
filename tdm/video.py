"""Video encodings: H.264 MP4 bytes (PyAV, whose wheels ship FFmpeg) for the model contract and the API,
and animated GIF grids for MLflow (its artifact viewer plays them)."""
from __future__ import annotations

import io
from fractions import Fraction

import torch

from .images import image_grid


def _rgb_uint8(video: torch.Tensor):
    """(F, C, H, W) in [0, 1], C in {1, 3} -> (F, H', W', 3) uint8 numpy, H' and W' padded to even sizes
    (yuv420p needs them) by repeating the last row/column."""
    if video.ndim != 4 or video.shape[1] not in (1, 3):
        raise ValueError(f"video must be (F, 1|3, H, W), got {tuple(video.shape)}")
    x = video.detach().float().cpu().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    x = torch.nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_mp4_bytes(video: torch.Tensor, fps: float, crf: int = 18) -> bytes:
    """H.264 (yuv420p) MP4 of one video (F, C, H, W) in [0, 1] at `fps` frames per second; odd frame sizes
    gain one replicated row/column."""
    import av

    frames = _rgb_uint8(video)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def mp4_frames(data: bytes):
    """Decode MP4 bytes to (F, H, W, 3) uint8 frames (numpy) and the stream's frame rate."""
    import av
    import numpy as np

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        rate = float(stream.average_rate or stream.base_rate or 0)
    return np.stack(frames), rate


def grid_video(videos: torch.Tensor, nrow: int, scale: int = 1) -> torch.Tensor:
    """One video (F, 3, H', W') in [0, 1] tiling videos (N, F, C, H, W), nrow per row (as images.image_grid)."""
    import numpy as np

    frames = [np.asarray(image_grid(videos[:, f], nrow=nrow, scale=scale)) for f in range(videos.shape[1])]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


def to_gif_bytes(video: torch.Tensor, fps: float) -> bytes:
    """A looping animated GIF of one video (F, C, H, W) in [0, 1]."""
    from PIL import Image

    frames = [Image.fromarray(a) for a in _rgb_uint8(video)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=max(20, int(round(1000 / fps))))
    return buf.getvalue()
