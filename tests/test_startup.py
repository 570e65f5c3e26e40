"""What ``python -m retino predict`` loads: with the run's ONNX model cached, only what grading needs.

A fresh process runs the CLI's ``main`` on an untrained run (test_grading's ``fake_run``, with an OOD
model so the model's view takes part) and reports the modules it imported and whether it built the
PyTorch network. Its answer must be the in-process ``predict``'s. What each import costs is measured in
``bench/startup.py``, not here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retino.data.synthetic import render_fundus
from retino.inference import engine
from retino.inference.predict import predict
from retino.inference.trained import load_trained
from test_engine import _with_ood
from test_grading import fake_run

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI as ``python -m retino`` does, counting every ResNet constructed (the lazy model must
# stay unbuilt when the ONNX model is cached), then prints what the process imported.
WRAPPER = """
import json, sys
import retino.models
built = []
init = retino.models.ResNet.__init__
def counting(self, *a, **k):
    built.append(1)
    init(self, *a, **k)
retino.models.ResNet.__init__ = counting
from retino.__main__ import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "built": len(built), "modules": sorted(sys.modules)}), file=sys.stderr)
"""

# Heavy modules the predict verb must not load: metrics and data-set readers are for other verbs, and
# torchvision's ops pull in torch._dynamo; the package never imports the dashboard's streamlit.
NOT_LOADED = ("sklearn", "torchvision", "torch._dynamo", "pandas", "streamlit")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    for i in range(4):
        Image.fromarray(render_fundus(i, size=160, seed=i)[0]).save(out / f"{i}_{'left' if i % 2 else 'right'}.jpeg")
    return out


def _cli(*args) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    report = done.stderr.strip().splitlines()[-1]
    assert report.startswith("{"), done.stderr[-2000:]
    return json.loads(report), done.stdout


def _loaded(modules: list[str], name: str) -> list[str]:
    return [m for m in modules if m == name or m.startswith(name + ".")]


def test_predict_with_a_cached_onnx_model_loads_neither_sklearn_nor_torchvision(photos, tmp_path):
    run = _with_ood(fake_run(tmp_path, "classify", op=0.3), photos)
    engine.get(load_trained(run), "onnx")  # the export, as the first predict on this machine makes it
    (cached,) = (run / "cache").glob("*.onnx")
    made = cached.stat().st_mtime_ns
    images = sorted(photos.glob("*.jpeg"))[:2]

    report, stdout = _cli("predict", run, *images, "--json")

    assert report["code"] == 0
    for name in NOT_LOADED:
        assert not _loaded(report["modules"], name), f"predict imported {name}: {_loaded(report['modules'], name)[:5]}"
    assert "onnxruntime" in report["modules"] and "retino.inference.engine" in report["modules"]  # the report is real
    assert report["built"] == 0, "predict built the PyTorch network although the ONNX model was cached"
    assert cached.stat().st_mtime_ns == made and [cached] == list((run / "cache").glob("*.onnx"))

    answers = json.loads(stdout)
    want = predict(load_trained(run), images)
    assert [a["engine"] for a in answers] == ["onnx"] * len(images)
    assert len(answers) == len(want) == len(images)
    for got, p in zip(answers, want):
        assert p.ok and got["image"] == str(p.image)
        assert (got["grade"], got["referable"], got["status"]) == (p.grade, p.referable, p.status)
        assert got["quality"]["verdict"] == p.quality["verdict"]
        np.testing.assert_allclose(got["probs"], p.probs, atol=1e-6)


def test_the_wrapper_sees_what_a_process_loads_and_builds(photos, tmp_path):
    """Both checks above can fail: a verb that needs scikit-learn shows it, and PyTorch grading builds the network."""
    report, _ = _cli("compare", tmp_path / "no-run-a", tmp_path / "no-run-b")
    assert report["code"] == 2 and _loaded(report["modules"], "sklearn")
    report, _ = _cli("predict", fake_run(tmp_path, "classify"), sorted(photos.glob("*.jpeg"))[0], "--engine", "torch")
    assert report["code"] == 0 and report["built"] == 1
