"""retino.inference.export: ONNX and TorchScript files that compute what Retino's own model computes.

The session's two tiny runs (2 epochs, 64 px ResNet-18 on the 60-image synthetic set): a classify
head on plain photos and a regress head with Ben Graham's normalisation. The weights are meaningless,
the parity is not: the exported files must give Retino's outputs to 1e-4 on the same batch.
"""
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import copy_run, run_cli
from retino import runs
from retino.data.augment import normalize, to_float
from retino.data.preprocess import load_and_preprocess
from retino.inference.trained import load_trained
from retino.inference.export import FORMATS, export_run
from retino.inference.predict import predict

SIZE = 64


@pytest.fixture(scope="session")
def trained_runs(trained_classify, trained_regress, tmp_path_factory) -> dict[str, Path]:
    # copies: exporting to the default destination writes into the run folder
    root = tmp_path_factory.mktemp("export-runs")
    return {"classify": copy_run(trained_classify, root / "classify"),
            "regress": copy_run(trained_regress, root / "regress")}


def _batch(tiny_data: Path, trained, n: int) -> torch.Tensor:
    """n photos of the set, preprocessed and normalised exactly as Retino does: (n, 3, S, S)."""
    files = sorted((tiny_data / "images").glob("*.jpeg"))[:n]
    cfg = trained.config
    seen = np.stack([load_and_preprocess(f, cfg.image_size, ben_graham_norm=cfg.ben_graham) for f in files])
    return normalize(to_float(torch.from_numpy(seen), "cpu"), *trained.norm)


def _run_exported(path: Path, fmt: str, x: torch.Tensor) -> np.ndarray:
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": x.numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit is deprecated; deployments still load it
        module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(x).numpy()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("head", ["classify", "regress"])
def test_exported_model_equals_retinos(trained_runs, tiny_data, tmp_path, fmt, head):
    run_dir = trained_runs[head]
    model_path, json_path = export_run(run_dir, fmt, tmp_path)
    assert model_path == tmp_path / f"model{FORMATS[fmt]}" and json_path == tmp_path / f"model{FORMATS[fmt]}.json"
    trained = load_trained(run_dir)
    for n in (1, 3):                                  # the batch dimension is free
        x = _batch(tiny_data, trained, n)
        with torch.no_grad():
            ours = trained.model(x).numpy()
        theirs = _run_exported(model_path, fmt, x)
        assert theirs.shape == ours.shape == (n, 5 if head == "classify" else 1)
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    info = json.loads(json_path.read_text())
    pre, post = info["preprocessing"], info["postprocessing"]
    assert info["format"] == fmt and info["model_file"] == model_path.name and info["head"] == head
    assert info["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert pre["image_size"] == SIZE and pre["ben_graham"] == (head == "regress")
    assert pre["boundary_mask_fraction"] == 0.9
    assert pre["mean"] == pytest.approx(list(trained.norm[0])) and pre["std"] == pytest.approx(list(trained.norm[1]))
    assert post["thresholds"] == pytest.approx(trained.thresholds)
    assert post["temperature"] == pytest.approx(trained.temperature or 1.0)   # evaluation.json's, as predict
    assert post["operating_point"] == trained.operating_point and len(post["grade_names"]) == 5
    assert any("Ben Graham" in s for s in pre["steps"]) == (head == "regress")


def test_onnx_input_is_fixed_size_with_a_free_batch(trained_runs, tmp_path):
    onnx = pytest.importorskip("onnx")
    model_path, _ = export_run(trained_runs["classify"], "onnx", tmp_path / "deploy" / "dr.onnx")
    assert model_path.name == "dr.onnx" and (tmp_path / "deploy" / "dr.onnx.json").is_file()
    graph = onnx.load(str(model_path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, SIZE, SIZE]
    assert graph.output[0].name == "logits"


def test_default_destination_is_exports_outside_the_run(trained_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_path, json_path = export_run(trained_runs["regress"], "torchscript")
    assert model_path == Path("exports") / trained_runs["regress"].name / "model.pt" and json_path.is_file()
    assert json.loads(json_path.read_text())["output"]["name"] == "score"


def test_export_never_writes_inside_a_run_or_over_a_file(trained_runs, tmp_path):
    run = trained_runs["classify"]
    for out in (run / "best.pt", run / "config.onnx", run / "export"):
        with pytest.raises(runs.RunError, match="inside the run folder"):
            export_run(run, "onnx", out)
    assert runs.load_checkpoint(run / "best.pt")["model"]  # untouched
    with pytest.raises(runs.RunError, match=r"must not end in \.json"):
        export_run(run, "onnx", tmp_path / "x" / "model.json")
    export_run(run, "onnx", tmp_path / "both")
    with pytest.raises(runs.RunError, match="exists; pass --force"):
        export_run(run, "onnx", tmp_path / "both")
    export_run(run, "torchscript", tmp_path / "both")  # one folder, two formats: each keeps its own JSON
    assert json.loads((tmp_path / "both" / "model.onnx.json").read_text())["format"] == "onnx"
    assert json.loads((tmp_path / "both" / "model.pt.json").read_text())["format"] == "torchscript"
    export_run(run, "onnx", tmp_path / "both", force=True)


def test_exporting_a_failed_run_is_refused_unless_asked(trained_runs, tmp_path):
    run = tmp_path / "failed-run"
    shutil.copytree(trained_runs["classify"], run)
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "failed", "error": "killed"}))
    with pytest.raises(runs.RunError, match="failed.*--unfinished"):
        export_run(run, "onnx", tmp_path / "out")
    assert export_run(run, "onnx", tmp_path / "out", unfinished=True)[0].is_file()


