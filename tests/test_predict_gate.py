"""predict's quality gate, calibrated probabilities and referral, the masked heat map, and the Predict page.

The session's tiny classify run (2 epochs, 64 px, the 60-image synthetic set); each test copies
its folder (checkpoint hard-linked) and writes the evaluation.json or ood.npz it needs, so the
temperature and the operating point are known numbers. The weights are meaningless; the verdicts,
messages, exit codes and the arithmetic are not.
"""
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from conftest import REPO, run_cli
from retino.inference import explain, ood, quality
from retino.data import read_dataset
from retino.data.synthetic import degrade_photo, render_fundus
from retino.inference.trained import load_trained
from retino.inference.predict import predict

sys.path.insert(0, str(Path(__file__).parent))
from test_quality import checkerboard, text_on_white  # noqa: E402  (the drawn not-fundus pictures)

SIZE = 64


@pytest.fixture(scope="module")
def base_run(trained_classify) -> Path:
    return trained_classify  # every test works on its own copy_run of it


def copy_run(base: Path, dst: Path, evaluation: dict | None = None) -> Path:
    """The run under a new folder, best.pt hard-linked; evaluation.json replaced (None: removed)."""
    def link(src, to):
        try:
            os.link(src, to)
        except OSError:
            shutil.copy2(src, to)
    shutil.copytree(base, dst, copy_function=link)
    (dst / "evaluation.json").unlink(missing_ok=True)
    # training now fits the model's view (ood.npz) at the end of every run; a test that wants it
    # writes its own, so the photo gate is judged alone here (a 1-epoch run's cut-off rests on 4 photos)
    (dst / "ood.npz").unlink(missing_ok=True)
    if evaluation is not None:
        epoch = json.loads((base / "evaluation.json").read_text())["epoch"]
        (dst / "evaluation.json").write_text(json.dumps({"selected_on": "val", "epoch": epoch, "head": "classify",
                                                         **evaluation}))
    return dst


@pytest.fixture(scope="module")
def photos() -> dict:
    """256-px photos the gate can judge: a good fundus, a dark one, and drawn pictures (PIL images)."""
    good, _ = render_fundus(3, size=256, seed=4)
    dark, _ = degrade_photo(good, "dark", seed=0)
    return {"good": Image.fromarray(good), "dark": Image.fromarray(dark),
            "text": Image.fromarray(text_on_white()), "checkerboard": Image.fromarray(checkerboard())}


