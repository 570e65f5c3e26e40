"""Issue 15, data layer: inputs that crashed or hung, and data sets that broke every page.

Each test is named after the issue's item and builds the hostile input itself (a corrupt-EXIF JPEG,
a 200000 x 1 PNG, a FIFO, /dev/zero, a symlink loop, a non-UTF-8 name, leaked splits, odd labels).
"""
import io
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from retino.data import (MAX_ASPECT, DatasetError, ImageError, crop_to_square, load_image, preprocess,
                         read_dataset, stats)

REPO = Path(__file__).resolve().parents[1]


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- inputs that crash

def corrupt_exif_jpeg(retag: bytes) -> bytes:
    """A small JPEG whose EXIF says "rotate 90" but whose Make tag (ASCII "Camera") was renamed to a
    numeric tag: Pillow parses it, then ``exif_transpose`` fails re-packing the string as a number."""
    exif = Image.Exif()
    exif[0x0112] = 6                       # orientation: rotate 90 CW on display
    exif[0x010F] = "Camera"                # Make, ASCII (type 2)
    raw = exif.tobytes()
    assert b"\x01\x0f\x00\x02" in raw      # big-endian entry: tag 0x010F, type 2
    arr = np.zeros((16, 24, 3), np.uint8)
    arr[:, :6] = 255                       # white on the left, to see whether it was rotated
    return _jpeg(arr, exif=raw.replace(b"\x01\x0f\x00\x02", retag + b"\x00\x02", 1))


@pytest.mark.parametrize("retag, error", [(b"\x01\x07", "struct.error"),     # Threshholding: SHORT
                                          (b"\x01\x1a", "TypeError")])       # XResolution: RATIONAL
def test_corrupt_exif_falls_back_to_no_rotation_with_a_warning(tmp_path, retag, error):
    data = corrupt_exif_jpeg(retag)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # Pillow's own "Corrupt EXIF" chatter
        with pytest.raises(Exception) as raised:  # the failure of issue 15, reproduced
            ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert error.split(".")[-1] in type(raised.value).__name__
    path = tmp_path / "corrupt exif.jpeg"
    path.write_bytes(data)
    img = load_image(str(path))            # a str path is named whole (a Path by its file name)
    assert img.size == (24, 16)            # not rotated
    assert np.asarray(img)[:, :4].mean() > 200
    assert img.info["warnings"] == [f"{path}: EXIF orientation unreadable; shown unrotated"]
    assert preprocess(img, 32).shape == (32, 32, 3)


def test_corrupt_exif_on_a_decoded_image_too():
    """``exif_upright`` is what a caller holding a PIL image (the Predict page's) uses."""
    from retino.data import exif_upright
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(corrupt_exif_jpeg(b"\x01\x07")))
        upright, notes = exif_upright(img, "eye.jpg")
    assert upright is img and notes == ["eye.jpg: EXIF orientation unreadable; shown unrotated"]


