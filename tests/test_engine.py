"""The inference engine behind the grading path: ONNX Runtime and PyTorch give one photo one answer.

Untrained ResNet-18s saved as Retino checkpoints (test_grading's ``fake_run``: no training, fast),
with an OOD model fitted on the photos so the model's own view takes part too.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retino.data.synthetic import render_fundus
from retino.inference import engine, ood
from retino.inference.predict import predict
from retino.inference.trained import load_trained
from retino.screening.screen import ScreenError, screen
from test_grading import fake_run

PARITY = 1e-4  # probabilities and scores: what the issue asks of two engines on the same photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    for i in range(6):
        Image.fromarray(render_fundus(i % 5, size=160, seed=i)[0]).save(out / f"{i}_{'left' if i % 2 else 'right'}.jpeg")
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(out / "9_left.png")  # not a fundus: refused
    (out / "8_left.jpeg").write_bytes(b"not a jpeg")                                  # unreadable
    return out


def _with_ood(run: Path, photos: Path) -> Path:
    trained = load_trained(run)
    seen = [p.seen for p in predict(trained, sorted(photos.glob("*.jpeg")), engine="torch") if p.ok]
    feats = ood.features_of(trained, np.stack(seen))
    params = ood.fit_ood(feats[:3])
    # half the photos "unlike the training photos": the model's view decides some verdicts, both ways
    params.update(cutoff=float(np.median(ood.ood_score(feats, params))), epoch=2, trained_on="")
    ood.save_ood(run / "ood.npz", params)
    return run


@pytest.mark.parametrize("head, op", [("classify", None), ("classify", 0.3), ("regress", None)])
def test_onnx_and_torch_engines_give_the_same_answers(photos, tmp_path, head, op):
    run = _with_ood(fake_run(tmp_path, head, op=op), photos)
    images = sorted(photos.iterdir())
    by = {name: predict(load_trained(run), images, engine=name) for name in ("torch", "onnx")}
    assert sum(p.ok for p in by["torch"]) == 6  # the six fundus photos graded, two refused
    for t, o in zip(by["torch"], by["onnx"]):
        assert (t.image, t.ok, t.error, t.grade, t.referable, t.status) == (o.image, o.ok, o.error, o.grade,
                                                                             o.referable, o.status)
        if not t.ok:
            continue
        assert t.quality["verdict"] == o.quality["verdict"]
        assert o.referable_score == pytest.approx(t.referable_score, abs=PARITY)
        if head == "classify":
            np.testing.assert_allclose(o.probs, t.probs, atol=PARITY)
        else:
            assert o.score == pytest.approx(t.score, abs=PARITY)


def test_screen_with_either_engine_writes_the_same_report_and_names_its_engine(photos, tmp_path):
    run = _with_ood(fake_run(tmp_path, "classify", op=0.3), photos)
    tables = {}
    for name in ("torch", "onnx"):
        result = screen(run, photos, tmp_path / name / "s.csv", workers=0, engine=name)
        meta = json.loads(result.meta.read_text())
        assert meta["summary"]["engine"]["engine"] == name
        assert meta["summary"]["engine"]["version"] == (torch.__version__ if name == "torch"
                                                        else f"onnxruntime {__import__('onnxruntime').__version__}")
        tables[name] = result.photos.set_index("image")
    t, o = tables["torch"], tables["onnx"]
    assert list(t.index) == list(o.index)
    assert t["grade"].equals(o["grade"]) and t["referable"].equals(o["referable"]) and t["quality"].equals(o["quality"])
    np.testing.assert_allclose(o["referable_score"].astype(float), t["referable_score"].astype(float),
                               atol=PARITY, equal_nan=True)


def test_auto_is_onnx_on_the_cpu_and_torch_on_a_gpu():
    assert engine.resolve("auto", "cpu") == "onnx"
    assert engine.resolve("auto", "cuda") == "torch"
    assert engine.resolve("torch", "cpu") == "torch"
    with pytest.raises(engine.EngineError, match="expected one of auto, torch, onnx"):
        engine.resolve("tensorrt", "cpu")


def test_the_onnx_model_is_made_once_per_checkpoint_and_remade_when_it_changes(tmp_path):
    run = fake_run(tmp_path, "classify")
    first = engine.onnx_model(load_trained(run))
    assert first.parent == run / "cache" and first.name.startswith("best-")
    made = first.stat().st_mtime_ns
    assert engine.onnx_model(load_trained(run)) == first and first.stat().st_mtime_ns == made  # a hit: not remade
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["model"]["fc.bias"] += 1.0                           # a new best epoch: other weights
    torch.save(ckpt, run / "best.pt")
    second = engine.onnx_model(load_trained(run))
    assert second != first and second.is_file() and not first.exists()  # the stale model removed
    (p,) = predict(load_trained(run), [_photo(tmp_path)], engine="onnx")
    (q,) = predict(load_trained(run), [_photo(tmp_path)], engine="torch")
    np.testing.assert_allclose(p.probs, q.probs, atol=PARITY)  # graded with the new weights, not the old file


def test_a_cached_onnx_model_grades_without_building_the_pytorch_network(tmp_path):
    run = fake_run(tmp_path, "classify")
    engine.onnx_model(load_trained(run))
    trained = load_trained(run, lazy=True)
    (p,) = predict(trained, [_photo(tmp_path)], engine="onnx")
    assert p.ok and trained._model is None  # the ResNet was never built
    assert trained.model is not None and trained._model is not None  # and is, the moment it is asked for


def test_a_run_folder_that_cannot_be_written_keeps_its_onnx_model_in_the_cache_root(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    run = fake_run(tmp_path, "classify")
    monkeypatch.setenv("RETINO_CACHE", str(tmp_path / "cache-root"))
    run.chmod(0o555)
    try:
        path = engine.onnx_model(load_trained(run))
    finally:
        run.chmod(0o755)
    assert tmp_path / "cache-root" in path.parents and not (run / "cache").exists()


def test_a_run_folder_that_cannot_be_written_keeps_its_onnx_model_in_the_cache_root_as_root(tmp_path, monkeypatch):
    run = fake_run(tmp_path, "classify")
    monkeypatch.setenv("RETINO_CACHE", str(tmp_path / "cache-root"))
    monkeypatch.setattr(engine.os, "access", lambda path, mode: Path(path) not in (run, run / "cache"))
    path = engine.onnx_model(load_trained(run))
    assert tmp_path / "cache-root" in path.parents and not (run / "cache").exists()


@pytest.mark.parametrize("what", ["a file", "a link to another folder"])
def test_a_cache_entry_retino_did_not_make_is_left_alone(tmp_path, monkeypatch, what):
    run = fake_run(tmp_path, "classify")
    monkeypatch.setenv("RETINO_CACHE", str(tmp_path / "cache-root"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if what == "a file":
        (run / "cache").write_text("not a folder")
    else:
        (run / "cache").symlink_to(elsewhere, target_is_directory=True)
    path = engine.onnx_model(load_trained(run))
    assert tmp_path / "cache-root" in path.parents and path.is_file()
    assert list(elsewhere.iterdir()) == [] and os.path.lexists(run / "cache")


def test_a_damaged_cached_model_is_made_again(tmp_path):
    run = fake_run(tmp_path, "classify")
    path = engine.onnx_model(load_trained(run))
    path.write_bytes(path.read_bytes()[:1000])  # cut short: a crash or a full disk
    trained = load_trained(run)
    (p,) = predict(trained, [_photo(tmp_path)], engine="onnx")
    assert p.ok and trained.engines["onnx"].name == "onnx" and path.stat().st_size > 1000


def test_an_onnx_model_that_disagrees_with_pytorch_is_not_used(tmp_path, monkeypatch):
    run = fake_run(tmp_path, "classify")
    real_export = engine.export_onnx

    def wrong(model, size, path):  # an exporter bug: a graph with other weights
        other = load_trained(fake_run(tmp_path / "other", "classify")).model
        torch.nn.init.normal_(other.fc.weight)
        real_export(other, size, path)
    monkeypatch.setattr(engine, "export_onnx", wrong)
    trained = load_trained(run)
    (p,) = predict(trained, [_photo(tmp_path)], engine="auto")
    (q,) = predict(load_trained(run), [_photo(tmp_path)], engine="torch")
    assert trained.engines["onnx"].name == "torch" and not list((run / "cache").glob("*.onnx"))
    assert any("differs from PyTorch" in n for n in trained.notes)
    np.testing.assert_allclose(p.probs, q.probs, atol=1e-6)


def test_screen_refuses_an_unknown_engine_in_one_line(photos, tmp_path):
    run = fake_run(tmp_path, "classify")
    with pytest.raises(ScreenError, match="engine 'fast': expected one of auto, torch, onnx"):
        screen(run, photos, tmp_path / "s.csv", workers=0, engine="fast")


def test_predict_cli_names_its_engine(photos, tmp_path):
    from conftest import run_cli
    run = fake_run(tmp_path, "classify")
    image = str(sorted(photos.glob("*.jpeg"))[0])
    out = {}
    for name in ("onnx", "torch"):
        r = run_cli("predict", run, image, "--engine", name, "--json")
        assert r.returncode == 0, r.stderr
        out[name] = json.loads(r.stdout)[0]
        assert out[name]["engine"] == name
    np.testing.assert_allclose(out["onnx"]["probs"], out["torch"]["probs"], atol=PARITY)
    r = run_cli("predict", run, image)
    assert "graded with ONNX Runtime" in r.stderr, r.stderr
    r = run_cli("predict", run, image, "--engine", "tensorrt")
    assert r.returncode != 0 and "invalid choice: 'tensorrt'" in r.stderr and "Traceback" not in r.stderr


def _photo(tmp_path: Path) -> Path:
    path = tmp_path / "one_left.jpeg"
    if not path.exists():
        Image.fromarray(render_fundus(3, size=160, seed=11)[0]).save(path)
    return path


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
