"""Decoding and preprocessing shared by training, the cache and prediction.

``load_image`` turns any JPEG/PNG a user has (grey, RGBA, 16-bit, CMYK, EXIF-rotated, huge) into
RGB, or raises :class:`ImageError` with a one-line reason; it reads only regular files, at most
``MAX_BYTES`` of them, and refuses strips from the header. ``preprocess`` crops the fundus circle,
resizes it, pads it to a square, and optionally applies Ben Graham's local-colour normalisation
masked to ``MASK_FRACTION`` of the fundus radius and away from clipped edges (``boundary_mask``).
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A 5,000 x 4,000 camera image is 20 MP; 80 MP leaves room for any real fundus camera while
# refusing decompression bombs (a 30,000 x 30,000 header would need 2.7 GB to decode).
MAX_PIXELS = 80_000_000
MAX_BYTES = 100 * 1024 * 1024
# A fundus photograph is 1:1 (APTOS, Messidor) to 1.5:1 (EyePACS 3888 x 2592); 4:1 leaves room for any
# camera and refuses strips (a 663-byte 200000 x 1 PNG needed 112 GiB to pad to a square; issue 15).
MAX_ASPECT = 4
# Ben Graham's Kaggle 2015 solution keeps 90% of the fundus radius after his normalisation: the
# blur (sigma = radius / 30) makes a halo ~3 sigma = radius / 10 wide at every edge of the fundus.
MASK_FRACTION = 0.9


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file once, then the reason.

    ``ImageError(path, reason)`` reads ``"<path>: <reason>"``; ``path`` and ``reason`` are kept as
    attributes so that a caller adding its own words (``"<path>: rejected: <reason>"``) names the
    file once. ``ImageError(message)`` alone has ``path`` None and ``reason`` the whole message.
    """

    def __init__(self, path_or_message: str, reason: str | None = None):
        self.path = None if reason is None else str(path_or_message)
        self.reason = str(path_or_message) if reason is None else reason
        super().__init__(self.reason if reason is None else f"{self.path}: {reason}")

    def __reduce__(self):  # survives a worker process's pickling with both parts
        return type(self), ((self.reason,) if self.path is None else (self.path, self.reason))


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: "a regular file", "a named pipe", "a folder", ..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((word for test, word in _KINDS if test(mode)), "not a regular file")


def _too_large(name: str, size: str = "the file") -> ImageError:
    return ImageError(name, f"{size} is larger than the {MAX_BYTES // 2**20} MB limit")


