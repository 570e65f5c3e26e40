"""The synthetic fundus data set: determinism, grade proportions, masks, anatomy and the layout."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from retino.data.synthetic import (ICDR_PROPORTIONS, LESION_CODES, _pair_patients, allocate_grades, make_dataset,
                                   render_fundus, render_fundus_info)

GRADE_CODES = {0: set(), 1: {1}, 2: {1, 2, 3, 4}, 3: {1, 2, 3, 4, 5}, 4: {1, 2, 3, 4, 5, 6, 7}}


def _read_csv(path: Path) -> tuple[list[str], list[tuple[str, int]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [(r[0], int(r[1])) for r in rows[1:]]


# ----------------------------------------------------------------------------- rendering

def test_render_is_deterministic_per_seed():
    a_rgb, a_mask = render_fundus(3, eye="right", size=96, seed=5)
    b_rgb, b_mask = render_fundus(3, eye="right", size=96, seed=5)
    assert a_rgb.dtype == np.uint8 and a_rgb.shape == (96, 96, 3)
    assert a_mask.dtype == np.uint8 and a_mask.shape == (96, 96)
    assert np.array_equal(a_rgb, b_rgb) and np.array_equal(a_mask, b_mask)
    c_rgb, c_mask = render_fundus(3, eye="right", size=96, seed=6)
    assert not np.array_equal(a_rgb, c_rgb)
    assert not np.array_equal(a_mask, c_mask)


@pytest.mark.parametrize("grade", range(5))
def test_mask_empty_only_for_grade_0_and_codes_fit_grade(grade):
    for seed in range(4):
        rgb, mask = render_fundus(grade, eye=("left", "right")[seed % 2], size=96, seed=seed)
        codes = set(np.unique(mask).tolist()) - {0}
        if grade == 0:
            assert not codes, f"grade 0 seed {seed} has lesions {codes}"
        else:
            assert codes, f"grade {grade} seed {seed} has an empty mask"
            assert codes <= GRADE_CODES[grade], f"grade {grade} has lesion codes {codes}"
    if grade == 4:  # proliferative: new vessels and a preretinal haemorrhage every time
        for seed in range(4):
            codes = set(np.unique(render_fundus(4, size=128, seed=seed)[1]).tolist())
            assert {LESION_CODES["neovascularisation"], LESION_CODES["preretinal_haemorrhage"]} <= codes


def test_mask_lies_inside_the_fundus_circle():
    for grade in (1, 3, 4):
        for seed in range(3):
            rgb, mask, info = render_fundus_info(grade, eye="left", size=(160, 128), seed=seed)
            ys, xs = np.nonzero(mask)
            assert len(xs)
            cx, cy = info["center"]
            r = np.hypot(xs - cx, ys - cy)
            assert r.max() <= info["radius"], (grade, seed, r.max(), info["radius"])
            # and on the picture: every lesion pixel is inside the lit field, not the black border
            lit = rgb.max(axis=2) > 8
            assert lit[ys, xs].all(), (grade, seed)
            # the black border outside the circle stays black
            yy, xx = np.mgrid[0:128, 0:160]
            outside = np.hypot(xx - cx, yy - cy) > info["radius"] + 2
            assert rgb[outside].max() <= 8


def test_grade_not_readable_from_global_brightness():
    def brightness(grade, seeds):
        return np.array([render_fundus(grade, eye="left", size=128, seed=s)[0].mean() for s in seeds])

    g0 = brightness(0, range(30))
    g4 = brightness(4, range(1000, 1030))
    assert abs(g0.mean() - g4.mean()) < min(g0.std(), g4.std()), (g0.mean(), g4.mean(), g0.std(), g4.std())
    # same seed = same eye and camera: the lesions alone move the mean far less than the camera does
    paired = brightness(4, range(30)) - g0
    assert abs(paired.mean()) < 0.25 * g0.std(), (paired.mean(), g0.std())


def test_left_and_right_eyes_are_mirrored():
    for seed in range(6):
        xs = {}
        for eye in ("left", "right"):
            rgb, _, info = render_fundus_info(0, eye=eye, size=128, seed=seed)
            grey = cv2.GaussianBlur(rgb.astype(np.float32).mean(axis=2), (0, 0), 4)
            y, x = np.unravel_index(np.argmax(grey), grey.shape)
            xs[eye] = x
            # the brightest blob is the optic disc
            assert np.hypot(x - info["disc"][0], y - info["disc"][1]) < 2.5 * info["disc_radius"]
        assert xs["right"] > 64 > xs["left"], (seed, xs)


def test_non_square_camera_frame_has_black_sides():
    rgb, mask, info = render_fundus_info(2, eye="right", size=(300, 200), seed=1)
    assert rgb.shape == (200, 300, 3) and mask.shape == (200, 300)
    assert rgb[:, :30].max() <= 8 and rgb[:, -30:].max() <= 8
    assert abs(info["center"][0] - 150) < 0.05 * 200


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError):
        render_fundus(5)
    with pytest.raises(ValueError):
        render_fundus(0, eye="both")
    with pytest.raises(ValueError):
        render_fundus(0, size=32)


# ----------------------------------------------------------------------------- grades

def test_allocate_grades_matches_proportions():
    for n in (2000, 37):
        g = allocate_grades(n, np.random.default_rng(1))
        assert len(g) == n and g.dtype.kind == "i"
        counts = np.bincount(g, minlength=5)
        # the published EyePACS shares add up to 100.1%, so the targets are the normalised shares
        p = np.asarray(ICDR_PROPORTIONS) / sum(ICDR_PROPORTIONS)
        target = n * p
        assert np.all(np.abs(counts - target) < 1), (n, counts, target)
        assert np.all(np.abs(counts - np.round(target)) <= 1), (n, counts, target)
        assert counts.sum() == n
    g = allocate_grades(2000, np.random.default_rng(1))
    assert list(np.bincount(g)) == [1468, 140, 302, 50, 40]
    assert not np.all(np.diff(g) >= 0), "grades are not shuffled"
    assert np.array_equal(g, allocate_grades(2000, np.random.default_rng(1)))


def test_eyes_of_a_patient_have_close_grades():
    grades = allocate_grades(2000, np.random.default_rng(3))
    pairs, single = _pair_patients(grades, np.random.default_rng(4))
    assert single is None and len(pairs) == 1000
    used = sorted(i for p in pairs for i in p)
    assert used == list(range(2000))
    diff = np.array([abs(int(grades[a]) - int(grades[b])) for a, b in pairs])
    assert diff.max() <= 1
    assert 0 < (diff == 1).sum() < 0.2 * len(pairs)      # mostly equal, some one grade apart
    pairs, single = _pair_patients(grades[:11], np.random.default_rng(4))
    assert single is not None and len(pairs) == 5


# ----------------------------------------------------------------------------- the data set

def test_make_dataset_layout(tmp_path):
    out = make_dataset(tmp_path / "synth", n=40, size=96, seed=2, progress=False, workers=1)
    assert out == tmp_path / "synth"
    meta = json.loads((out / "synth.json").read_text())
    assert (meta["n"], meta["size"], meta["seed"], meta["test_fraction"]) == (40, 96, 2, 0.2)
    assert list(meta["proportions"]) == list(ICDR_PROPORTIONS) and meta["version"]
    assert not (out / ".synth-in-progress").exists()

    rows = {}
    for split in ("train", "test"):
        header, rows[split] = _read_csv(out / f"{split}.csv")
        assert header == ["image", "level"]
        assert rows[split], f"{split}.csv is empty"
    names = [r[0] for s in rows.values() for r in s]
    assert len(names) == len(set(names)) == 40
    assert sorted(names) == sorted(f"{p}_{e}" for p in range(1, 21) for e in ("left", "right"))
    side = {}
    for split, rs in rows.items():
        for name, level in rs:
            patient = name.split("_")[0]
            assert side.setdefault(patient, split) == split, f"patient {patient} is on both sides"
            assert (out / "images" / f"{name}.jpeg").is_file()
            img = cv2.imread(str(out / "images" / f"{name}.jpeg"))
            assert img is not None and img.shape == (96, 96, 3)
            mask = cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
            assert mask is not None and mask.shape == (96, 96) and mask.dtype == np.uint8
            assert (mask.max() > 0) == (level > 0), (name, level)
    levels = np.bincount([lv for s in rows.values() for _, lv in s], minlength=5)
    assert list(levels) == meta["grade_counts"]
    assert np.all(np.abs(levels - 40 * np.asarray(ICDR_PROPORTIONS) / sum(ICDR_PROPORTIONS)) < 1)
    assert len(rows["test"]) == 8                           # 20% of 20 patients, both eyes


def test_make_dataset_is_byte_identical_and_independent_of_workers(tmp_path):
    a = make_dataset(tmp_path / "a", n=40, size=64, seed=9, progress=False, workers=1)
    b = make_dataset(tmp_path / "b", n=40, size=64, seed=9, progress=False, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = make_dataset(tmp_path / "c", n=40, size=64, seed=10, progress=False, workers=1)
    assert (a / "images" / "1_left.jpeg").read_bytes() != (c / "images" / "1_left.jpeg").read_bytes()


def test_make_dataset_odd_n_rerun_and_refusals(tmp_path):
    out = make_dataset(tmp_path / "odd", n=11, size=64, seed=0, progress=False, workers=1)
    names = sorted(r[0] for s in ("train", "test") for r in _read_csv(out / f"{s}.csv")[1])
    assert "6_left" in names and "6_right" not in names and len(names) == 11
    # a rerun into its own folder with fewer images replaces the set and drops stale files
    make_dataset(out, n=10, size=64, seed=0, progress=False, workers=1)
    assert not (out / "images" / "6_left.jpeg").exists() and not (out / "masks" / "6_left.png").exists()
    assert json.loads((out / "synth.json").read_text())["n"] == 10
    # a folder holding something else is not clobbered
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        make_dataset(other, n=10, size=64, progress=False, workers=1)
    with pytest.raises(ValueError, match="at least 10"):
        make_dataset(tmp_path / "x", n=9, size=64, progress=False)
    with pytest.raises(ValueError, match="at least 64"):
        make_dataset(tmp_path / "x", n=10, size=63, progress=False)
