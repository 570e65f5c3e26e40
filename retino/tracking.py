"""A run's numbers, written where labs already look: TensorBoard event files in ``RUN/tb/``.

``tensorboard --logdir checkpoints`` then shows every run beside the lab's other work. Only the
training process's rank 0 writes (the same process that writes ``metrics.jsonl``), and every value
written is one :mod:`retino.train` also wrote to the run folder, so the two can never disagree:

- ``step/loss``, ``step/lr`` at each log point, on the global step;
- each number of an epoch's ``metrics.jsonl`` line on the epoch (``val_qwk`` -> ``val/qwk``,
  ``lr`` -> ``epoch/lr``); a metric that is undefined there (null) is left out here too;
- at the end, the chosen epoch's confusion matrices as figures, and the config as hparams with the
  final test metrics (``test.json``: value and 95% interval) as their results.

A resumed run appends a new event file to the same folder; TensorBoard's reader drops the steps
that the restart repeats (its ``purge_orphaned_data``), so the curves stay single.
"""
from __future__ import annotations

import atexit
import math
from pathlib import Path
from typing import Mapping

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

    from .grades import GRADE_NAMES
    shown = ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(GRADE_NAMES)).plot(
        colorbar=False, xticks_rotation=45)
    shown.ax_.set_title(title)
    shown.figure_.tight_layout()
    return shown.figure_


class Tracker:
    """Writes one run's TensorBoard events; every method is a no-op off rank 0."""

    def __init__(self, run_dir: Path, *, main: bool = True):
        self.writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR))
            # a run that stops or fails returns from the middle of training: still flush what it wrote
            atexit.register(self.close)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("step/loss", loss, global_step)
            self.writer.add_scalar("step/lr", lr, global_step)

    def epoch(self, row: Mapping) -> None:
        """One metrics.jsonl line; flushed, so a killed run's curves stop where its metrics stop."""
        if self.writer is None:
            return
        for tag, value in scalar_tags(row).items():
            self.writer.add_scalar(tag, value, int(row["epoch"]))
        self.writer.flush()

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
