"""Buttons where the CLI has verbs: the Compare page's report, ONNX, TorchScript and run-zip downloads.

The page hands Streamlit a callable per button (built only on click); the test catches each one as
Streamlit registers it and checks what a click would download: a valid zip, a loadable ONNX and
TorchScript model that grade like the run, and the HTML report.
"""
import io
import warnings
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

from conftest import REPO
from retino import paths
from retino.dashboard import downloads
from retino import runs
from retino.inference.trained import load_trained
from test_screen import SIZE, fresh_run

RUN_ID = "20260101-000000-fresh"


@pytest.fixture
def clicks(monkeypatch) -> dict:
    """file name -> the callable Streamlit would run when that download button is clicked."""
    caught = {}
    real = MediaFileManager.add_deferred

    def spy(self, data_callable, mimetype, coordinates, file_name=None, **kw):
        caught[file_name] = data_callable
        return real(self, data_callable, mimetype, coordinates, file_name=file_name, **kw)

    monkeypatch.setattr(MediaFileManager, "add_deferred", spy)
    return caught


def test_compare_page_downloads_a_model_a_zip_and_the_report(clicks):
    run = fresh_run(paths.runs_root() / RUN_ID)
    (run / "last.pt").write_bytes(b"resume state")  # left out of the zip
    (run / ".train.lock").write_text("123")         # left out of the zip
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.session_state["compare.selected"] = [RUN_ID]
    at.run()
    at.switch_page("pages/compare.py").run()
    assert not at.exception, at.exception
    labels = {b.proto.label: b.proto.disabled for b in at.get("download_button")}
    assert {"Download report", "ONNX model", "TorchScript model", "Run files (zip)"} <= set(labels)
    assert not labels["ONNX model"] and not labels["TorchScript model"]

    with zipfile.ZipFile(io.BytesIO(clicks[f"{RUN_ID}.zip"]())) as z:
        assert z.testzip() is None
        names = set(z.namelist())
        assert {f"{RUN_ID}/config.json", f"{RUN_ID}/best.pt", f"{RUN_ID}/metrics.jsonl"} <= names
        assert f"{RUN_ID}/last.pt" not in names and not any("/." in n for n in names)
        assert z.read(f"{RUN_ID}/best.pt") == (run / "best.pt").read_bytes()

    x = np.random.default_rng(0).random((2, 3, SIZE, SIZE), dtype=np.float32)
    expected = load_trained(run).model.eval()(torch.from_numpy(x)).detach().numpy()
    model = onnx.load_from_string(clicks[f"{RUN_ID}.onnx"]())
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit is deprecated; deployments still load it
        scripted = torch.jit.load(io.BytesIO(clicks[f"{RUN_ID}.pt"]()))
    np.testing.assert_allclose(scripted(torch.from_numpy(x)).detach().numpy(), expected, atol=1e-4)

    report = clicks["retino-report.html"]().decode()
    assert report.startswith("<!DOCTYPE html>") and RUN_ID in report and "Each run's config" in report
    assert not (run / "export").exists()  # exporting for a download writes nothing into the run


def test_run_zip_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(runs.RunError, match="not a Retino run folder"):
        downloads.run_zip(tmp_path)
