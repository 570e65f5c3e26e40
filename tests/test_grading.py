"""The one grading path: Predict and Screen answer alike, with the run's OOD view and its rule.

The runs here are untrained ResNet-18s saved as Retino checkpoints (no training: fast); what is
checked is that every door applies the same choices to the same pass, not what the model knows.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from retino.inference import choices, ood
from retino.evaluation import evaluate
from retino import runs
from retino.config import TrainConfig
from retino.data.synthetic import degrade_photo, render_fundus
from retino.inference.explain import explain
from retino.inference.trained import load_trained
from retino.models import build_model, normalization
from retino.inference.predict import predict
from retino.screening.screen import screen

SIZE = 64
THRESHOLDS = [-0.2, -0.1, 0.0, 0.1]


def fake_run(root: Path, head: str = "classify", *, epoch: int = 2, op: float | None = None,
             temperature: float = 1.5) -> Path:
    run = root / head
    run.mkdir(parents=True)
    cfg = TrainConfig(head=head, loss="mse" if head == "regress" else "ce", image_size=SIZE,
                      ben_graham=head == "classify")
    torch.manual_seed(0)
    model = build_model(cfg.arch, pretrained=False, head=head)
    mean, std = normalization(cfg.arch, False)
    torch.save({"config": cfg.to_dict(), "norm": {"mean": list(mean), "std": list(std)}, "epoch": epoch,
                "thresholds": THRESHOLDS, "model": model.state_dict()}, run / "best.pt")
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict()}))
    (run / "evaluation.json").write_text(json.dumps({
        "selected_on": "val", "temperature": temperature, "epoch": epoch, "head": head, "thresholds": THRESHOLDS,
        "operating_point": {"threshold": op, "target_sensitivity": 0.9}}))
    return run


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    for i in range(4):
        Image.fromarray(render_fundus(i, size=160, seed=i)[0]).save(out / f"{i}_left.jpeg")
    blurred, _ = degrade_photo(render_fundus(2, size=256, seed=7)[0], "blurred", seed=7)
    Image.fromarray(blurred).save(out / "7_right.png")
    return out


def _screened(run, folder, tmp_path, **kw) -> pd.DataFrame:
    table = screen(run, folder, tmp_path / "s.csv", workers=0, **kw).photos.set_index("image")
    return table


@pytest.mark.parametrize("head, op", [("classify", None), ("classify", 0.3), ("regress", None), ("regress", 0.0)])
def test_predict_and_screen_give_the_same_answer(folder, tmp_path, head, op):
    run = fake_run(tmp_path, head, op=op)
    preds = {Path(p.image).name: p for p in predict(run, sorted(folder.iterdir()))}
    table = _screened(run, folder, tmp_path)
    for name, p in preds.items():
        row = table.loc[name]
        assert (p.grade, p.referable, p.quality["verdict"]) == (int(row["grade"]), bool(row["referable"]),
                                                                 row["quality"])
        assert p.referable_score == pytest.approx(float(row["referable_score"]), abs=1e-4)
        if p.referable_why:  # the reason Predict prints is in Screen's row too
            assert p.referable_why in row["reasons"]


def test_regress_run_without_operating_point_refers_at_its_grade_cut(folder, tmp_path):
    run = fake_run(tmp_path, "regress")
    for p in predict(run, sorted(folder.iterdir())):
        assert p.referable == (p.grade >= 2) and p.referable_threshold == THRESHOLDS[1]


def test_screen_applies_the_models_ood_view(folder, tmp_path):
    run = fake_run(tmp_path, "classify")
    trained = load_trained(run)
    good = [p.seen for p in predict(trained, sorted(folder.glob("*.jpeg")))]
    feats = ood.features_of(trained, np.stack(good))
    params = ood.fit_ood(feats)
    params.update(cutoff=float(params["cutoff"]) * 1e-3, epoch=2, trained_on="")  # everything is "unlike"
    ood.save_ood(run / "ood.npz", params)
    table = _screened(run, folder, tmp_path)
    assert table["reasons"].str.contains("unlike the photos this model was trained on").all()
    assert set(table["quality"]) == {"ungradable"}
    preds = predict(run, sorted(folder.iterdir()))
    assert [p.quality["verdict"] for p in preds] == list(table.sort_index()["quality"])


def test_stale_choices_are_applied_by_no_door(folder, tmp_path):
    run = fake_run(tmp_path, "classify", epoch=2, op=0.01, temperature=5.0)
    chosen = json.loads((run / "evaluation.json").read_text())
    (run / "evaluation.json").write_text(json.dumps({**chosen, "epoch": 1}))
    (p,) = predict(run, [sorted(folder.iterdir())[0]])
    assert p.temperature is None and p.referable_threshold == 0.5
    result = screen(run, folder, tmp_path / "s.csv", workers=0)
    assert result.threshold == 0.5 and result.temperature == 1.0
    assert "made for epoch 1" in result.threshold_source and "python -m retino evaluate" in result.threshold_source


def test_predict_reports_progress_with_a_count(folder, tmp_path):
    run = fake_run(tmp_path, "classify")
    seen = []
    predict(run, sorted(folder.iterdir()), batch_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)]


def test_cam_comes_from_the_grading_pass(folder, tmp_path):
    run = fake_run(tmp_path, "classify")
    trained = load_trained(run)
    photo = sorted(folder.glob("*.jpeg"))[0]
    (with_cam,) = predict(trained, [photo], cam="gradcam")
    (plain,) = predict(trained, [photo])
    np.testing.assert_allclose(with_cam.probs, plain.probs, atol=1e-5)
    np.testing.assert_allclose(with_cam.heatmap, explain(trained, plain).heatmap, atol=1e-5)


def _status(run: Path, **fields) -> None:
    (run / "status.json").write_text(json.dumps({"state": "completed", "pid": os.getpid(), "updated": time.time(),
                                                 **fields}))


def test_evaluate_and_compare_refuse_an_unfinished_run(tmp_path):
    run = fake_run(tmp_path, "classify")
    _status(run, state="running")
    with pytest.raises(runs.RunError, match="is still training"):
        evaluate.evaluate_run(run)
    with pytest.raises(runs.RunError, match="classify: is still training"):
        evaluate.compare_runs(run, run)
    _status(run, state="failed", error="out of memory")
    with pytest.raises(runs.RunError, match=r"failed \(out of memory\).*train --resume --run-dir"):
        evaluate.evaluate_run(run)
    _status(run, state="stopped", phase="training")
    with pytest.raises(runs.RunError, match="stopped before it finished training.*--resume"):
        evaluate.evaluate_run(run)


def test_only_choices_reads_evaluation_json():
    """One reader: outside retino.inference.choices, evaluation.json is only written (or stat'ed), never parsed."""
    import re
    root = Path(choices.__file__).parent
    readers = []
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            if "evaluation.json" in line and re.search(r"read_json|read_text|open\(|json\.load", line):
                readers.append(f"{path.name}: {line.strip()}")
    assert readers == [], readers


def test_one_photo_that_was_not_graded_refers_its_eye_as_screen_refers_its_patient(tmp_path, folder):
    """Predict gives one photo the status Screen gives its patient: an eye refused or ungradable is
    'refer: ungraded eye', never passed; a gradable photo's status follows its referral."""
    run = fake_run(tmp_path, op=0.5)
    cat = np.zeros((200, 200, 3), np.uint8)
    cat[::7] = 255  # stripes on black: no fundus
    Image.fromarray(cat).save(tmp_path / "9_left.png")
    photos = [folder / "0_left.jpeg", folder / "7_right.png", tmp_path / "9_left.png"]
    preds = {Path(p.image).name: p for p in predict(run, [str(p) for p in photos])}
    refused, ungradable, clean = preds["9_left.png"], preds["7_right.png"], preds["0_left.jpeg"]
    assert not refused.ok and refused.status == choices.REFER_UNGRADED
    assert refused.as_dict()["status"] == choices.REFER_UNGRADED
    assert ungradable.ok and ungradable.quality["verdict"] == "ungradable"
    assert ungradable.status == (choices.REFER if ungradable.referable else choices.REFER_UNGRADED)
    assert clean.quality["verdict"] == "ok"
    assert clean.status == (choices.REFER if clean.referable else choices.NO_REFERRAL)
    # Screen, on the same photos (one eye per patient here), gives each patient its eye's status
    patients = screen(run, _copy(photos, tmp_path / "screened"), tmp_path / "s.csv", workers=0).patients
    status = dict(zip(patients["patient"].astype(str), patients["status"]))
    assert status == {"9": refused.status, "7": ungradable.status, "0": clean.status}


def _copy(paths, out: Path) -> Path:
    out.mkdir()
    for p in paths:
        (out / Path(p).name).write_bytes(Path(p).read_bytes())
    return out
