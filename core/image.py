"""Image input: anything Pillow reads (RGBA, grey, CMYK, palette, 16-bit, huge) -> RGB uint8 (H, W, 3).

Memory is bounded before anything is decoded: the size comes from the file's header, a JPEG larger than needed is
decoded reduced (libjpeg scales by 1/2, 1/4 or 1/8 while decoding), and any other image of more than MAX_PIXELS is
refused. Everything else happens on the downscaled picture.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from .errors import InputError
from .remembered import Remembered, file_key

MAX_SIDE = 2048  # larger portraits are downscaled: the face never needs more, and memory stays bounded
# At most this many pixels are decoded. Pillow holds every mode in at most 4 bytes a pixel (16-bit grey in 2), so a
# decoded image is at most 160 MB and loading one peaks well under 1 GB (bench/image_memory.py). A 40 MP photo is
# 7700 x 5200; bigger baseline JPEGs are decoded reduced, so camera photos of any size are read.
MAX_PIXELS = 40_000_000
_JPEG_MAGIC = b"\xff\xd8\xff"
# EXIF orientation -> the transpose that shows the picture upright (what ImageOps.exif_transpose does)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
_UNREADABLE = (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError, EOFError)


def load_image(source: "str | np.ndarray | Image.Image", max_side: int = MAX_SIDE) -> np.ndarray:
    """Return the portrait as contiguous RGB uint8, EXIF-rotated, at most ``max_side`` pixels on its longer side.

    Raises InputError for a missing, unreadable or too large file (the size is checked before decoding).

    A file's pixels are remembered (the last few, while the file is unchanged): one click decodes the same upload
    for the idle animation and for the engine, on the path to the first frame, after the upload was decoded to find
    the face. The caller gets its own copy.
    """
    file = file_key(source)
    key = None if file is None else (file, max_side)
    cached = None if key is None else _decoded.get(key)
    if cached is not None:
        return cached.copy()
    rgb = _decode_image(source, max_side)
    if key is not None and rgb.nbytes <= REMEMBERED_IMAGE_BYTES:
        _decoded.put(key, rgb.copy(), rgb.nbytes)
    return rgb


REMEMBERED_IMAGE_BYTES = 16 << 20  # a larger photo (over ~5 megapixels) is decoded each time instead
_decoded = Remembered(items=4, max_bytes=4 * REMEMBERED_IMAGE_BYTES)  # the last few photos' pixels


def _decode_image(source: "str | np.ndarray | Image.Image", max_side: int) -> np.ndarray:
    if isinstance(source, np.ndarray):
        image, orientation = Image.fromarray(_as_uint8(source)), None
    elif isinstance(source, Image.Image):
        image, orientation = source, _orientation(source)
    else:
        image = _open(source)
        orientation = _orientation(image)
        try:
            _reduce_while_decoding(image, max_side)
            _check_size(image)
            image.load()
        except InputError:
            raise
        except _UNREADABLE as exc:
            raise _unreadable(exc) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError("The image is empty. Upload a portrait photo.")
    if image.mode in ("P", "PA", "1"):  # palette and 1-bit pictures are resized as colour, not nearest-neighbour
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else
                              "L" if image.mode == "1" else "RGB")
    scale = max_side / max(width, height)
    if scale < 1.0:  # downscale first: the conversions below then work on at most max_side x max_side pixels
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    if orientation in _ORIENTATION:
        image = image.transpose(_ORIENTATION[orientation])
    image = _to_rgb(image)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _open(path: str) -> Image.Image:
    """The image with only its header read (Pillow decodes lazily)."""
    if not path or not os.path.isfile(path):
        raise InputError(f"Image file {path!r} was not found. Upload a portrait photo (jpg or png).")
    try:
        with open(path, "rb") as file:
            magic = file.read(3)
        if magic == _JPEG_MAGIC:
            # Not Image.open: its decompression-bomb check refuses a big JPEG that we can decode reduced.
            return JpegImagePlugin.JpegImageFile(path)
        with warnings.catch_warnings():  # our own size check follows, with a message that says what to do
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as exc:  # far over our limit too: say how big it is
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(None, pixels=int(pixels.group(1)) if pixels else None) from None
    except _UNREADABLE as exc:
        raise _unreadable(exc) from None


def _reduce_while_decoding(image: Image.Image, max_side: int) -> None:
    """A baseline JPEG bigger than needed is decoded at 1/2, 1/4 or 1/8 of its size (still at least max_side)."""
    width, height = image.size
    if image.format != "JPEG" or max(width, height) <= max_side:
        return
    if image.info.get("progressive") and width * height > MAX_PIXELS:
        # libjpeg holds a progressive JPEG's coefficients at full size whatever the output size: not bounded
        raise _too_large(image.size, "progressive JPEG")
    scale = max_side / max(width, height)
    image.draft(None, (max(1, int(width * scale)), max(1, int(height * scale))))


def _check_size(image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _too_large((width, height))


def _too_large(size: tuple[int, int] | None, kind: str = "image", pixels: int | None = None) -> InputError:
    limit = f"{MAX_PIXELS / 1e6:g} megapixels"
    if size:
        what = f"The {kind} is {size[0]}x{size[1]} pixels ({size[0] * size[1] / 1e6:.0f} megapixels)"
    else:
        what = f"The {kind} has {pixels / 1e6:.0f} megapixels" if pixels else f"The {kind} is far larger than {limit}"
    return InputError(f"{what}; images up to {limit} are read (baseline JPEG photos of any size). "
                      f"Save it smaller, e.g. at most {MAX_SIDE} pixels on its longer side, or as a JPEG.")


def _unreadable(exc: BaseException) -> InputError:
    return InputError(f"Could not read the image ({exc.__class__.__name__}). "
                      "Upload a photo in a common format such as jpg or png.")


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: show the picture as stored
        return None


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
