"""Image decoding and the one canonical crop that both the tokenizer and the teachers see.

Every way an image can be unusable raises `Rejected` with a short reason, so the extractor can
write it to `rejects.jsonl` and carry on. Odd but valid modes (CMYK, 16-bit, palette, alpha,
greyscale) are converted to 8-bit RGB instead.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Decompression bombs are rejected by our own `max_pixels` / `max_side` checks on the header, before decoding.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_SIDE = 16384


class Rejected(Exception):
    """An input record that cannot be extracted. The message is the reason stored in rejects,
    written "<category>: <detail>" so that counts can be grouped by category."""


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
               draft: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an 8-bit RGB image, or raise `Rejected`. The size the header
    declares is checked against `max_pixels` and `max_side` before any pixel is decoded. With `draft`
    a JPEG is decoded at the smallest of its 1/2, 1/4, 1/8 scales whose short side is still at least
    `draft` px: a large photo decodes several times faster, the crop made from it differs a little."""
    if not data:
        raise Rejected("empty: the file has no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise Rejected(f"oversized: {w}x{h} pixels is more than --max-pixels {max_pixels}")
            if max(w, h) > max_side:
                raise Rejected(f"oversized: {w}x{h} pixels has a side longer than --max-side {max_side}")
            if draft and img.format == "JPEG" and w and h:
                img.draft(img.mode, (math.ceil(w * draft / min(w, h)), math.ceil(h * draft / min(w, h))))
            img.load()
            w, h = img.size
    except Rejected:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own limit, when something set Image.MAX_IMAGE_PIXELS
        raise Rejected(f"oversized: {exc}") from None
    except UnidentifiedImageError:
        raise Rejected("not-an-image: no image format recognised") from None
    except Exception as exc:  # untrusted bytes: any decoder failure is a reject, not a crash
        raise Rejected(f"corrupt: {type(exc).__name__}: {exc}") from None
    if w == 0 or h == 0:
        raise Rejected("empty: the image has zero width or height")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white (as the official code)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def center_crop(img: Image.Image, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Resize the short side to `size` (bicubic), then take the centre `size`x`size` square.
    Raises `Rejected` when the resized image would exceed `max_pixels` (a 1x16384 image becomes
    256x4194304 for a 256 px crop: a file of a few bytes must not make the crop take gigabytes)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if nw * nh > max_pixels:
        raise Rejected(f"oversized: {w}x{h} pixels resized to {size} px on the short side is {nw}x{nh}, "
                       f"more than --max-pixels {max_pixels}")
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Resize an already square image to `size` (the teacher's view of the canonical crop)."""
    return img if img.size == (size, size) else img.resize((size, size), Image.BICUBIC)


def to_array(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8 array of an RGB image."""
    return np.asarray(img, dtype=np.uint8)
