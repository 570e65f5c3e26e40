"""MLflow, optional and real: a tiny run logged to a real ``mlflow server`` (SQLite backend store, local
artifact root, a free port) and read back with ``MlflowClient``; a server that is down warns once and
the run completes. Needs requirements-dev.txt (``make test`` installs it)."""
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import TINY_TRAIN, run_cli
from retino import runs
from retino.training import tracking

mlflow = pytest.importorskip("mlflow", reason="mlflow is in requirements-dev.txt (make test installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    uri = f"http://127.0.0.1:{port}"
    end = time.time() + 240  # the first start migrates the SQLite schema: slow on a loaded machine
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > end:
            proc.kill()
            pytest.fail(f"mlflow server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
def test_a_run_logged_to_a_real_mlflow_server_reads_back(server, tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, "--mlflow", server, *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    assert "MLflow" not in r.stderr  # no failure warning
    run_id = runs.read_json(run / "mlflow.json")["run_id"]
    client = MlflowClient(tracking_uri=server)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    config = json.loads((run / "config.json").read_text())["train"]
    assert got.data.params["arch"] == config["arch"] and got.data.params["epochs"] == str(config["epochs"])
    rows = runs.read_metrics(run)
    for tag in ("val/qwk", "test/acc", "train/loss"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, tag)}
        expected = {row["epoch"]: tracking.scalar_tags(row)[tag] for row in rows if tag in tracking.scalar_tags(row)}
        assert history.keys() == expected.keys()
        for epoch, value in expected.items():
            assert history[epoch] == pytest.approx(value, rel=1e-6)
    assert client.get_metric_history(run_id, "step/loss")
    test = runs.read_json(run / "test.json")
    for part, suffix in (("value", ""), ("lo", "_lo"), ("hi", "_hi")):
        assert got.data.metrics[f"final/test_qwk{suffix}"] == pytest.approx(test["metrics"]["qwk"][part])
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"evaluation.json", "test.json", "predictions.csv", "confusion_test.png", "model"} <= top
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/model.onnx", "model/model.onnx.json"}  # each format its own JSON
    local = client.download_artifacts(run_id, "test.json", str(tmp_path / "back"))
    assert json.loads(open(local).read()) == test


@pytest.mark.slow
def test_a_server_that_is_down_warns_once_and_training_completes(tiny_data, tmp_path):
    run = tmp_path / "run"
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    r = run_cli("train", "--data", tiny_data, "--run-dir", run, "--mlflow", down, *TINY_TRAIN)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "MLflow logging" in line]
    assert len(warnings) == 1 and down in warnings[0] and "training goes on" in warnings[0]
    assert runs.read_status(run)["state"] == "completed" and (run / "test.json").is_file()
    assert not (run / "mlflow.json").exists()
