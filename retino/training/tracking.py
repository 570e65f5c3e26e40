"""A run's numbers, written where labs already look: TensorBoard event files in ``RUN/tb/``.

``tensorboard --logdir checkpoints`` then shows every run beside the lab's other work. Only the
training process's rank 0 writes (the same process that writes ``metrics.jsonl``), and every value
written is one :mod:`retino.training.train` also wrote to the run folder, so the two can never disagree:

- ``step/loss``, ``step/lr`` at each log point, on the global step;
- each number of an epoch's ``metrics.jsonl`` line on the epoch (``val_qwk`` -> ``val/qwk``,
  ``lr`` -> ``epoch/lr``); a metric that is undefined there (null) is left out here too;
- at the end, the chosen epoch's confusion matrices as figures, and the config as hparams with the
  final test metrics (``test.json``: value and 95% interval) as their results.

With ``MLFLOW_TRACKING_URI`` set (``train --mlflow URI`` sets it), the same numbers also go to an
MLflow tracking server (:class:`MlflowSink`): the config as params, the epoch metrics, the final test
metrics with their intervals, and evaluation.json, test.json, predictions.csv, the confusion figure and
the exported ONNX model as artifacts. MLflow is optional and never stops training: the first failure
(server down, no ``mlflow`` installed) warns once and the run goes on without it.

A resumed run appends a new event file to the same folder; TensorBoard's reader drops the steps
that the restart repeats (its ``purge_orphaned_data``), so the curves stay single.
"""
from __future__ import annotations

import atexit
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping
from .. import fileio

TB_DIR = "tb"
_SPLITS = ("train", "val", "test")


def scalar_tags(row: Mapping) -> dict[str, float]:
    """An epoch line's numbers under their TensorBoard tags (``val_qwk`` -> ``val/qwk``)."""
    out = {}
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        split, _, rest = key.partition("_")
        out[f"{split}/{rest}" if split in _SPLITS and rest else f"epoch/{key}"] = float(value)
    return out


def _hparam(value):
    """hparams take numbers, strings and bools only: anything else (lists, None) as its text."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def confusion_figure(matrix, title: str):
    """A confusion matrix as a matplotlib figure (scikit-learn's display), for TensorBoard's image tab."""
    import matplotlib
    matplotlib.use("Agg")  # no display in a training process
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    from ..grades import GRADE_NAMES
    shown = ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(GRADE_NAMES)).plot(
        colorbar=False, xticks_rotation=45)
    shown.ax_.set_title(title)
    shown.figure_.tight_layout()
    return shown.figure_


class Tracker:
    """Writes one run's TensorBoard events; every method is a no-op off rank 0."""

    def __init__(self, run_dir: Path, *, main: bool = True, config: Mapping | None = None):
        self.writer = None
        uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        self.mlflow = MlflowSink(uri, Path(run_dir), config or {}) if main and uri else None
        if main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR))
            # a run that stops or fails returns from the middle of training: still flush what it wrote
            atexit.register(self.close)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("step/loss", loss, global_step)
            self.writer.add_scalar("step/lr", lr, global_step)
        if self.mlflow:
            self.mlflow.buffer({"step/loss": loss, "step/lr": lr}, global_step)

    def epoch(self, row: Mapping) -> None:
        """One metrics.jsonl line; flushed, so a killed run's curves stop where its metrics stop."""
        if self.writer is None:
            return
        for tag, value in scalar_tags(row).items():
            self.writer.add_scalar(tag, value, int(row["epoch"]))
        self.writer.flush()
        if self.mlflow:
            self.mlflow.buffer(scalar_tags(row), int(row["epoch"]))
            self.mlflow.flush()

    def finish(self, config: Mapping, best_row: Mapping | None, test: Mapping | None) -> None:
        """The chosen epoch's confusion matrices and the config with its final test metrics; closes."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams
        epoch = int((best_row or {}).get("epoch") or 0)
        for split in ("val", "test"):
            matrix = (test or {}).get("confusion") if split == "test" else None
            matrix = matrix or (best_row or {}).get(f"{split}_confusion")
            if matrix:
                self.writer.add_figure(f"confusion/{split}", confusion_figure(
                    matrix, f"{split}, epoch {epoch} (chosen on val)"), epoch, close=True)
        results = final_metrics(test)
        if results:
            # hparams' own summary (what SummaryWriter.add_hparams writes), but into this run's event
            # file instead of a new timestamped sub-folder, so one run stays one row in the HParams tab
            for summary in hparams({k: _hparam(v) for k, v in config.items()}, results):
                self.writer.file_writer.add_summary(summary)
            for tag, value in results.items():
                self.writer.add_scalar(tag, value, epoch)
        if self.mlflow:
            self.mlflow.finish(results, epoch, best_row, test)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            atexit.unregister(self.close)


def final_metrics(test: Mapping | None) -> dict[str, float]:
    """test.json's metrics as ``final/test_<metric>`` (and ``_lo`` / ``_hi`` for the 95% interval)."""
    out = {}
    for name, m in ((test or {}).get("metrics") or {}).items():
        for part, suffix in (("value", ""), ("lo", "_lo"), ("hi", "_hi")):
            value = m.get(part) if isinstance(m, Mapping) else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"final/test_{name}{suffix}"] = float(value)
    return out