def _png(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


# ----------------------------------------------------------------------------- the gate in predict

def test_not_fundus_is_not_graded_unless_asked(base_run, photos, tmp_path):
    trained = load_trained(copy_run(base_run, tmp_path / "run"))
    good, text, board = predict(trained, [photos["good"], photos["text"], photos["checkerboard"]])
    assert good.ok and good.quality["verdict"] == "ok" and good.quality["reasons"] == []
    for p in (text, board):
        assert not p.ok and p.grade is None and p.probs is None and p.referable is None
        assert p.quality["verdict"] == "not_fundus"
        assert p.error == f"not a fundus photograph: {p.quality['reasons'][0]}"
        assert set(p.as_dict()) == {"image", "error", "quality", "status"}
        assert p.status == "refer: ungraded eye"  # a refused eye is referred, never passed
    assert text.error.startswith("not a fundus photograph: no round fundus field on a dark background")

    anyway = predict(trained, [photos["text"], photos["checkerboard"]], quality_gate=False)
    for p in anyway:
        assert p.ok and p.grade in range(5) and p.quality["verdict"] == "not_fundus"  # graded, verdict kept
        assert p.as_dict()["quality"]["reasons"] == p.quality["reasons"]


def test_ungradable_photo_is_graded_with_its_reasons(base_run, photos, tmp_path):
    trained = load_trained(copy_run(base_run, tmp_path / "run"))
    (dark,) = predict(trained, [photos["dark"]])
    assert dark.ok and dark.grade in range(5)
    assert dark.quality["verdict"] == "ungradable"
    assert dark.quality["reasons"][0].startswith("too dark: median brightness")
    assert dark.as_dict()["quality"]["brightness"] < quality.LIMITS.min_brightness


def corrupt_exif_jpeg(img: Image.Image, path: Path) -> Path:
    """The photo as a JPEG whose EXIF Pillow cannot re-pack (issue 15's case: a Make tag retagged as SHORT)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera"
    img.save(path, "JPEG", exif=exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x07\x00\x02", 1), quality=95)
    return path


def test_cli_not_fundus_exits_2_and_no_quality_gate_grades_it(base_run, photos, tmp_path):
    run = copy_run(base_run, tmp_path / "run", {"temperature": 1.5, "operating_point": {"threshold": 0.5}})
    good = corrupt_exif_jpeg(photos["good"], tmp_path / "eye.jpeg")
    dark, text = _png(photos["dark"], tmp_path / "dark.png"), _png(photos["text"], tmp_path / "screenshot.png")
    gated = run_cli("predict", run, good, text, dark)
    assert gated.returncode == 2, gated.stderr  # a photo that is not a fundus is rejected, as an unreadable one
    lines = gated.stdout.strip().splitlines()
    assert len(lines) == 3 and " grade " in lines[0] and "referable: " in lines[0] and "quality" not in lines[0]
    assert lines[1].startswith(f"{text}: rejected: not a fundus photograph: no round fundus field")
    assert lines[1].count(str(text)) == 1  # the file named once
    assert "  quality: ungradable (too dark: median brightness" in lines[2]  # graded, the reason beside
    assert "probabilities calibrated (temperature 1.5)" in gated.stderr
    assert "referable when P(grade >= 2) >= 0.5: the run's operating point" in gated.stderr
    assert f"warning: {good}: EXIF orientation unreadable; shown unrotated" in gated.stderr

    anyway = run_cli("predict", run, good, text, "--json", "--no-quality-gate")
    assert anyway.returncode == 0, anyway.stderr
    out = json.loads(anyway.stdout)
    assert [o["grade"] in range(5) for o in out] == [True, True]
    assert [o["quality"]["verdict"] for o in out] == ["ok", "not_fundus"]
    assert out[0]["temperature"] == 1.5 and isinstance(out[0]["referable"], bool)
    assert out[0]["warnings"] == [f"{good}: EXIF orientation unreadable; shown unrotated"] and out[1]["warnings"] == []


# ----------------------------------------------------------------------------- temperature and referral

def test_temperature_flattens_the_probabilities_and_keeps_the_grade(base_run, photos, tmp_path):
    one = load_trained(copy_run(base_run, tmp_path / "t1", {"temperature": 1.0}))
    two = load_trained(copy_run(base_run, tmp_path / "t2", {"temperature": 2.0}))
    assert (one.temperature, two.temperature) == (1.0, 2.0)
    images = [photos["good"], photos["dark"]]
    for tta in (False, True):
        for p1, p2 in zip(predict(one, images, tta=tta), predict(two, images, tta=tta)):
            assert p2.grade == p1.grade and p2.temperature == 2.0
            assert max(p2.probs) < max(p1.probs) and min(p2.probs) > min(p1.probs)   # flatter
            assert abs(sum(p2.probs) - 1) < 1e-5
            if not tta:  # softmax(z / 2) from softmax(z): p^(1/2), renormalised
                expected = np.sqrt(p1.probs) / np.sqrt(p1.probs).sum()
                np.testing.assert_allclose(p2.probs, expected, atol=1e-5)
    # explain's prediction is the same calibrated one
    (pred,) = predict(two, [photos["good"]])
    np.testing.assert_allclose(explain.explain(two, pred).probs, pred.probs, atol=1e-5)


def test_referable_flips_at_the_operating_point(base_run, photos, tmp_path):
    (ref,) = predict(load_trained(copy_run(base_run, tmp_path / "none")), [photos["good"]])
    p = ref.referable_score
    assert p == pytest.approx(sum(ref.probs[2:])) and ref.temperature is None   # no evaluation.json
    assert ref.referable == (p >= 0.5) and ref.referable_threshold == 0.5
    assert ref.referable_rule == "P(grade >= 2) >= 0.5: the default, as the run has no operating point"
    verdicts = {}
    for name, cut in (("above", p + 1e-3), ("below", p - 1e-3)):
        run = copy_run(base_run, tmp_path / name, {"temperature": 1.0, "operating_point": {
            "threshold": cut, "target_sensitivity": 0.9, "val_sensitivity": 0.9, "val_specificity": 0.5}})
        (pred,) = predict(run, [photos["good"]])
        assert pred.referable_score == pytest.approx(p, abs=1e-6) and pred.referable_threshold == cut
        assert pred.referable_rule.endswith("the run's operating point, chosen on val for sensitivity 0.90")
        assert pred.as_dict()["referable"] is pred.referable
        verdicts[name] = pred.referable
    assert verdicts == {"above": False, "below": True}
    # an evaluation.json made for another checkpoint is not applied
    stale = copy_run(base_run, tmp_path / "stale", {"temperature": 3.0, "operating_point": {"threshold": 0.0}})
    data = json.loads((stale / "evaluation.json").read_text())
    assert load_trained(stale).temperature == 3.0
    (stale / "evaluation.json").write_text(json.dumps({**data, "epoch": data["epoch"] + 5}))
    trained = load_trained(stale)
    assert trained.temperature is None and trained.operating_point is None


# ----------------------------------------------------------------------------- the model's own view

def test_ood_score_comes_from_the_grading_pass(base_run, photos, tmp_path):
    from dataclasses import replace
    from retino.training.splits import load_split
    run = copy_run(base_run, tmp_path / "run", {"temperature": 1.0})
    trained = load_trained(run)
    cfg = replace(trained.config, cache=True)  # the cache under the test's RETINO_CACHE, as training reads it
    ds = read_dataset(cfg.data, val_fraction=cfg.val_fraction)
    train, val = (load_split(ds.splits[n], cfg, progress=False, desc=n) for n in ("train", "val"))
    decoded = load_split(ds.splits["train"], replace(cfg, cache=False), progress=False, desc="train")
    assert type(train.dataset).__name__ == "CachedImages" and type(decoded.dataset).__name__ == "DecodedImages"
    np.testing.assert_array_equal(ood.split_images(train.dataset, [5, 0, 2]),  # memmap rows, out of order
                                  ood.split_images(decoded.dataset, [5, 0, 2]))
    path = ood.fit_run_ood(run, trained.model, train, val, norm=trained.norm, epoch=trained.epoch, batch_size=7)
    assert path == run / "ood.npz"
    trained = load_trained(run)
    assert trained.ood["trained_on"] == "synthetic fundus images" and trained.ood["n_val"] == len(val.frame)
    preds = predict(trained, [photos["good"], photos["text"]], quality_gate=False)
    for p in preds:  # the distance predict reports is the one of the photo's own features
        own = ood.ood_score(ood.features_of(trained, p.seen[None]), trained.ood)[0]
        assert p.quality["ood_score"] == pytest.approx(own, rel=1e-3)
        assert p.quality["ood_cutoff"] == pytest.approx(trained.ood["cutoff"], rel=1e-4)
    (tta,) = predict(trained, [photos["good"]], tta=True)  # the photo's own view, not the augmented ones
    assert tta.quality["ood_score"] == pytest.approx(preds[0].quality["ood_score"], rel=1e-3)
    text = preds[1]
    assert text.quality["ood_score"] > text.quality["ood_cutoff"]
    assert text.quality["reasons"][-1].startswith(
        "unlike the photos this model was trained on (synthetic fundus images): Mahalanobis distance")
    assert ood.read_run_ood(run, trained.epoch + 1) is None  # made for another checkpoint: not used


# ----------------------------------------------------------------------------- heat map and inputs

def test_heat_map_is_zero_outside_the_boundary_mask(base_run, tmp_path):
    trained = load_trained(copy_run(base_run, tmp_path / "run"))
    full, _ = render_fundus(4, size=256, seed=2)
    clipped = np.ascontiguousarray(full[40:-40])  # an EyePACS-style circle cut off at the top and bottom
    (pred,) = predict(trained, [Image.fromarray(clipped)])
    mask = pred.mask
    assert mask.shape == (SIZE, SIZE) and mask.any() and not mask.all()
    centre = SIZE // 2
    assert not mask[:, centre].all()  # the clipped rows are out, even on the centre column
    for method in ("gradcam", "eigencam"):
        heat = explain.explain(trained, pred, method=method).heatmap
        assert heat[~mask].max() == 0.0 and heat[mask].max() > 0.0


def test_unreadable_exif_is_a_warning_beside_the_grade(base_run, photos, tmp_path):
    path = corrupt_exif_jpeg(photos["good"], tmp_path / "eye.jpeg")
    trained = load_trained(copy_run(base_run, tmp_path / "run"))
    (pred,) = predict(trained, [path])
    assert pred.ok and pred.warnings == ["eye.jpeg: EXIF orientation unreadable; shown unrotated"]
    assert pred.as_dict()["warnings"] == pred.warnings


# ----------------------------------------------------------------------------- the page

def test_page_shows_the_verdict_and_the_referral_line(base_run, photos, tmp_path, monkeypatch):
    runs_root = tmp_path / "runs"
    runs_root.mkdir()
    copy_run(base_run, runs_root / base_run.name, {"temperature": 1.25, "operating_point": {
        "threshold": 0.3, "target_sensitivity": 0.9}})
    monkeypatch.setenv("RETINO_RUNS", str(runs_root))
    uploads = []
    for name in ("eye.png", "screenshot.png"):
        buf = io.BytesIO()
        photos["good" if name == "eye.png" else "text"].save(buf, format="PNG")
        uploads.append((name, buf.getvalue(), "image/png"))
    at = AppTest.from_file(str(REPO / "pages" / "predict.py"), default_timeout=120).run()
    at.file_uploader(key="predict.uploads").set_value(uploads).run()
    assert not at.exception, at.exception
    (error,) = at.error
    assert error.value.startswith("screenshot.png: not a fundus photograph: no round fundus field")
    assert at.dataframe[0].value["grade"].notna().tolist() == [True, False]
    assert at.dataframe[0].value["quality"].tolist() == ["ok", "not_fundus"]
    line = next(m.value for m in at.markdown if m.value.startswith("Referable"))
    assert line.startswith("Referable at this run's operating point: **") and "threshold 0.30" in line
    assert any("Probabilities calibrated (temperature 1.25, chosen on val)" in c.value for c in at.caption)
    (anyway,) = at.checkbox
    assert anyway.label == "Grade anyway"
    anyway.check().run()
    assert not at.exception, at.exception
    assert at.dataframe[0].value["grade"].notna().tolist() == [True, True]  # graded with the gate off
    assert "(graded anyway)" in at.error[0].value
