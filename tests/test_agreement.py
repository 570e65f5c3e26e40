"""Every door gives one photo one answer: predict --json, screen's CSV, evaluate's predictions.csv and
the exported ONNX model run by README's reference script agree on grade, referral and quality verdict.

Two tiny runs (classify with Ben Graham, regress without) and a copy of each with no operating point,
so both the chosen rule and each head's default rule are exercised.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow
SIZE = 64


def _train(tiny_data, root: Path, name: str, *extra) -> Path:
    run_dir = root / name
    r = run_cli("train", "--data", tiny_data, "--epochs", 2, "--image-size", SIZE, "--batch-size", 16,
                "--workers", 0, "--run-dir", run_dir, "--quiet", *extra, env={"RETINO_RUNS": str(root)}, timeout=900)
    assert r.returncode == 0, r.stderr
    return run_dir


def _without_operating_point(run: Path, root: Path) -> Path:
    copy = root / f"{run.name}-no-op"
    shutil.copytree(run, copy)
    chosen = json.loads((copy / "evaluation.json").read_text())
    chosen["operating_point"] = {"threshold": None, "target_sensitivity": chosen["operating_point"].get(
        "target_sensitivity"), "error": "removed by the test"}
    (copy / "evaluation.json").write_text(json.dumps(chosen))
    return copy


@pytest.fixture(scope="module")
def agreement_runs(tiny_data, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("agreement-runs")
    classify = _train(tiny_data, root, "classify", "--ben-graham", "true")
    regress = _train(tiny_data, root, "regress", "--head", "regress", "--loss", "mse", "--ben-graham", "false")
    return [classify, regress, _without_operating_point(classify, root), _without_operating_point(regress, root)]


@pytest.fixture(scope="module")
def photo_folder(tiny_data, tmp_path_factory) -> tuple[Path, list[str]]:
    """The set's test photos plus one ungradable (blurred) and one unlike the training set (noise disc)."""
    from retino.data.synthetic import degrade_photo, render_fundus
    folder = tmp_path_factory.mktemp("agreement-photos")
    test = pd.read_csv(tiny_data / "test.csv")["image"].astype(str).tolist()
    for name in test:
        shutil.copy(next((tiny_data / "images").glob(f"{name}.*")), folder / f"{name}.jpeg")
    blurred, _ = degrade_photo(render_fundus(2, size=256, seed=7)[0], "blurred", seed=7)
    Image.fromarray(blurred).save(folder / "900_left.png")
    rng = np.random.default_rng(3)
    disc = render_fundus(0, size=256, seed=8)[0].copy()
    field = disc.max(2) > 12
    disc[field] = rng.integers(0, 255, (int(field.sum()), 3), dtype=np.uint8)  # a disc of noise, no retina
    Image.fromarray(disc).save(folder / "901_right.png")
    return folder, test


def _reference_script(tmp_path: Path) -> Path:
    """README's export section's reference script, as the reader would copy it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Export for deployment"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    path = tmp_path / "reference.py"
    path.write_text(code)
    return path


@pytest.mark.parametrize("which", [0, 1, 2, 3], ids=["classify", "regress", "classify-no-op", "regress-no-op"])
def test_every_door_gives_the_same_answer(photo_folder, agreement_runs, tmp_path, which):
    pytest.importorskip("onnxruntime")
    run = agreement_runs[which]
    folder, test_names = photo_folder
    photos = sorted(folder.iterdir())

    r = run_cli("predict", run, *photos, "--json")
    assert r.returncode in (0, 2), r.stderr  # 2: a photo refused as not a fundus
    predicted = {Path(p["image"]).stem: p for p in json.loads(r.stdout)}

    r = run_cli("screen", run, folder, "--out", tmp_path / "screen.csv", "--workers", 0, "--quiet")
    assert r.returncode == 0, r.stderr
    screened = pd.read_csv(tmp_path / "screen.csv", dtype={"image": str}).set_index("image")
    screened.index = [Path(i).stem for i in screened.index]

    r = run_cli("evaluate", run, "--json")
    assert r.returncode == 0, r.stderr
    evaluate_cut = json.loads(r.stdout)["referral"]["threshold"]
    table = pd.read_csv(run / "predictions.csv", dtype={"image": str})
    evaluated = table[table["split"] == "test"].set_index("image")

    r = run_cli("export", run, "--format", "onnx", "--out", tmp_path / "export")
    assert r.returncode == 0, r.stderr
    script = _reference_script(tmp_path)
    model = tmp_path / "export" / "model.onnx"

    rows = []
    for photo in photos:
        name = photo.stem
        ref = json.loads(subprocess.run([sys.executable, str(script), str(model), str(photo)], capture_output=True,
                                        text=True, check=True).stdout)
        p, s = predicted[name], screened.loc[name]
        verdict = p["quality"]["verdict"]
        if "error" in p:  # refused by the gate: no door grades it
            rows.append({"photo": name, "predict": (None, None, verdict),
                         "screen": (None if pd.isna(s["grade"]) else s["grade"], None, s["quality"])})
            continue
        row = {"photo": name, "predict": (p["grade"], p["referable"], verdict),
               "screen": (int(s["grade"]), bool(s["referable"]), s["quality"]),
               "export": (ref["grade"], ref["referable"], verdict)}
        if name in test_names:
            e = evaluated.loc[name]
            row["evaluate"] = (int(e["grade"]), bool(e["referable"]), p["quality"]["verdict"])
        rows.append(row)
    # the rule itself, not only the answers (tiny models may leave no photo between two doors' cuts)
    cuts = {"predict": {p["referable_threshold"] for p in predicted.values() if "error" not in p},
            "screen": {json.loads((tmp_path / "screen.json").read_text())["summary"]["threshold"]},
            "evaluate": {evaluate_cut},
            "export": {json.loads((model.parent / "model.onnx.json").read_text())["postprocessing"]["referral"]["threshold"]}}
    assert len(set().union(*cuts.values())) == 1, f"{run.name}: the doors cut at different scores: {cuts}"
    disagree = [row for row in rows if len({v for k, v in row.items() if k != "photo"}) > 1]
    assert not disagree, f"{run.name}: the doors disagree on {len(disagree)} of {len(rows)} photos: {disagree[:3]}"
    assert {"900_left", "901_right"} <= {row["photo"] for row in rows}
    assert sum("evaluate" in row for row in rows) == len(test_names)
