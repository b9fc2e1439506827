"""Image encodings: PNG (JPEG, WebP) bytes for the model contract and the API, tiled grids for MLflow."""
from __future__ import annotations

import io

import torch

#: the image formats `encode_images` writes (the OpenAI Images API's output_format values)
IMAGE_FORMATS = ("png", "jpeg", "webp")


def encode_images(images: torch.Tensor, fmt: str = "png", compression: int | None = None) -> list[bytes]:
    """Encodings of images (B, C, H, W) in [0, 1] as `fmt` (IMAGE_FORMATS); 1-channel images stay
    grayscale. `compression` (0-100, jpeg/webp only) is the API's output_compression: quality 100 - it
    (default quality 90); PNG is lossless and ignores it."""
    from PIL import Image

    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"fmt: one of {', '.join(IMAGE_FORMATS)}, got {fmt!r}")
    options = {} if fmt == "png" else {"quality": 90 if compression is None else 100 - compression}
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format=fmt.upper(), **options)
        out.append(buf.getvalue())
    return out


def to_png_bytes(images: torch.Tensor) -> list[bytes]:
    """PNG encodings of images (B, C, H, W) in [0, 1]; 1-channel images become grayscale PNGs."""
    return encode_images(images, "png")


def image_grid(images: torch.Tensor, nrow: int, scale: int = 1, pad: int = 1):
    """A PIL image tiling (B, C, H, W) images in [0, 1], nrow per row, upscaled `scale` x (nearest)."""
    from PIL import Image

    x = images.clamp(0, 1).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    B, C, H, W = x.shape
    ncol = -(-B // nrow)
    grid = torch.ones(C, ncol * (H + pad) + pad, nrow * (W + pad) + pad)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = x[i]
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)