def test_a_readable_exif_gives_no_warning():
    arr = np.zeros((16, 24, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    img = load_image(_jpeg(arr, exif=exif))
    assert img.size == (16, 24) and img.info.get("warnings", []) == []


def png_strip(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 90, 40)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("width, height", [(200000, 1), (60000, 1), (1, 60000), (900, 200)])
def test_thin_strip_is_refused_before_decoding(tmp_path, width, height):
    path = tmp_path / "strip.png"
    path.write_bytes(png_strip(width, height))
    with pytest.raises(ImageError) as e:
        load_image(str(path))
    msg = str(e.value)
    assert f"{width} x {height}" in msg and f"{MAX_ASPECT}:1" in msg and str(path) in msg
    assert len(msg.splitlines()) == 1


def test_a_fundus_shaped_frame_is_not_refused():
    assert load_image(png_strip(300, 200)).size == (300, 200)   # 1.5:1, an EyePACS frame


def test_thin_strip_array_never_allocates_a_huge_square():
    strip = np.full((1, 200000, 3), 200, np.uint8)
    with pytest.raises(ImageError, match="200000 x 200000"):
        crop_to_square(strip)          # was MemoryError: 112 GiB
    out = preprocess(strip, 64)        # preprocess resizes before padding: bounded by the crop itself
    assert out.shape == (64, 64, 3) and (out.max(axis=(1, 2)) > 0).sum() == 1


# A FIFO with no writer blocks open() forever and /dev/zero never ends: each case runs in a child
# with a memory cap and a time limit so that a regression fails this test instead of hanging it.
_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
from retino.data import ImageError, load_image
try:
    load_image(sys.argv[1])
    print("LOADED")
except ImageError as e:
    print("IMAGEERROR", e)
"""


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_named_pipe_and_dev_zero_are_refused_without_reading(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "pipe.jpeg"
        os.mkfifo(path)
        expected = f"{path}: is a named pipe, not a regular file"
    else:
        path = Path("/dev/zero")
        expected = "/dev/zero: is a character device, not a regular file"
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"load_image({path}) blocked")
    assert r.stdout.strip() == f"IMAGEERROR {expected}", r.stderr[-2000:]


def test_directory_and_socket_are_refused(tmp_path):
    folder = tmp_path / "folder.jpeg"
    folder.mkdir()
    with pytest.raises(ImageError, match=r"folder\.jpeg: is a folder, not a regular file$"):
        load_image(folder)
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(ImageError, match=r"s\.png: is a socket, not a regular file$"):
            load_image(sock_path)


def test_bytes_read_are_capped_not_the_reported_size(tmp_path, monkeypatch):
    import importlib
    pre = importlib.import_module("retino.data.preprocess")  # the module, not the function of that name
    monkeypatch.setattr(pre, "MAX_BYTES", 1000)
    with pytest.raises(ImageError, match="larger than the"):
        load_image(io.BytesIO(b"\xff" * 5000))    # a file object reports no size at all
    with pytest.raises(ImageError, match="larger than the"):
        load_image(b"\xff" * 5000)
    big = tmp_path / "big.jpeg"
    big.write_bytes(b"\xff" * 5000)
    with pytest.raises(ImageError, match="5000 bytes|larger than the"):
        load_image(big)


def test_missing_image_is_named_once(tmp_path):
    path = tmp_path / "999_left.jpeg"
    with pytest.raises(ImageError) as e:
        load_image(str(path))
    assert str(e.value).count("999_left") == 1
    assert e.value.path == str(path)
    assert e.value.reason.startswith("cannot be read") and "999_left" not in e.value.reason
    assert str(e.value) == f"{e.value.path}: {e.value.reason}"


def test_every_data_layer_image_error_carries_path_and_reason(tmp_path):
    for data in (b"", b"not an image", png_strip(5000, 10)):
        path = tmp_path / "x.png"
        path.write_bytes(data)
        with pytest.raises(ImageError) as e:
            load_image(str(path))
        assert str(e.value) == f"{path}: {e.value.reason}" and str(path) not in e.value.reason


# ----------------------------------------------------------------------------- data sets that break

def _img(path: Path, value=(120, 40, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), value).save(path, "JPEG")


def grade_folders(root: Path, n_patients=6, prefix="", shade=0):
    for p in range(1, n_patients + 1):
        for eye in ("left", "right"):
            _img(root / str(p % 3) / f"{prefix}{p}_{eye}.jpeg",
                 value=(100 + 10 * p, 40 + shade, 20 if eye == "left" else 30))  # distinct bytes per image
    return root


def test_self_referencing_symlink_and_non_utf8_name_are_skipped_as_problems(tmp_path):
    grade_folders(tmp_path)
    os.symlink("self.jpeg", tmp_path / "0" / "self.jpeg")
    bad = os.fsencode(tmp_path / "0") + b"/bad\xff.jpeg"
    with open(bad, "wb") as f:
        f.write((tmp_path / "0" / "3_left.jpeg").read_bytes())
    ds = read_dataset(tmp_path)            # was OSError: Too many levels of symbolic links
    images = set().union(*(set(df["image"]) for df in ds.splits.values()))
    assert len(images) == 12 and "self" not in images
    problems = {p["file"]: p["error"] for p in ds.problems}
    assert problems[str(tmp_path / "0" / "self.jpeg")] == \
        f"{tmp_path / '0' / 'self.jpeg'}: cannot be read (Too many levels of symbolic links); skipped"
    bad_shown = str(tmp_path / "0" / "bad\\xff.jpeg")
    assert problems[bad_shown].startswith(f"{bad_shown}: the file name is not valid UTF-8")
    assert all(len(e.splitlines()) == 1 for e in problems.values())
    report = stats(ds)
    assert {p["file"] for p in report["problems"]} >= set(problems)
    json.dumps(report)                     # no surrogate escapes left to break a JSON or UTF-8 writer


def test_symlink_loop_listed_in_a_csv_is_skipped_not_fatal(tmp_path):
    for split, ps in (("train", range(1, 6)), ("test", range(6, 8))):
        rows = [f"{p}_{e},{p % 2}" for p in ps for e in ("left", "right")]
        (tmp_path / f"{split}.csv").write_text("image,level\n" + "\n".join(rows) + "\n")
        for p in ps:
            for e in ("left", "right"):
                _img(tmp_path / "images" / f"{p}_{e}.jpeg")
    (tmp_path / "images" / "3_left.jpeg").unlink()
    os.symlink("3_left.jpeg", tmp_path / "images" / "3_left.jpeg")
    ds = read_dataset(tmp_path)
    assert "3_left" not in set().union(*(set(df["image"]) for df in ds.splits.values()))
    assert [p["file"] for p in ds.problems] == [str(tmp_path / "images" / "3_left.jpeg")]
    assert "3_left.jpeg" in stats(ds)["problems"][0]["error"]


def test_stats_cli_on_a_broken_folder_is_not_a_traceback(tmp_path):
    grade_folders(tmp_path)
    os.symlink("self.jpeg", tmp_path / "1" / "self.jpeg")
    r = subprocess.run([sys.executable, "-m", "retino", "stats", str(tmp_path), "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert any("self.jpeg" in p["file"] for p in json.loads(r.stdout)["problems"])


# ----------------------------------------------------------------------------- leakage

def retino_layout(root: Path, train_ps, test_ps):
    for split, ps in (("train", train_ps), ("test", test_ps)):
        rows = [f"{p}_{e},{p % 3}" for p in ps for e in ("left", "right")]
        (root / f"{split}.csv").write_text("image,level\n" + "\n".join(rows) + "\n")
        for p in ps:
            for e in ("left", "right"):
                _img(root / "images" / f"{p}_{e}.jpeg", value=(100 + 5 * p, 40, 20 if e == "left" else 30))
    return root


def test_leakage_test_csv_copied_from_train_csv(tmp_path):
    retino_layout(tmp_path, range(1, 11), range(11, 14))
    clean = stats(read_dataset(tmp_path))
    assert clean["leakage"]["images"] == 0 and clean["leakage"]["patients"] == 0
    assert not [p for p in clean["problems"] if p.get("kind") == "leakage"]
    (tmp_path / "test.csv").write_bytes((tmp_path / "train.csv").read_bytes())
    report = stats(read_dataset(tmp_path))
    assert report["leakage"]["images"] == 20 and report["leakage"]["patients"] == 10
    leaks = [p for p in report["problems"] if p.get("kind") == "leakage"]
    assert len(leaks) == 20
    assert any(e["error"].endswith("is in both train and test") for e in leaks)
    assert all(len(e["error"].splitlines()) == 1 for e in leaks)


def test_leakage_kaggle_folders_with_the_same_images(tmp_path):
    grade_folders(tmp_path / "train")
    grade_folders(tmp_path / "test", n_patients=2, prefix="t", shade=50)  # patients t1, t2: distinct
    assert stats(read_dataset(tmp_path))["leakage"] == {"images": 0, "patients": 0, "same_bytes": 0, "between": {}}
    # the same name (another photo of patient 4's left eye) and the same bytes under another name
    _img(tmp_path / "test" / "0" / "4_left.jpeg", value=(7, 7, 7))
    (tmp_path / "test" / "1" / "copy.jpeg").write_bytes((tmp_path / "train" / "2" / "5_right.jpeg").read_bytes())
    ds = read_dataset(tmp_path)
    report = stats(ds)
    leak = report["leakage"]
    assert leak["images"] == 1 and leak["patients"] == 1 and leak["same_bytes"] == 1
    side = {img: split for split, df in ds.splits.items() if split != "test" for img in df["image"]}
    expected = {}  # 4_left and 5_right sit in train or in the carved val: count on whichever side
    for key, names in (("images", ["4_left"]), ("patients", ["4_left"]), ("same_bytes", ["5_right"])):
        cell = expected.setdefault(f"{side[names[0]]}/test", {"images": 0, "patients": 0, "same_bytes": 0})
        cell[key] += 1
    assert leak["between"] == expected
    errors = [p["error"] for p in report["problems"] if p.get("kind") == "leakage"]
    assert any("4_left" in e and "in both train and test" in e for e in errors)
    assert any("copy.jpeg" in e and "5_right.jpeg" in e and "the same bytes" in e for e in errors)


# ----------------------------------------------------------------------------- labels

@pytest.mark.parametrize("label", ["0_2", "\u0663", "\u00b2", "\uff12", "1e0", "0x2", "2 3", "+1"])
def test_labels_accept_ascii_digits_and_icdr_names_only(tmp_path, label):
    rows = [f"{p}_{e},{p % 3}" for p in range(1, 7) for e in ("left", "right")]
    rows[4] = rows[4].split(",")[0] + "," + label
    (tmp_path / "trainLabels.csv").write_text("image,level\n" + "\n".join(rows) + "\n", encoding="utf-8")
    for r in rows:
        _img(tmp_path / "train" / f"{r.split(',')[0]}.jpeg")
    with pytest.raises(DatasetError) as e:
        read_dataset(tmp_path)
    msg = str(e.value)
    assert "trainLabels.csv, line 6" in msg and repr(label) in msg and len(msg.splitlines()) == 1


@pytest.mark.parametrize("label, grade", [("2", 2), (" 3 ", 3), ("2.0", 2), ("4.", 4),
                                          ("Moderate", 2), ("PDR", 4)])
def test_ascii_and_icdr_labels_still_accepted(label, grade):
    from retino.data import parse_grade
    assert parse_grade(label, where="x") == grade