class MlflowSink:
    """One Retino run as one MLflow run (experiment "retino"), through ``MlflowClient``; never raises.

    Metrics are sent once an epoch (the log points' loss and lr buffered until then), so a slow server
    costs one request an epoch, not one a step. The MLflow run id is kept in ``RUN/mlflow.json`` so a
    resumed run logs into the same MLflow run.
    """

    EXPERIMENT = "retino"

    def __init__(self, uri: str, run_dir: Path, config: Mapping):
        self.uri, self.run_dir, self.client, self.run_id, self.pending = uri, run_dir, None, None, []
        # a server that is down must cost seconds, not MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self._safely("start", self._start, config)

    def _safely(self, what: str, fn, *args) -> None:
        if self.client is None and what != "start":
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any failure of an optional logger: warn once, train on
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            print(f"warning: MLflow logging to {self.uri} failed ({what}: {first}); training goes on without "
                  f"MLflow", file=sys.stderr, flush=True)
            self.client = None

    def _start(self, config: Mapping) -> None:
        from mlflow.tracking import MlflowClient
        from .. import runs
        client = MlflowClient(tracking_uri=self.uri)
        try:
            run_id = runs.read_json(self.run_dir / "mlflow.json").get("run_id")
        except runs.RunError:
            run_id = None
        if run_id:
            client.update_run(run_id, status="RUNNING")
        else:
            exp = client.get_experiment_by_name(self.EXPERIMENT)
            exp_id = exp.experiment_id if exp else client.create_experiment(self.EXPERIMENT)
            run_id = client.create_run(exp_id, run_name=self.run_dir.name,
                                       tags={"retino.run_dir": str(self.run_dir.resolve())}).info.run_id
            from mlflow.entities import Param
            params = [Param(k, str(v)[:6000]) for k, v in config.items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(run_id, params=params[i:i + 100])
            fileio.write_json(self.run_dir / "mlflow.json", {"run_id": run_id, "tracking_uri": self.uri})
        self.client, self.run_id = client, run_id

    def buffer(self, values: Mapping[str, float], step: int) -> None:
        if self.client is not None:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            self.pending += [Metric(k, float(v), now, int(step)) for k, v in values.items()]

    def flush(self) -> None:
        def send():
            while self.pending:  # MLflow takes at most 1000 metrics a batch
                batch, self.pending = self.pending[:1000], self.pending[1000:]
                self.client.log_batch(self.run_id, metrics=batch)
        self._safely("metrics", send)
        self.pending = []

    def finish(self, results: Mapping[str, float], epoch: int, best_row: Mapping | None, test: Mapping | None) -> None:
        self.buffer(results, epoch)
        self.flush()
        self._safely("artifacts", self._artifacts, best_row, test, epoch)
        self._safely("end", lambda: self.client.set_terminated(self.run_id, "FINISHED"))

    def _artifacts(self, best_row, test, epoch: int) -> None:
        for name in ("evaluation.json", "test.json", "predictions.csv"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        matrix = (test or {}).get("confusion") or (best_row or {}).get("test_confusion")
        if matrix:
            self.client.log_figure(self.run_id, confusion_figure(matrix, f"test, epoch {epoch} (chosen on val)"),
                                   "confusion_test.png")
        from ..inference.export import export_run
        with tempfile.TemporaryDirectory(prefix="retino-mlflow-") as tmp:
            # the trainer itself, after its final evaluation: its status turns "completed" only after this
            model, info = export_run(self.run_dir, "onnx", Path(tmp), unfinished=True)
            self.client.log_artifact(self.run_id, str(model), "model")
            self.client.log_artifact(self.run_id, str(info), "model")
