"""Decoding and preprocessing shared by training, the cache and prediction.

``load_image`` turns any JPEG/PNG a user has (grey, RGBA, 16-bit, CMYK, EXIF-rotated, huge) into
RGB, or raises :class:`ImageError` with a one-line reason. ``preprocess`` crops the fundus circle,
pads it to a square, resizes it, and optionally applies Ben Graham's local-colour normalisation.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A 5,000 x 4,000 camera image is 20 MP; 80 MP leaves room for any real fundus camera while
# refusing decompression bombs (a 30,000 x 30,000 header would need 2.7 GB to decode).
MAX_PIXELS = 80_000_000
MAX_BYTES = 100 * 1024 * 1024


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file and the reason."""


def _name(src) -> str:
    return getattr(src, "name", None) or (str(src) if isinstance(src, (str, os.PathLike)) else "upload")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on black (a fundus background is black)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size else 0.0
        a = a * (255.0 / hi) if hi > 255 else a  # 16-bit: scale the range actually used to 8 bits
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src, *, target: int | None = None) -> Image.Image:
    """Open an image file, path or bytes as RGB, honouring EXIF orientation.

    Args:
        src: a path, bytes, or a binary file object (e.g. a Streamlit upload).
        target: the working size; large JPEGs are decoded at reduced scale (draft mode) when the
            result still covers ``target`` pixels on the short side.

    Raises:
        ImageError: not an image, empty, truncated, animated beyond frame 0 is fine, or too large.
    """
    name = _name(src)
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    elif hasattr(src, "read"):
        data = src.read()
    else:
        path = Path(src)
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ImageError(f"{name}: cannot be read ({e.strerror})") from None
        if size > MAX_BYTES:
            raise ImageError(f"{name}: {size / 1e6:.0f} MB is larger than the {MAX_BYTES // 2**20} MB limit")
        data = path.read_bytes()
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes); expected a JPEG or PNG image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{name}: {w} x {h} pixels ({w * h / 1e6:.0f} MP) is larger than the "
                                 f"{MAX_PIXELS / 1e6:.0f} MP limit for a fundus photograph")
            if target and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
                img.draft("RGB", (target, target))  # decode at 1/2, 1/4 or 1/8 scale when that still fits
            img.load()
            img = ImageOps.exif_transpose(img)  # before the crop: the photographer's "up" is ours
            return _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Retino can read; expected a JPEG or PNG") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found[1]) / 1e6:.0f} MP" if found else "its size"
        raise ImageError(f"{name}: {size} is larger than the {MAX_PIXELS / 1e6:.0f} MP limit for a fundus "
                         f"photograph (refused as a possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in reason.lower():
            reason = "the file is truncated (incomplete download or copy?)"
        raise ImageError(f"{name}: cannot be decoded: {reason}") from None


def fundus_bbox(rgb: np.ndarray, threshold: int = 12) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of the fundus: the pixels brighter than the border.

    Rows/columns count as fundus when more than 2% of them is bright, which ignores sensor noise,
    text overlays and thin light leaks; the circle need not be centred or whole.
    """
    bright = rgb.max(axis=2) > threshold  # (H, W)
    h, w = bright.shape
    rows = np.flatnonzero(bright.sum(1) > 0.02 * w)
    cols = np.flatnonzero(bright.sum(0) > 0.02 * h)
    if rows.size == 0 or cols.size == 0:
        return 0, h, 0, w  # all dark: keep the whole image rather than fail
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_to_square(rgb: np.ndarray) -> np.ndarray:
    """Crop to the fundus and pad with black to a square centred on it."""
    return pad_to_square(rgb, fundus_bbox(rgb))


def pad_to_square(array: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``array[top:bottom, left:right]`` padded with zeros to a square centred on it (any channels).

    The one crop-and-pad: an image, or a lesion mask or heat map carried through the image's box.
    """
    top, bottom, left, right = box
    crop = array[top:bottom, left:right]
    h, w = crop.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, *array.shape[2:]), dtype=array.dtype)
    y0, x0 = (side - h) // 2, (side - w) // 2
    out[y0:y0 + h, x0:x0 + w] = crop
    return out


def ben_graham(rgb: np.ndarray) -> np.ndarray:
    """Ben Graham's normalisation (Kaggle DR 2015 winner): subtract the local average colour.

    ``4*img - 4*GaussianBlur(img, sigma=radius/30) + 128``, masked outside 0.9 x radius.
    Expects a square crop whose fundus radius is about half its side.
    """
    size = rgb.shape[0]
    radius = size / 2
    blur = cv2.GaussianBlur(rgb, (0, 0), sigmaX=radius / 30)
    out = cv2.addWeighted(rgb, 4, blur, -4, 128)
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (size // 2, size // 2), int(radius * 0.9), 1, -1, lineType=cv2.LINE_AA)
    out[mask == 0] = 128
    return out


def preprocess(img, size: int, *, ben_graham_norm: bool = False) -> np.ndarray:
    """Crop to the fundus, pad to square, resize to ``size``: uint8 (size, size, 3)."""
    rgb = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.uint8)
    square = crop_to_square(rgb)
    interp = cv2.INTER_AREA if square.shape[0] > size else cv2.INTER_LINEAR
    out = cv2.resize(square, (size, size), interpolation=interp)
    return ben_graham(out) if ben_graham_norm else out


def load_and_preprocess(src, size: int, *, ben_graham_norm: bool = False) -> np.ndarray:
    """``load_image`` (with draft decoding for ``size``) then ``preprocess``."""
    return preprocess(load_image(src, target=size), size, ben_graham_norm=ben_graham_norm)