def test_deployment_json_states_draft_decoding(trained_runs, tmp_path):
    _, json_path = export_run(trained_runs["classify"], "onnx", tmp_path)
    pre = json.loads(json_path.read_text())["preprocessing"]
    assert pre["jpeg_draft_target"] == SIZE and "draft" in pre["steps"][0]


def test_bad_format_and_bad_run_are_one_line_errors(trained_runs, tmp_path):
    with pytest.raises(ValueError, match=r"Invalid export format 'tflite'\. Choose one of: onnx, torchscript\."):
        export_run(trained_runs["classify"], "tflite")
    empty = tmp_path / "20260101-000000-empty"
    empty.mkdir()
    with pytest.raises(runs.RunError, match="best.pt: missing") as err:
        export_run(empty, "onnx")
    assert "\n" not in str(err.value)
    with pytest.raises(runs.RunError, match="no such run folder"):
        export_run(tmp_path / "nowhere", "onnx")


def test_deployment_json_reproduces_predict(trained_runs, tiny_data, tmp_path):
    """The exported network plus the JSON's temperature and referral give predict's probabilities and referral."""
    run_dir = trained_runs["classify"]
    chosen = json.loads((run_dir / "evaluation.json").read_text())
    model_path, json_path = export_run(run_dir, "onnx", tmp_path)
    post = json.loads(json_path.read_text())["postprocessing"]
    assert post["temperature"] == pytest.approx(chosen["temperature"]) and post["selected_on"] == "val"
    has_point = chosen["operating_point"].get("threshold") is not None
    assert post["referral"]["threshold"] == pytest.approx(chosen["operating_point"]["threshold"] if has_point else 0.5)
    trained = load_trained(run_dir)
    photos = sorted((tiny_data / "images").glob("*.jpeg"))[:4]
    preds = predict(trained, photos, quality_gate=False)
    x = normalize(to_float(torch.from_numpy(np.stack([p.seen for p in preds])), "cpu"), *trained.norm)
    z = _run_exported(model_path, "onnx", x) / post["temperature"]             # (4, 5)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, [p.probs for p in preds], atol=1e-4)
    assert [bool(q[2:].sum() >= post["referral"]["threshold"]) for q in probs] == [p.referable for p in preds]


def test_cli_export_prints_both_paths(trained_runs, tmp_path):
    r = run_cli("export", trained_runs["regress"], "--format", "torchscript", "--out", tmp_path / "deploy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(tmp_path / "deploy" / "model.pt"), str(tmp_path / "deploy" / "model.pt.json")]
    bad = run_cli("export", tmp_path / "nowhere", "--format", "onnx")
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such run folder"
