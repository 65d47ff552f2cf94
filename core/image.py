"""Image input: anything Pillow reads (RGBA, grey, CMYK, palette, 16-bit, huge) -> RGB uint8 (H, W, 3)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

MAX_SIDE = 2048  # larger portraits are downscaled: the face never needs more, and memory stays bounded
Image.MAX_IMAGE_PIXELS = 200_000_000  # refuse decompression bombs, allow big camera photos


def load_image(source: "str | np.ndarray | Image.Image", max_side: int = MAX_SIDE) -> np.ndarray:
    """Return the portrait as contiguous RGB uint8, EXIF-rotated, at most ``max_side`` pixels on its longer side."""
    if isinstance(source, np.ndarray):
        image = Image.fromarray(_as_uint8(source))
    elif isinstance(source, Image.Image):
        image = source
    else:
        if not source or not os.path.isfile(source):
            raise InputError(f"Image file {source!r} was not found. Upload a portrait photo (jpg or png).")
        try:
            image = Image.open(source)
            image.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
            raise InputError(f"Could not read the image ({exc.__class__.__name__}). "
                             "Upload a photo in a common format such as jpg or png.") from None
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError("The image is empty. Upload a portrait photo.")
    scale = max_side / max(width, height)
    if scale < 1.0:
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas become white (what a user sees in a viewer), not black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        return Image.fromarray((array / peak * 255.0).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 1.0)
        span = hi - lo if hi > lo else 1.0
        return Image.fromarray(((array - lo) / span * 255.0).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(f"Expected an image array of shape (H, W, 3), got {array.shape}.")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        array = array[:, :, :3]
    if array.dtype != np.uint8:
        array = np.clip(array * (255.0 if array.dtype.kind == "f" and array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return array
