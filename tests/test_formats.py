"""Every layout read_dataset recognises, the patient split, and every DatasetError."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retino.data import DatasetError, read_dataset, split_by_patient, stats

SHARED = Path(__file__).resolve().parents[2] / "shared" / "real_fundus_sample"
GRADES = [0, 0, 1, 2, 0, 3, 4, 0, 2, 1, 0, 0]


def _img(path: Path, fmt="JPEG", size=(40, 30)):
    """A small image whose colour depends on its name: two files with equal bytes would be a leak."""
    import zlib
    path.parent.mkdir(parents=True, exist_ok=True)
    c = zlib.crc32(path.stem.encode())
    Image.new("RGB", size, (c & 255, (c >> 8) & 255, (c >> 16) & 255)).save(path, fmt)


def names(n=len(GRADES)):
    return [f"{i // 2 + 1}_{'left' if i % 2 == 0 else 'right'}" for i in range(n)]


def make_kaggle(root: Path, rows=None, header="image,level", ext=".jpeg"):
    rows = rows if rows is not None else list(zip(names(), GRADES))
    (root / "trainLabels.csv").parent.mkdir(parents=True, exist_ok=True)
    (root / "trainLabels.csv").write_text(header + "\n" + "".join(f"{n},{g}\n" for n, g in rows))
    for n, _ in rows:
        _img(root / "train" / f"{Path(n).stem}{ext}")
    return root


def test_kaggle_layout_single_split_is_by_patient(tmp_path):
    ds = read_dataset(make_kaggle(tmp_path))
    assert ds.layout == "kaggle" and ds.split["method"] == "stratified-by-patient"
    train, val, test = ds.splits["train"], ds.splits["val"], ds.splits["test"]
    assert len(train) + len(val) + len(test) == len(GRADES)
    assert not set(train["patient"]) & set(test["patient"])
    assert set(train["eye"]) <= {"left", "right"}
    again = read_dataset(tmp_path)  # seeded: the same split every time
    assert list(again.splits["test"]["image"]) == list(test["image"])


def test_kaggle_with_test_labels(tmp_path):
    make_kaggle(tmp_path)
    (tmp_path / "retinopathy_solution.csv").write_text("image,level,Usage\n9_left,2,Public\n9_right,0,Private\n")
    _img(tmp_path / "test" / "9_left.jpeg")
    _img(tmp_path / "test" / "9_right.jpeg")
    ds = read_dataset(tmp_path)
    assert ds.split["method"] == "given" and list(ds.splits["test"]["grade"]) == [2, 0]


def test_patient_split_keeps_eyes_together_and_stratifies():
    import pandas as pd
    rng = np.random.default_rng(1)
    rows = [(f"{p}_{e}", p, int(g)) for p, g in enumerate(rng.choice(5, 400, p=[.735, .07, .151, .025, .019]))
            for e in ("left", "right")]
    df = pd.DataFrame(rows, columns=["image", "patient", "grade"])
    train, test = split_by_patient(df)
    assert not set(train["patient"]) & set(test["patient"])
    assert 0.15 < len(test) / len(df) < 0.25
    for g in range(5):  # every grade with patients reaches the test split
        if (df["grade"] == g).sum() >= 10:
            assert (test["grade"] == g).any()


@pytest.mark.parametrize("with_header", [True, False])
@pytest.mark.parametrize("subfolder", ["", "images"])
def test_lab_layout(tmp_path, with_header, subfolder):
    for split, idx in (("train", range(0, 8)), ("test", range(8, 12))):
        ns = [names()[i] for i in idx]
        gs = [GRADES[i] for i in idx]
        (tmp_path / f"{split}_img.csv").write_text(("img\n" if with_header else "") + "\n".join(ns) + "\n")
        (tmp_path / f"{split}_label.csv").write_text(("label\n" if with_header else "") + "\n".join(map(str, gs)) + "\n")
        for n in ns:
            _img(tmp_path / subfolder / f"{n}.jpeg")
    ds = read_dataset(tmp_path)
    assert ds.layout == "lab"
    train = pd.concat([ds.splits["train"], ds.splits["val"]]).sort_index(kind="stable")
    assert dict(zip(train["image"], train["grade"])) == dict(zip(names()[:8], GRADES[:8]))
    assert list(ds.splits["test"]["image"]) == names()[8:12]


def test_aptos_layout(tmp_path):
    ids = [f"{i:08x}" for i in range(len(GRADES))]
    (tmp_path / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{i},{g}\n" for i, g in zip(ids, GRADES)))
    for i in ids:
        _img(tmp_path / "train_images" / f"{i}.png", "PNG")
    ds = read_dataset(tmp_path)
    assert ds.layout == "aptos"
    assert sorted(sum((df["image"].tolist() for df in ds.splits.values()), [])) == sorted(ids)


@pytest.mark.parametrize("nested", [False, True])
def test_folder_per_grade(tmp_path, nested):
    for i, (n, g) in enumerate(zip(names(), GRADES)):
        split = ("test" if i >= 8 else "train") if nested else ""
        _img(tmp_path / split / str(g) / f"{n}.jpg")
    ds = read_dataset(tmp_path)
    assert ds.layout == "folders"
    total = sorted(np.concatenate([ds.splits[s]["grade"].to_numpy() for s in ("train", "val", "test")]).tolist())
    assert total == sorted(GRADES)
    assert ds.split["method"] == ("given" if nested else "stratified-by-patient")


def test_retino_layout(tmp_path):
    for split, idx in (("train", range(0, 8)), ("test", range(8, 12))):
        (tmp_path / f"{split}.csv").write_text("image,level\n" + "".join(f"{names()[i]},{GRADES[i]}\n" for i in idx))
        for i in idx:
            _img(tmp_path / "images" / f"{names()[i]}.jpeg")
    ds = read_dataset(tmp_path)
    assert ds.layout == "retino" and len(ds.splits["test"]) == 4


# ----------------------------------------------------------------------------- errors

def test_missing_column_names_file_and_column(tmp_path):
    make_kaggle(tmp_path, header="image,grade")
    with pytest.raises(DatasetError, match=r"trainLabels\.csv.*missing column 'level'"):
        read_dataset(tmp_path)


@pytest.mark.parametrize("label", ["7", "-1", "2.5", "abc"])
def test_bad_label_names_line(tmp_path, label):
    rows = list(zip(names(), GRADES))
    rows[3] = (rows[3][0], label)
    make_kaggle(tmp_path, rows)
    with pytest.raises(DatasetError, match=r"trainLabels\.csv, line 5.*'level'.*0-4"):
        read_dataset(tmp_path)


def test_missing_image(tmp_path):
    make_kaggle(tmp_path)
    (tmp_path / "train" / "2_left.jpeg").unlink()
    with pytest.raises(DatasetError, match=r"do not exist.*'2_left'"):
        read_dataset(tmp_path)


def test_no_layout_lists_what_was_tried(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError) as e:
        read_dataset(tmp_path)
    for layout in ("retino", "lab", "kaggle", "aptos", "folders"):
        assert layout in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        read_dataset(tmp_path / "nope")


def test_lab_line_count_mismatch(tmp_path):
    (tmp_path / "train_img.csv").write_text("1_left\n1_right\n2_left\n")
    (tmp_path / "train_label.csv").write_text("0\n1\n")
    (tmp_path / "test_img.csv").write_text("3_left\n")
    (tmp_path / "test_label.csv").write_text("0\n")
    with pytest.raises(DatasetError, match="3 images but .*2 labels"):
        read_dataset(tmp_path)


def test_conflicting_duplicate(tmp_path):
    rows = list(zip(names(), GRADES)) + [(names()[0], 4)]
    make_kaggle(tmp_path, rows)
    with pytest.raises(DatasetError, match="different grades"):
        read_dataset(tmp_path)


# ----------------------------------------------------------------------------- messy but valid CSVs

def test_messy_csv_is_accepted(tmp_path):
    """BOM, CRLF, extra columns, duplicate rows, float and named labels, names with extensions."""
    root = tmp_path / "my data ü"
    ns = names()
    labels = ["0", "0.0", "mild", "2", " 0 ", "Severe", "4", "0", "2.0", "1", "0", "0"]
    body = "".join(f"{n}.jpeg,{lab},extra\r\n" for n, lab in zip(ns, labels)) + f"{ns[0]},0,dup\r\n"
    (root / "train").mkdir(parents=True)
    (root / "trainLabels.csv").write_bytes(b"\xef\xbb\xbf" + f"image,level,note\r\n{body}".encode())
    for n in ns:
        _img(root / "train" / f"{n}.jpeg")
    ds = read_dataset(root)
    got = {i: g for df in ds.splits.values() for i, g in zip(df["image"], df["grade"])}
    assert len(got) == len(ns)
    assert got == dict(zip(ns, GRADES))


# ----------------------------------------------------------------------------- problems and stats

def test_truncated_and_garbage_images_are_problems_not_errors(tmp_path):
    make_kaggle(tmp_path)
    good = (tmp_path / "train" / "1_left.jpeg").read_bytes()
    Image.new("RGB", (200, 200), (200, 100, 50)).save(tmp_path / "train" / "1_right.jpeg")
    full = (tmp_path / "train" / "1_right.jpeg").read_bytes()
    (tmp_path / "train" / "1_right.jpeg").write_bytes(full[: len(full) // 2])
    (tmp_path / "train" / "2_left.jpeg").write_bytes(b"this is not a jpeg")
    (tmp_path / "train" / "2_right.jpeg").write_bytes(b"")
    assert good
    report = stats(read_dataset(tmp_path))
    problems = {Path(p["file"]).name: p["error"] for p in report["problems"]}
    assert set(problems) == {"1_right.jpeg", "2_left.jpeg", "2_right.jpeg"}
    assert "truncated" in problems["1_right.jpeg"] and "empty" in problems["2_right.jpeg"]
    counts = np.sum([s["counts"] for s in report["splits"].values()], axis=0)
    assert counts.tolist() == np.bincount(GRADES, minlength=5).tolist()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "retino", *args], capture_output=True, text=True)


def test_stats_cli_json_and_exit_codes(tmp_path):
    make_kaggle(tmp_path / "ok")
    r = _cli("stats", str(tmp_path / "ok"), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["layout"] == "kaggle"
    assert sum(sum(s["counts"]) for s in report["splits"].values()) == len(GRADES)
    assert report["problems"] == []
    bad = _cli("stats", str(tmp_path / "missing"))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/real_fundus_sample is not present")
def test_real_eyepacs_sample_reads():
    report = stats(read_dataset(SHARED))
    assert report["layout"] == "kaggle"
    n = sum(sum(s["counts"]) for s in report["splits"].values())
    assert n == 50 and report["problems"] == []


# ----------------------------------------------------------------------------- the val split (issue 10)

def _patients(ds):
    return {s: set(df["patient"]) for s, df in ds.splits.items()}


def _assert_disjoint_three_splits(ds):
    assert list(ds.splits) == ["train", "val", "test"]
    assert all(len(df) for df in ds.splits.values())
    pats = _patients(ds)
    assert not pats["train"] & pats["val"] and not pats["train"] & pats["test"] and not pats["val"] & pats["test"]
    assert ds.split["patients"] == {s: len(p) for s, p in pats.items()}


def make_retino(root: Path, val=False):
    parts = (("train", range(0, 8)), ("val", range(8, 10)), ("test", range(10, 12))) if val else \
        (("train", range(0, 8)), ("test", range(8, 12)))
    for split, idx in parts:
        (root / f"{split}.csv").write_text("image,level\n" + "".join(f"{names()[i]},{GRADES[i]}\n" for i in idx))
        for i in idx:
            _img(root / "images" / f"{names()[i]}.jpeg")
    return root


def make_lab(root: Path, val=False):
    parts = (("train", range(0, 8)), ("val", range(8, 10)), ("test", range(10, 12))) if val else \
        (("train", range(0, 8)), ("test", range(8, 12)))
    for split, idx in parts:
        (root / f"{split}_img.csv").write_text("".join(f"{names()[i]}\n" for i in idx))
        (root / f"{split}_label.csv").write_text("".join(f"{GRADES[i]}\n" for i in idx))
        for i in idx:
            _img(root / "images" / f"{names()[i]}.jpeg")
    return root


def make_folders(root: Path, nested=False, val=False):
    for i, (n, g) in enumerate(zip(names(), GRADES)):
        split = ("test" if i >= 10 else "val" if (val and i >= 8) else "train") if nested else ""
        _img(root / split / str(g) / f"{n}.jpg")
    return root


def make_aptos(root: Path):
    (root / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{n},{g}\n" for n, g in zip(names(), GRADES)))
    for n in names():
        _img(root / "train_images" / f"{n}.png", "PNG")
    return root


def make_kaggle_with_test(root: Path):
    make_kaggle(root)
    (root / "retinopathy_solution.csv").write_text("image,level,Usage\n9_left,2,Public\n9_right,0,Private\n")
    _img(root / "test" / "9_left.jpeg")
    _img(root / "test" / "9_right.jpeg")
    return root


LAYOUT_MAKERS = {
    "retino": make_retino, "lab": make_lab, "kaggle": make_kaggle, "kaggle+test": make_kaggle_with_test,
    "aptos": make_aptos, "folders": make_folders, "folders-nested": lambda r: make_folders(r, nested=True),
}


@pytest.mark.parametrize("layout", LAYOUT_MAKERS)
def test_val_split_is_carved_from_train_by_patient_for_every_layout(tmp_path, layout):
    ds = read_dataset(LAYOUT_MAKERS[layout](tmp_path))
    _assert_disjoint_three_splits(ds)
    assert ds.split["val_given"] is False and ds.split["val_method"] == "stratified-by-patient"
    assert ds.split["val_fraction"] == 0.1 and ds.split["val_seed"] == ds.split["seed"]
    # the two eyes of a val patient are both in val
    val = ds.splits["val"]
    both = val.groupby("patient")["eye"].nunique()
    assert (both == 2).all()
    assert read_dataset(tmp_path).splits["val"].equals(val)   # seeded: the same every time


@pytest.mark.parametrize("layout", ["kaggle", "aptos", "folders"])
def test_single_split_sets_keep_their_old_test_split(tmp_path, layout):
    """The test side is byte-for-byte what it was before val existed: earlier runs stay comparable."""
    import pandas as pd
    ds = read_dataset(LAYOUT_MAKERS[layout](tmp_path))
    everything = pd.concat([ds.splits[s] for s in ("train", "val", "test")]).sort_values("image")
    old_train, old_test = split_by_patient(everything.reset_index(drop=True))
    assert sorted(ds.splits["test"]["image"]) == sorted(old_test["image"])
    assert sorted(ds.splits["train"]["image"].tolist() + ds.splits["val"]["image"].tolist()) == \
        sorted(old_train["image"])
    assert ds.split["method"] == "stratified-by-patient" and ds.split["test_fraction"] == 0.2


@pytest.mark.parametrize("maker", [lambda r: make_retino(r, val=True), lambda r: make_lab(r, val=True),
                                   lambda r: make_folders(r, nested=True, val=True)],
                         ids=["retino val.csv", "lab val_img.csv", "folders val/"])
def test_val_given_by_the_data_set_is_honoured(tmp_path, maker):
    ds = read_dataset(maker(tmp_path))
    _assert_disjoint_three_splits(ds)
    assert sorted(ds.splits["val"]["image"]) == sorted(names()[8:10])
    assert sorted(ds.splits["test"]["image"]) == sorted(names()[10:12])
    assert ds.split["val_given"] is True and ds.split["val_method"] == "given"
    assert "val_fraction" not in ds.split


def test_val_fraction_parameter_and_large_set_is_stratified():
    import pandas as pd
    from retino.data.formats import carve_val
    rng = np.random.default_rng(3)
    rows = [(f"{p}_{e}", p, int(g)) for p, g in enumerate(rng.choice(5, 500, p=[.735, .07, .151, .025, .019]))
            for e in ("left", "right")]
    df = pd.DataFrame(rows, columns=["image", "patient", "grade"])
    for fraction in (0.1, 0.25):
        train, val = carve_val(df, fraction)
        assert not set(train["patient"]) & set(val["patient"])
        assert abs(val["patient"].nunique() / 500 - fraction) < 0.02
        for g in range(5):
            if (df["grade"] == g).sum() >= 20:
                assert (val["grade"] == g).any()


def test_read_dataset_val_fraction(tmp_path):
    make_kaggle(tmp_path, rows=[(f"{p}_{e}", p % 5) for p in range(40) for e in ("left", "right")])
    small, large = read_dataset(tmp_path, val_fraction=0.1), read_dataset(tmp_path, val_fraction=0.3)
    assert small.split["patients"]["val"] < large.split["patients"]["val"]
    assert small.splits["test"].equals(large.splits["test"])   # the fraction moves train <-> val only
    assert large.split["val_fraction"] == 0.3 and large.describe()["split"]["val_fraction"] == 0.3
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(DatasetError, match="val_fraction"):
            read_dataset(tmp_path, val_fraction=bad)


def test_describe_records_the_split_for_config_json(tmp_path):
    d = read_dataset(make_retino(tmp_path)).describe()
    json.dumps(d)
    assert set(d["sizes"]) == {"train", "val", "test"} and sum(d["sizes"].values()) == len(GRADES)
    assert {"method", "seed", "val_method", "val_seed", "val_fraction", "val_given", "patients"} <= set(d["split"])


def test_stats_shows_three_splits(tmp_path):
    report = stats(read_dataset(make_kaggle(tmp_path)))
    assert list(report["splits"]) == ["train", "val", "test"]
    assert sum(sum(s["counts"]) for s in report["splits"].values()) == len(GRADES)
