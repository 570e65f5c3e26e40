"""Preprocessing: crop to the fundus wherever it sits, square, resize, Ben Graham; safe decoding."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from retino.data import (MASK_FRACTION, ImageError, ben_graham, boundary_mask, crop_and_pad, crop_to_square,
                         fundus_bbox, load_image, preprocess)


def off_centre_fundus(w=400, h=300, cx=150, cy=160, r=110, clip_top=False):
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (cx, cy), r, (180, 90, 40), -1)
    cv2.circle(img, (cx + 30, cy - 20), 8, (250, 230, 150), -1)  # a feature to track
    if clip_top:
        img[: cy - r + 30] = 0
    return img


def test_crop_finds_an_off_centre_circle():
    img = off_centre_fundus()
    sq = crop_to_square(img)
    assert abs(sq.shape[0] - 221) <= 2 and sq.shape[0] == sq.shape[1]
    # the circle now fills the square: its centre is the square's centre
    ys, xs = np.nonzero(sq.max(2) > 12)
    assert abs(ys.mean() - sq.shape[0] / 2) < 2 and abs(xs.mean() - sq.shape[1] / 2) < 2


def test_clipped_circle_is_padded_to_square_centred():
    sq = crop_to_square(off_centre_fundus(clip_top=True))
    assert sq.shape[0] == sq.shape[1]
    assert sq[:5].max() == 0  # the clipped part became black padding above
    ys, xs = np.nonzero(sq.max(2) > 12)
    assert abs(xs.mean() - sq.shape[1] / 2) < 2


def test_preprocess_size_and_ben_graham():
    out = preprocess(off_centre_fundus(), 128)
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    bg = ben_graham(out)
    assert bg[0, 0].tolist() == [128, 128, 128]  # outside 0.9 x radius is flat grey
    centre = bg[40:88, 40:88].astype(float)
    assert abs(centre.mean() - 128) < 20  # the local average colour is gone


# ----------------------------------------------------------------------------- Ben Graham's boundary (issue 11)

def clipped_fundus(seed: int, grade: int = 0, side: int = 300, cut: int = 45) -> np.ndarray:
    """A synthetic fundus photographed as EyePACS does: its circle clipped at the top and bottom."""
    from retino.data.synthetic import render_fundus
    rgb, _ = render_fundus(grade, size=side, seed=seed)
    rgb = rgb.copy()
    rgb[:cut], rgb[-cut:] = 0, 0
    return rgb


@pytest.mark.parametrize("seed, grade", [(1, 0), (2, 4), (3, 2)])
def test_ben_graham_boundary_mask_clipped_fundus_has_no_bright_bar(seed, grade):
    size = 128
    rgb = clipped_fundus(seed, grade)
    top, bottom, _, _ = fundus_bbox(preprocess(rgb, size))      # the clipped edges in the model input
    assert top > 5 and bottom < size - 5
    out = preprocess(rgb, size, ben_graham_norm=True).astype(float)
    cols = slice(size // 4, 3 * size // 4)                      # where the clipped edge is a straight chord
    margin = int((1 - MASK_FRACTION) * size / 2)  # whole rows whose centre is nearer the edge
    for edge_rows in (slice(top, top + margin + 4), slice(bottom - margin - 4, bottom)):
        band = out[edge_rows, cols].mean(axis=(1, 2))
        assert np.abs(band - 128).max() < 12, band.round()      # before the mask: ~210 at the edge
    assert np.all(out[:top + margin] == 128) and np.all(out[bottom - margin:] == 128)
    # the retina itself is kept: the centre still varies (vessels, lesions)
    assert out[size // 2 - 10:size // 2 + 10, cols].std() > 3


def test_ben_graham_without_the_box_estimates_the_clipped_edges():
    square = preprocess(clipped_fundus(1), 128)
    top, bottom, _, _ = fundus_bbox(square)
    margin = int((1 - MASK_FRACTION) * 64)
    assert np.all(ben_graham(square)[:top + margin] == 128)
    assert np.array_equal(ben_graham(square), preprocess(clipped_fundus(1), 128, ben_graham_norm=True))


def test_boundary_mask_circle_and_clipped_edges():
    m = boundary_mask(64)
    assert m.shape == (64, 64) and m.dtype == bool
    assert m[32, 32] and not m[0, 0] and not m[32, 1] and m[32, 6]
    assert abs(m.mean() - np.pi * (MASK_FRACTION * 32) ** 2 / 64 ** 2) < 0.02
    clipped = boundary_mask(64, box=(12, 52, 0, 64))            # a fundus clipped top and bottom
    margin = int((1 - MASK_FRACTION) * 32)
    assert not clipped[:12 + margin].any() and not clipped[52 - margin:].any()
    assert np.array_equal(clipped[20:44], m[20:44])


def test_preprocess_returns_the_mask_it_applied():
    rgb = clipped_fundus(2)
    out, mask = preprocess(rgb, 96, ben_graham_norm=True, return_mask=True)
    assert mask.shape == (96, 96) and np.all(out[~mask] == 128)
    plain, mask2 = preprocess(rgb, 96, return_mask=True)        # the mask is the same without Ben Graham
    assert np.array_equal(mask, mask2) and plain[mask].max() > 0


@pytest.mark.parametrize("shape", [(30, 50), (30, 50, 3), (50, 30, 1)])
def test_crop_and_pad_any_array(shape):
    arr = np.arange(np.prod(shape), dtype=np.int32).reshape(shape) % 251 + 1
    box = (5, 25, 2, 22) if shape[0] == 30 else (2, 42, 5, 25)
    out = crop_and_pad(arr, box)
    h, w = box[1] - box[0], box[3] - box[2]
    side = max(h, w)
    assert out.shape == (side, side) + shape[2:] and out.dtype == arr.dtype
    assert (out != 0).any(axis=tuple(range(1, out.ndim))).sum() == h   # rows holding the crop
    assert out.sum() == arr[box[0]:box[1], box[2]:box[3]].sum()
    small = crop_and_pad(arr, box, size=16, interpolation=cv2.INTER_NEAREST)
    assert small.shape == (16, 16) + shape[2:]


def test_crop_and_pad_matches_crop_to_square():
    img = off_centre_fundus(clip_top=True)
    assert np.array_equal(crop_and_pad(img, fundus_bbox(img)), crop_to_square(img))


def png_header(width: int, height: int) -> bytes:
    """A real PNG header claiming ``width x height`` pixels, without the pixels."""
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _bytes(img: Image.Image, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "CMYK"])
def test_modes_become_rgb(mode):
    arr = off_centre_fundus()
    base = Image.fromarray(arr)
    if mode == "I;16":
        img = Image.fromarray((arr[..., 0].astype(np.uint16) * 257))
    elif mode == "CMYK":
        img = base.convert("CMYK")
    else:
        img = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = load_image(_bytes(img, fmt))
    assert out.mode == "RGB" and out.size == (400, 300)
    assert np.asarray(out).max() > 100


def test_rgba_transparent_is_black():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255  # red but fully transparent
    out = np.asarray(load_image(_bytes(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert out.max() == 0


def test_exif_orientation_is_honoured():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :50] = 255  # white on the left
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_image(_bytes(img, "JPEG", exif=exif))
    assert out.size == (100, 200)
    assert np.asarray(out)[:40].mean() > 200  # the white band is now on top


def test_draft_mode_decodes_large_jpegs_small():
    big = Image.fromarray(off_centre_fundus(w=2400, h=1800, cx=1200, cy=900, r=850))
    data = _bytes(big, "JPEG")
    small = load_image(data, target=256)
    assert 256 <= min(small.size) < 900  # decoded at 1/2 .. 1/8 scale, never below the target
    assert load_image(data).size == (2400, 1800)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, I am a text file", "not an image"),
])
def test_rejected_inputs(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data)


def test_truncated_jpeg_is_rejected():
    data = _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="truncated|decoded"):
        load_image(data[: len(data) // 3])


def test_decompression_bomb_header_is_rejected():
    png = png_header(30000, 30000)
    with pytest.raises(ImageError, match="900 MP is larger than the 80 MP limit"):
        load_image(png)


def test_too_many_pixels_below_pil_bomb_limit_is_rejected():
    png = png_header(10000, 9000)
    with pytest.raises(ImageError, match="90 MP is larger than the 80 MP"):
        load_image(png)


def test_too_many_pixels_below_pil_warning_is_rejected_with_dimensions():
    png = png_header(9500, 9000)
    with pytest.raises(ImageError, match="9500 x 9000"):
        load_image(png)
