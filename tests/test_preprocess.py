"""Preprocessing: crop to the fundus wherever it sits, square, resize, Ben Graham; safe decoding."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from retino.data import ImageError, ben_graham, crop_to_square, load_image, preprocess


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