def read_regular_file(path, name: str | None = None) -> bytes:
    """A regular file's bytes, at most ``MAX_BYTES``; anything else is refused before it is read.

    A FIFO would block ``open()`` forever and ``/dev/zero`` never ends while reporting size 0
    (issue 15), so the kind is checked with ``os.stat`` first, the file is opened with O_NONBLOCK
    (in case it was swapped for a FIFO since), and the bytes actually read are capped.
    """
    name = str(path) if name is None else name
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(name, f"is {file_kind(st.st_mode)}, not a regular file")
        if st.st_size > MAX_BYTES:
            raise _too_large(name, f"{st.st_size / 1e6:.0f} MB")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ImageError(name, f"is {file_kind(mode)}, not a regular file")
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ImageError(name, f"cannot be read ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_BYTES:  # it grew since the stat
        raise _too_large(name)
    return data


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


def exif_upright(img: Image.Image, name: str) -> tuple[Image.Image, list[str]]:
    """``ImageOps.exif_transpose``, or the image unrotated with a warning naming ``name`` when its
    EXIF cannot be read (issue 15: a flipped byte raised struct.error or TypeError)."""
    try:
        return ImageOps.exif_transpose(img), []
    except Exception:  # noqa: BLE001 - Pillow raises struct.error, TypeError, ValueError, ... for bad EXIF
        return img, [f"{name}: EXIF orientation unreadable; shown unrotated"]


def load_image(src, *, target: int | None = None) -> Image.Image:
    """Open an image file, path or bytes as RGB, honouring EXIF orientation.

    EXIF that cannot be read leaves the photo unrotated, with a line in ``img.info["warnings"]``
    (always a list; empty when all went well) for the caller to show beside the result.

    Args:
        src: a path, bytes, or a binary file object (e.g. a Streamlit upload).
        target: the working size; large JPEGs are decoded at reduced scale (draft mode) when the
            result still covers ``target`` pixels on the short side.

    Raises:
        ImageError: not a regular file, not an image, empty, truncated, too large, or a strip
            (sides beyond ``MAX_ASPECT``:1); animated images give frame 0.
    """
    name = _name(src)
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    elif hasattr(src, "read"):
        data = src.read(MAX_BYTES + 1)
    else:
        data = read_regular_file(src, name)
    if len(data) > MAX_BYTES:
        raise _too_large(name)
    if not data:
        raise ImageError(name, "the file is empty (0 bytes); expected a JPEG or PNG image")
    if data[128:132] == b"DICM":  # a clinic camera's DICOM file (retino.data.dicom), whatever its name
        from .dicom import DicomError, read_dicom
        try:
            frame = read_dicom(data, max_pixels=MAX_PIXELS, max_aspect=MAX_ASPECT)
        except DicomError as e:
            raise ImageError(name, str(e)) from None
        if not isinstance(frame, bytes):
            rgb = _to_rgb(Image.fromarray(frame))
            rgb.info["warnings"] = []
            return rgb
        data = frame  # a JPEG-baseline frame: decoded below exactly as the same .jpeg file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(name, f"{w} x {h} pixels ({w * h / 1e6:.0f} MP) is larger than the "
                                       f"{MAX_PIXELS / 1e6:.0f} MP limit for a fundus photograph")
            if max(w, h) > MAX_ASPECT * min(w, h):  # from the header: a strip is never decoded
                raise ImageError(name, f"{w} x {h} pixels is not a fundus photograph: its sides differ by "
                                       f"more than {MAX_ASPECT}:1")
            if target and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
                img.draft("RGB", (target, target))  # decode at 1/2, 1/4 or 1/8 scale when that still fits
            img.load()
            img, notes = exif_upright(img, name)  # before the crop: the photographer's "up" is ours
            rgb = _to_rgb(img)
            rgb.info["warnings"] = notes
            return rgb
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(name, "not an image Retino can read; expected a JPEG or PNG") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found[1]) / 1e6:.0f} MP" if found else "its size"
        raise ImageError(name, f"{size} is larger than the {MAX_PIXELS / 1e6:.0f} MP limit for a fundus "
                               f"photograph (refused as a possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in reason.lower():
            reason = "the file is truncated (incomplete download or copy?)"
        raise ImageError(name, f"cannot be decoded: {reason}") from None


def fundus_bbox(rgb: np.ndarray, threshold: int = 12) -> tuple[int, int, int, int]:
    """Bounding box (top, bottom, left, right) of the fundus: the pixels brighter than the border.

    Rows/columns count as fundus when more than 2% of them is bright, which ignores sensor noise,
    text overlays and thin light leaks; the circle need not be centred or whole.
    """
    # per-channel maximum: numpy's max(axis=2) over a 3-long axis is 30x slower (40 ms at 1 MP, bench/screen.py)
    bright = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) > threshold  # (H, W)
    h, w = bright.shape
    rows = np.flatnonzero(bright.sum(1) > 0.02 * w)
    cols = np.flatnonzero(bright.sum(0) > 0.02 * h)
    if rows.size == 0 or cols.size == 0:
        return 0, h, 0, w  # all dark: keep the whole image rather than fail
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _placement(h: int, w: int, size: int | None) -> tuple[int, int, int, int, int]:
    """(side, new h, new w, y0, x0): a crop of h x w scaled so its long side is ``size`` (or kept), centred."""
    side = max(h, w) if size is None else size
    if size is not None:
        h, w = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
    return side, h, w, (side - h) // 2, (side - w) // 2


