"""retino.inference.predict, .explain and .pointing: every kind of photo, the CAM methods, rejected files, the CLI verbs, the page.

The session's tiny classify and regress runs (60 synthetic images at 64 px, 2 epochs), copied:
the numbers are meaningless, the shapes, ranges, messages and exit codes are not.
"""
import io
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from streamlit.testing.v1 import AppTest

from conftest import REPO, copy_run, run_cli
from retino.inference import explain, trained as inference, pointing
from retino.dashboard import settings
from retino.data import ImageError, read_dataset
from retino.data.preprocess import preprocess
from retino.data.synthetic import render_fundus
from retino.grades import GRADE_INFO
from retino.inference.trained import load_trained
from retino.inference.grading import TTA_ANGLES, tta_views
from retino.inference.predict import predict, predictions_table

SIZE = 64
REAL = REPO.parent / "shared" / "real_fundus_sample" / "train"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explain") / "synthetic"
    result = run_cli("synth", out, "--n", 60, "--size", SIZE, "--quiet")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def run_dir(trained_classify, tmp_path_factory) -> Path:
    # plain photos (the shared classify run has no Ben Graham): tests below look at the brightness of what
    # the model saw; copied, because evaluate and export write into the folder they are given
    return copy_run(trained_classify, tmp_path_factory.getbasetemp() / "explain-runs" / trained_classify.name)


@pytest.fixture(scope="session")
def regress_run(trained_regress, tmp_path_factory) -> Path:
    return copy_run(trained_regress, tmp_path_factory.getbasetemp() / "explain-runs" / trained_regress.name)


@pytest.fixture(scope="session")
def best_epoch(run_dir) -> int:
    """The epoch best.pt holds (the shared run trains two; either may be the best)."""
    from retino import runs
    return runs.load_checkpoint(run_dir / "best.pt")["epoch"]


@pytest.fixture(scope="session")
def trained(run_dir):
    return load_trained(run_dir)