def crop_and_pad(array: np.ndarray, bbox, size: int | None = None, *, interpolation: int | None = None) -> np.ndarray:
    """Crop an (H, W) or (H, W, C) array to ``bbox`` (top, bottom, left, right), pad with zeros to a
    square centred on the crop; with ``size``, resize the crop first so the square is (size, size).

    Resizing before padding never allocates the full-resolution square. ``interpolation`` defaults
    to area when shrinking, linear when enlarging; pass ``cv2.INTER_NEAREST`` for label masks.
    """
    top, bottom, left, right = (int(v) for v in bbox)
    crop = array[top:bottom, left:right]
    h, w = crop.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"crop box {bbox} is empty in an array of shape {array.shape}")
    side, nh, nw, y0, x0 = _placement(h, w, size)
    if size is None and side * side > MAX_PIXELS:
        raise ImageError(f"a {w} x {h} fundus crop would pad to a {side} x {side} square, larger than the "
                         f"{MAX_PIXELS / 1e6:.0f} MP limit")
    if size is not None:
        if interpolation is None:
            interpolation = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR
        crop = cv2.resize(np.ascontiguousarray(crop), (nw, nh), interpolation=interpolation)
        crop = crop.reshape((nh, nw) + array.shape[2:])  # cv2 drops a trailing channel axis of 1
    out = np.zeros((side, side) + array.shape[2:], dtype=array.dtype)
    out[y0:y0 + nh, x0:x0 + nw] = crop
    return out


def crop_to_square(rgb: np.ndarray) -> np.ndarray:
    """Crop to the fundus and pad with black to a square centred on it (at full resolution).

    Raises:
        ImageError: the square would exceed ``MAX_PIXELS`` (a strip); ``preprocess`` never builds it.
    """
    return crop_and_pad(rgb, fundus_bbox(rgb))


def boundary_mask(size: int, box=None) -> np.ndarray:
    """Where a model input keeps the fundus after Ben Graham's normalisation: (size, size) bool.

    True inside ``MASK_FRACTION`` x the fundus radius (half the side) and, when ``box`` (top,
    bottom, left, right: the fundus's extent in the square) is given, at least the remaining
    (1 - MASK_FRACTION) x radius inside its edges. The second rule hides a clipped edge: EyePACS
    circles are cut off at the top and bottom, and the blur turns such an edge into a bright bar
    (issue 11). Mask a heat map with the same array so it cannot point at what the model never saw.
    """
    r = size / 2
    c = np.arange(size) + 0.5  # pixel centres
    keep = (c[:, None] - r) ** 2 + (c[None, :] - r) ** 2 <= (MASK_FRACTION * r) ** 2
    if box is not None:
        margin = (1 - MASK_FRACTION) * r
        top, bottom, left, right = box
        rows = (c >= top + margin) & (c <= bottom - margin)
        cols = (c >= left + margin) & (c <= right - margin)
        keep &= rows[:, None] & cols[None, :]
    return keep


def ben_graham(rgb: np.ndarray, box=None) -> np.ndarray:
    """Ben Graham's normalisation (Kaggle DR 2015 winner): subtract the local average colour.

    ``4*img - 4*GaussianBlur(img, sigma=radius/30) + 128``, flat grey outside ``boundary_mask``.
    Expects a square crop whose fundus radius is about half its side; ``box`` is the fundus's
    extent in it (found with ``fundus_bbox`` when not given).
    """
    size = rgb.shape[0]
    box = fundus_bbox(rgb) if box is None else box
    blur = cv2.GaussianBlur(rgb, (0, 0), sigmaX=size / 2 / 30)
    out = cv2.addWeighted(rgb, 4, blur, -4, 128)
    out[~boundary_mask(size, box)] = 128
    return out


def preprocess(img, size: int, *, ben_graham_norm: bool = False, return_mask: bool = False):
    """Crop to the fundus, resize, pad to a square: uint8 (size, size, 3).

    With ``return_mask`` also the (size, size) bool ``boundary_mask`` of this image (the same with
    or without Ben Graham), for masking a heat map of it.
    """
    rgb = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.uint8)
    top, bottom, left, right = fundus_bbox(rgb)
    out = crop_and_pad(rgb, (top, bottom, left, right), size)
    _, h, w, y0, x0 = _placement(bottom - top, right - left, size)
    box = (y0, y0 + h, x0, x0 + w)  # the fundus's extent in the square
    if ben_graham_norm:
        out = ben_graham(out, box)
    return (out, boundary_mask(size, box)) if return_mask else out


def load_and_preprocess(src, size: int, *, ben_graham_norm: bool = False) -> np.ndarray:
    """``load_image`` (with draft decoding for ``size``) then ``preprocess``."""
    return preprocess(load_image(src, target=size), size, ben_graham_norm=ben_graham_norm)