@pytest.fixture(scope="session")
def fundus() -> np.ndarray:
    """A grade-3 synthetic photo, not square (the crop has work to do): (72, 96, 3) uint8."""
    rgb, _ = render_fundus(3, size=(96, 72), seed=5)
    return rgb


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def big_png_header(width=30_000, height=30_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with one tiny IDAT chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- predict

def test_predict_every_kind_of_photo(trained, fundus, tmp_path):
    rgb = Image.fromarray(fundus)
    rgba = np.dstack([fundus, np.where(fundus.max(2) > 12, 255, 0).astype(np.uint8)])
    grey16 = (fundus.mean(2) * 257).astype(np.uint16)
    files = [
        _save(rgb, tmp_path / "rgb.jpg", quality=90),
        _save(rgb.convert("L"), tmp_path / "grey.png"),
        _save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"),
        _save(Image.fromarray(grey16), tmp_path / "grey16.png"),
    ]
    assert Image.open(files[3]).mode.startswith("I;16")
    upload = io.BytesIO(files[0].read_bytes())
    upload.name = "upload.jpg"
    upload.read()  # a Streamlit upload an earlier rerun has read to its end
    inputs = [*files, files[1].read_bytes(), upload, rgb, Image.fromarray(grey16)]
    preds = predict(trained, inputs)
    assert [p.image for p in preds[:4]] == [str(f) for f in files] and preds[5].image == "upload.jpg"
    for p in preds:
        assert p.ok, p.error
        assert p.grade in range(5) and p.grade == int(np.argmax(p.probs))
        assert len(p.probs) == 5 and abs(sum(p.probs) - 1) < 1e-5
        assert p.seen.shape == (SIZE, SIZE, 3) and p.seen.dtype == np.uint8
        assert p.score is None and p.original is not None
    # the same photo as a path, bytes and a PIL image is the same input to the model
    np.testing.assert_array_equal(preds[0].seen, preds[5].seen)
    out = preds[0].as_dict()
    assert {k: out[k] for k in ("image", "grade", "grade_name", "probs")} == {
        "image": str(files[0]), "grade": preds[0].grade, "grade_name": GRADE_INFO[preds[0].grade]["name"],
        "probs": preds[0].probs}
    assert out["referable"] == (out["referable_score"] >= out["referable_threshold"]) and out["warnings"] == []
    # 64-px photos are fundus photos too small to grade: graded, with the gate's reason beside the grade
    assert out["quality"]["verdict"] == "ungradable" and out["quality"]["reasons"][0].startswith("fundus too small")


def test_exif_orientation_is_honoured(trained, fundus, tmp_path):
    """A camera that stores the photo on its side and says so in EXIF: the model sees it upright."""
    upright = fundus.copy()
    upright[:, : upright.shape[1] // 2] = upright[:, : upright.shape[1] // 2] // 3  # dark left half
    stored = Image.fromarray(np.rot90(upright).copy())  # 90 deg counter-clockwise, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 deg clockwise to display
    rotated = _save(stored, tmp_path / "rotated.jpg", exif=exif, quality=95)
    plain = _save(stored, tmp_path / "plain.jpg", quality=95)
    seen, sideways = (p.seen.astype(float) for p in predict(trained, [rotated, plain]))
    half = SIZE // 2
    assert seen[:, :half].mean() < 0.6 * seen[:, half:].mean()          # dark on the left, as photographed
    assert sideways[half:].mean() < 0.6 * sideways[:half].mean()       # without EXIF: dark at the bottom


def test_rejected_files_give_one_line_each(trained, fundus, tmp_path):
    good = _save(Image.fromarray(fundus), tmp_path / "good.jpg", quality=90)
    text = tmp_path / "notes.jpg"
    text.write_text("these are not pixels\n")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(big_png_header())
    preds = predict(trained, [text, good, truncated, bomb, tmp_path / "missing.jpg"])
    assert [p.ok for p in preds] == [False, True, False, False, False]
    for p in (preds[0], preds[2], preds[3], preds[4]):
        assert "\n" not in p.error and Path(p.image).name in p.error and p.grade is None
        assert p.as_dict() == {"image": p.image, "error": p.error, "status": "refer: ungraded eye"}
    assert "not an image" in preds[0].error
    assert "truncated" in preds[2].error
    assert "MP" in preds[3].error and "limit" in preds[3].error
    (odd,) = predict(trained, [np.zeros((8, 8, 3), np.uint8)])
    assert odd.error == "image 1: expected a path, bytes, a file object or a PIL image, got ndarray"


def test_tta_averages_probabilities(trained, fundus):
    photo = Image.fromarray(fundus)
    tta, plain = predict(trained, [photo, photo], tta=True)[0], predict(trained, photo)[0]
    assert abs(sum(tta.probs) - 1) < 1e-5 and tta.grade == int(np.argmax(tta.probs))
    views = tta_views(torch.rand(2, 3, SIZE, SIZE))
    assert views.shape == (2 * (2 + len(TTA_ANGLES)), 3, SIZE, SIZE)
    assert tta.probs != plain.probs


def test_regress_head(regress_run, fundus):
    pred = predict(regress_run, [Image.fromarray(fundus)], tta=True)[0]
    assert pred.ok and pred.probs is None and isinstance(pred.score, float) and len(pred.thresholds) == 4
    assert pred.grade == int(np.digitize(pred.score, pred.thresholds))
    assert pred.referable_score == pred.score and pred.referable == (pred.score >= pred.referable_threshold)
    assert pred.referable_rule.startswith("score >= ") and pred.temperature is None
    e = explain.explain(load_trained(regress_run), pred, target=3)
    assert e.target is None and e.contrast is None and e.heatmap.shape == (SIZE, SIZE)


# ----------------------------------------------------------------------------- explain

@pytest.mark.parametrize("method", explain.list_cam_methods())
def test_every_method_gives_a_map(trained, fundus, method):
    pred = predict(trained, [Image.fromarray(fundus)])[0]
    e = explain.explain(trained, pred, method=method, image_weight=0.3)
    assert e.heatmap.shape == (SIZE, SIZE) and e.heatmap.dtype == np.float32
    assert 0.0 <= e.heatmap.min() and e.heatmap.max() <= 1.0
    assert e.overlay.shape == (SIZE, SIZE, 3) and e.overlay.dtype == np.uint8
    assert e.grade == pred.grade and e.target == pred.grade and np.allclose(e.probs, pred.probs, atol=1e-4)


def test_target_grade_changes_the_map(trained, fundus):
    pred = predict(trained, [Image.fromarray(fundus)])[0]
    for contrast in (0, None):
        maps = [explain.explain(trained, pred, target=g, contrast=contrast).heatmap for g in (1, 4)]
        assert not np.allclose(maps[0], maps[1], atol=1e-3)
    assert explain.explain(trained, pred, target=4).contrast == 0
    assert explain.explain(trained, pred, target=0).contrast is None  # grade 0 against itself: the raw logit


def test_cut_at_target_layer_gives_the_library_map(trained, fundus):
    """explain stops backward at layer4[-1]; the map is the one pytorch-grad-cam makes by itself."""
    seen = preprocess(fundus, SIZE)
    x = inference.model_input(seen[None], "cpu", trained.norm)
    with GradCAM(model=trained.model, target_layers=[trained.model.layer4[-1]]) as cam:
        expected = cam(input_tensor=x, targets=[ClassifierOutputTarget(3)])[0]
    ours = explain.explain(trained, seen, target=3, contrast=None).heatmap
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert trained.model.layer4[-1].conv1.weight.grad is None  # backward stopped at the target layer
    assert not trained.model.layer4[-1]._forward_hooks  # every hook released


def test_explain_accepts_a_path_and_rejects_bad_input(trained, fundus, tmp_path):
    path = _save(Image.fromarray(fundus), tmp_path / "eye.png")
    assert explain.explain(trained, path).heatmap.shape == (SIZE, SIZE)
    assert explain.explain(trained.model, preprocess(fundus, SIZE)).heatmap.shape == (SIZE, SIZE)
    with pytest.raises(ValueError, match="Choose one of"):
        explain.explain(trained, path, method="nonsense")
    with pytest.raises(ValueError, match="0..4"):
        explain.explain(trained, path, target=7)
    text = tmp_path / "x.png"
    text.write_text("hello")
    with pytest.raises(ImageError, match="not an image"):
        explain.explain(trained, text)


def test_concurrent_requests_on_one_model(trained, fundus):
    """Two sessions sharing a cached model: each gets its own map, not one mixed by the other's hooks."""
    seen = [preprocess(fundus, SIZE), preprocess(np.ascontiguousarray(fundus[::-1]), SIZE)]
    expected = [explain.explain(trained, s, target=2).heatmap for s in seen]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results.setdefault(i, []).append(explain.explain(trained, seen[i], target=2).heatmap)
                predict(trained, [Image.fromarray(seen[i])])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for i in (0, 1):
        for m in results[i]:
            np.testing.assert_allclose(m, expected[i], atol=1e-5)


def test_predictions_table(trained, fundus, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("x")
    table = predictions_table(predict(trained, [Image.fromarray(fundus), bad]))
    assert list(table.columns) == ["image", "grade", "grade_name", "p0", "p1", "p2", "p3", "p4", "score", "referable",
                                   "quality", "reasons", "error"]
    assert table["quality"][0] == "ungradable" and table["reasons"][0].startswith("fundus too small")
    assert table["grade_name"][0] == GRADE_INFO[table["grade"][0]]["name"]
    assert table["error"][1].startswith(f"{bad}: not an image")  # named as the input was given
    assert set(GRADE_INFO) == set(range(5)) and GRADE_INFO[4]["name"] == "Proliferative DR"


def test_mask_goes_through_the_image_crop():
    """An off-centre, non-square fundus: the mask lands where preprocess puts the image's pixels."""
    rgb = np.zeros((90, 140, 3), np.uint8)
    yy, xx = np.mgrid[:90, :140]
    disc = (yy - 50) ** 2 + (xx - 90) ** 2 < 35 ** 2
    rgb[disc] = (200, 90, 40)
    spot = (yy - 40) ** 2 + (xx - 100) ** 2 < 6 ** 2
    rgb[spot] = (250, 250, 250)
    mask = spot.astype(np.uint8) * 3
    lesion = pointing._mask_like_model_input(mask, rgb, 48)
    bright = preprocess(rgb, 48).min(2) > 200
    assert lesion.any() and (lesion & bright).sum() >= 0.7 * max(lesion.sum(), bright.sum())


# ----------------------------------------------------------------------------- the CLI

def test_cli_predict_json_and_exit_codes(run_dir, synth_dir, fundus, tmp_path, best_epoch):
    # a data-set photo and a wider one (96 x 72): each map is written over its own photo's size
    images = [sorted((synth_dir / "images").glob("*.jpeg"))[0], _save(Image.fromarray(fundus), tmp_path / "wide.png")]
    cams = tmp_path / "cams"
    ok = run_cli("predict", run_dir, *images, "--json", "--cam-dir", cams)
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert [o["image"] for o in out] == [str(p) for p in images]
    for o in out:
        assert set(o) == {"image", "grade", "grade_name", "probs", "run", "checkpoint", "epoch", "cam", "temperature",
                          "referable", "referable_score", "referable_threshold", "referable_rule", "referable_why",
                          "status", "quality", "warnings", "engine", "engine_version"}
        assert o["engine"] == "torch" and o["engine_version"] == torch.__version__   # maps need PyTorch's gradients
        assert o["grade"] in range(5) and len(o["probs"]) == 5 and o["grade_name"] == GRADE_INFO[o["grade"]]["name"]
        assert (o["run"], o["checkpoint"], o["epoch"]) == (str(run_dir), "best.pt", best_epoch)
        assert Path(o["cam"]).name == Path(o["image"]).stem + "_cam.png" and Path(o["cam"]).is_file()
        assert Image.open(o["cam"]).size == Image.open(o["image"]).size  # over the photo, at its own size

    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    mixed = run_cli("predict", run_dir, images[0], bad, images[1], "--json", "--tta")
    assert mixed.returncode == 2, mixed.stderr
    out = json.loads(mixed.stdout)
    assert [o["image"] for o in out] == [str(images[0]), str(bad), str(images[1])]
    assert set(out[1]) == {"image", "error", "status"} and "not an image" in out[1]["error"]
    assert out[1]["status"] == "refer: ungraded eye"  # an unreadable photo's eye is referred, never passed
    assert out[0]["cam"] is None and out[2]["grade"] in range(5)

    text = run_cli("predict", run_dir, images[0], bad, tmp_path / "missing.jpeg")
    assert text.returncode == 2
    lines = text.stdout.strip().splitlines()
    assert len(lines) == 3 and "grade" in lines[0] and "rejected" in lines[1]
    assert GRADE_INFO[int(lines[0].split("grade ")[1].split()[0])]["name"] in lines[0]
    assert lines[2].count("missing.jpeg") == 1 and "cannot be read" in lines[2]  # named once, not twice
    assert f"{run_dir}: best.pt (epoch {best_epoch})" in text.stderr and "referable when P(grade >= 2) >= " in text.stderr
    unknown = run_cli("predict", run_dir, images[0], "--cam-dir", cams, "--cam-method", "nonsense")
    assert unknown.returncode == 2 and "Choose one of" in unknown.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    not_a_dir = run_cli("predict", run_dir, images[0], "--cam-dir", a_file)
    assert not_a_dir.returncode == 2 and "exists and is not a folder" in not_a_dir.stderr
    assert len(not_a_dir.stderr.strip().splitlines()) == 1


def test_cli_predict_and_evaluate_on_a_missing_run_folder(tmp_path):
    for verb, args in (("predict", [tmp_path / "eye.jpeg"]), ("evaluate", [])):
        r = run_cli(verb, tmp_path / "no-such-run", *args)
        assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'no-such-run'}: the run folder does not exist"


def test_map_goes_back_over_the_photo():
    """An off-centre, non-square fundus: a map of the model input lands on the photo where its pixels were."""
    rgb = np.zeros((90, 140, 3), np.uint8)
    yy, xx = np.mgrid[:90, :140]
    rgb[(yy - 50) ** 2 + (xx - 90) ** 2 < 35 ** 2] = (200, 90, 40)
    spot = (yy - 40) ** 2 + (xx - 100) ** 2 < 6 ** 2
    rgb[spot] = (250, 250, 250)
    heat = (preprocess(rgb, 48).min(2) > 200).astype(np.float32)  # the spot, as the model saw it
    crop = inference.fundus_crop(rgb)
    back = inference.map_on_photo(heat, crop, rgb.shape[:2])
    assert back.shape == (90, 140) and back[spot].mean() > 0.5 and back[~spot].mean() < 0.02
    twice = inference.map_on_photo(heat, crop, (180, 280))  # the same photo decoded at twice the size
    assert twice[80, 200] > 0.5 and twice[100, 100] == 0
    photo = explain.overlay_on_photo(rgb, heat, crop, image_weight=0.5)
    assert photo.shape == (90, 140, 3) and photo.dtype == np.uint8
    assert photo[40, 100, 0] > photo[40, 100, 2]  # JET red on the spot


def test_cli_evaluate_text_is_rounded_with_per_grade_recall(run_dir, best_epoch):
    import re
    r = run_cli("evaluate", run_dir)
    assert r.returncode == 0, r.stderr
    assert not re.search(r"\d\.\d{5,}", r.stdout)  # rounded: no 0.7333333333333333
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{run_dir}: epoch {best_epoch}, test split (") and lines[0].endswith("choices made on val")
    qwk = next(line for line in lines if line.split()[:1] == ["qwk"])
    assert re.fullmatch(r"\s*qwk\s+-?\d\.\d{3}( \[.*\])?", qwk)  # the value with its interval
    start = lines.index("per grade:            recall  precision      n")
    per_grade = lines[start + 1:start + 6]
    assert [row.split()[:2] for row in per_grade] == [["0", "No"], ["1", "Mild"], ["2", "Moderate"], ["3", "Severe"],
                                                      ["4", "Proliferative"]]
    assert all(0 <= float(row.split()[-3]) <= 1 for row in per_grade)


def test_cli_predict_regress_json(regress_run, synth_dir):
    image = sorted((synth_dir / "images").glob("*.jpeg"))[0]
    result = run_cli("predict", regress_run, image, "--json")
    assert result.returncode == 0, result.stderr
    (out,) = json.loads(result.stdout)
    assert out["probs"] is None and isinstance(out["score"], float) and len(out["thresholds"]) == 4


def test_cli_cam_score_json(run_dir):
    result = run_cli("cam-score", run_dir, "--limit", 3, "--json", "--method", "gradcam++")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"method", "n", "hit_rate", "random_hit_rate", "mass_in_mask", "random_mass_in_mask"}
    assert out["method"] == "gradcam++" and 1 <= out["n"] <= 3
    assert all(0.0 <= out[k] <= 1.0 for k in out if k not in ("method", "n"))
    assert 0 < out["random_mass_in_mask"] < out["random_hit_rate"]  # the dilated mask covers more


def test_cli_cam_score_contrast(run_dir):
    plain = run_cli("cam-score", run_dir, "--limit", 4, "--json", "--contrast", "none")
    against_0 = run_cli("cam-score", run_dir, "--limit", 4, "--json")
    assert plain.returncode == 0 and against_0.returncode == 0, plain.stderr + against_0.stderr
    # the same images, two different targets: the maps (so the mass in the lesions) differ
    assert json.loads(plain.stdout)["mass_in_mask"] != json.loads(against_0.stdout)["mass_in_mask"]
    bad = run_cli("cam-score", run_dir, "--contrast", "7")
    assert bad.returncode == 2 and "expected a grade 0-4 or 'none', got '7'" in bad.stderr


def test_cam_score_needs_masks(run_dir, tmp_path):
    import shutil
    src = Path(json.loads((run_dir / "config.json").read_text())["train"]["data"])
    shutil.copytree(src, tmp_path / "nomasks", ignore=shutil.ignore_patterns("masks"))
    with pytest.raises(ValueError, match="masks"):
        pointing.cam_score(run_dir, data=tmp_path / "nomasks")


# ----------------------------------------------------------------------------- the page

def test_page_without_runs():
    at = AppTest.from_file(str(REPO / "pages" / "predict.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    assert "Train page" in " ".join(i.value for i in at.info)


def test_page_grades_samples(run_dir, regress_run, synth_dir, monkeypatch):
    assert regress_run.parent == run_dir.parent
    monkeypatch.setenv("RETINO_RUNS", str(run_dir.parent))
    settings.use_dataset(str(synth_dir))
    at = AppTest.from_file(str(REPO / "pages" / "predict.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    assert any("Upload" in i.value for i in at.info)
    test = read_dataset(synth_dir).splits["test"]
    picked = [str(p) for p in test["path"][:2]]
    at.multiselect(key="predict.samples").set_value(picked).run()
    for label in ("regress", "classify"):
        runs = at.selectbox(key="predict.run")
        runs.select_index([i for i, o in enumerate(runs.options) if label in o][0]).run()
        assert not at.exception, at.exception
        assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 2
        assert at.dataframe[0].value["true_grade"].tolist() == test["grade"][:2].tolist()  # labelled samples
        assert at.subheader and at.subheader[0].value.startswith("Grade ")
        assert len(at.get("plotly_chart")) == 1 and len(at.get("download_button")) == 1
    at.selectbox(key="predict.method").set_value("layercam").run()
    at.selectbox(key="predict.target").set_value(4).run()
    at.slider(key="predict.opacity").set_value(0.8).run()
    assert not at.exception, at.exception
    captions = [img.caption for el in at.get("image") for img in el.proto.imgs]
    assert captions == ["The photograph", f"What the model saw ({SIZE} px)",
                        "layercam: evidence for grade 4 over grade 0"]
    assert any(c.value.startswith(f"The map has 2 x 2 cells") and "64 px / 32" in c.value for c in at.caption)


def test_page_uploads_and_a_rejected_one(run_dir, fundus, monkeypatch):
    monkeypatch.setenv("RETINO_RUNS", str(run_dir.parent))
    buf = io.BytesIO()
    Image.fromarray(fundus).save(buf, format="PNG")
    at = AppTest.from_file(str(REPO / "pages" / "predict.py"), default_timeout=120).run()
    runs = at.selectbox(key="predict.run")
    runs.select_index([i for i, o in enumerate(runs.options) if "classify" in o][0]).run()
    at.file_uploader(key="predict.uploads").set_value(
        [("eye.png", buf.getvalue(), "image/png"), ("notes.jpg", b"not a photo", "image/jpeg")]).run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == ["notes.jpg: not an image Retino can read; expected a JPEG or PNG"]
    table = at.dataframe[0].value
    assert list(table["image"]) == ["eye.png", "notes.jpg"] and table["grade"].notna().tolist() == [True, False]
    assert "true_grade" not in table  # uploads carry no label
    at.selectbox(key="predict.method").set_value("eigencam").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="predict.target").disabled
    captions = [img.caption for el in at.get("image") for img in el.proto.imgs]
    assert captions[2].startswith("eigencam: the strongest activation pattern")


# ----------------------------------------------------------------------------- real photographs

@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/real_fundus_sample is not here")
def test_real_camera_photographs(trained):
    """Two 12-16 MP camera JPEGs: decoded at reduced scale, cropped to the fundus, graded, explained."""
    photos = sorted(REAL.glob("1[05]_left.jpeg"))
    assert photos
    for p in predict(trained, photos):
        assert p.ok, p.error
        assert p.seen.shape == (SIZE, SIZE, 3) and max(p.original.size) <= 1024
        assert explain.explain(trained, p).heatmap.max() <= 1.0
