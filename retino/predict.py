"""Predict: grade photographs with a trained run, optionally averaged over test-time augmentation.

``predict`` decodes and preprocesses each photograph exactly as the run was trained (through
:mod:`retino.inference`) and returns one :class:`Prediction` per input, a rejected file included.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import inference
from .data import ImageError
from .grades import GRADE_INFO, GRADES

TTA_ANGLES = (10.0, -10.0)  # degrees; well inside training's +-30 (ANCHORS.md: the lab report's augmentation)


@dataclass
class Prediction:
    """One photograph's grade, or the one-line reason it was rejected (``error``)."""

    image: str                                  # path as given, upload name, or "image N"
    grade: int | None = None
    probs: list[float] | None = None            # classify head: P(grade 0..4)
    score: float | None = None                  # regress head: the raw score ...
    thresholds: list[float] | None = None       # ... and the cut points that made it a grade
    seen: np.ndarray | None = field(default=None, repr=False)      # (S, S, 3) uint8: what the model saw
    original: Image.Image | None = field(default=None, repr=False)  # the decoded photo, at most 1024 px
    crop: tuple | None = field(default=None, repr=False)  # the fundus box in ``original`` (inference.fundus_crop)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def grade_name(self) -> str | None:
        """The ICDR name of the grade (``"Moderate NPDR"``); None for a rejected input."""
        return GRADE_INFO[self.grade]["name"] if self.grade is not None else None

    def as_dict(self) -> dict:
        """JSON-safe: ``{"image", "grade", "grade_name", "probs"[, "score", "thresholds"]}`` or
        ``{"image", "error"}``."""
        if self.error:
            return {"image": self.image, "error": self.error}
        out = {"image": self.image, "grade": self.grade, "grade_name": self.grade_name, "probs": self.probs}
        if self.score is not None:
            out.update(score=self.score, thresholds=self.thresholds)
        return out


def load(src, trained: inference.Trained, name: str) -> Prediction:
    """An input prepared for the model as a not-yet-graded Prediction; ``error`` set when rejected."""
    try:
        seen, original, crop = inference.prepare(src, trained.config, name)
    except ImageError as e:
        return Prediction(name, error=str(e))
    return Prediction(name, seen=seen, original=original, crop=crop)


def tta_views(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> (V*B, 3, S, S): itself, vertically flipped, and rotated by TTA_ANGLES.

    No horizontal flip: left and right eyes are mirror images (the lab report's augmentation).
    """
    views = [x, x.flip(2)]
    for deg in TTA_ANGLES:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3).to(x.device), list(x.shape), align_corners=False)
        views.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    return torch.cat(views)


def fill(pred: Prediction, out: torch.Tensor, trained: inference.Trained) -> None:
    """Grade, probabilities or score from one image's output row."""
    pred.grade, pred.probs, pred.score = inference.read_output(out, trained)
    if pred.score is not None:
        pred.thresholds = [float(t) for t in trained.thresholds]


def predict(run_or_trained, images, *, tta: bool = False, checkpoint: str = "best.pt",
            batch_size: int = 8) -> list[Prediction]:
    """Grade photographs with a run's model.

    Args:
        run_or_trained: a run folder (its ``checkpoint`` is loaded) or a ``retino.inference.Trained``.
        images: paths, bytes, binary file objects (Streamlit uploads) or PIL images; a single one
            is accepted too.
        tta: average over the image, its vertical flip and rotations by ``TTA_ANGLES``
            (softmax probabilities for a classify head, raw scores for a regress head).

    Returns:
        One :class:`Prediction` per input, in order; a rejected input has ``error`` set and no grade.
    """
    trained = inference.as_trained(run_or_trained, checkpoint)
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(images, "read"):
        images = [images]
    preds = [load(src, trained, inference.input_name(src, i)) for i, src in enumerate(images)]
    good = [p for p in preds if p.ok]
    device = inference.device_of(trained)
    for start in range(0, len(good), batch_size):
        chunk = good[start:start + batch_size]
        x = inference.unit_input(np.stack([p.seen for p in chunk]), device)  # (B, 3, S, S) in [0, 1]
        if tta:
            x = tta_views(x)  # (V*B, 3, S, S)
        out = inference.forward(trained, x)  # (V*B, K)
        if tta:
            out = out.view(-1, len(chunk), out.shape[-1])  # (V, B, K)
            # mean score, or mean probabilities (as log-probabilities, which fill's softmax turns back)
            out = out.mean(0) if trained.config.head == "regress" else out.softmax(-1).mean(0).log()
        for p, row in zip(chunk, out):
            fill(p, row, trained)
    return preds


def predictions_table(preds: list[Prediction], truth: dict | None = None):
    """One row per prediction: image, [true_grade,] grade, grade_name, p0..p4, score, error.

    ``truth``: image name -> known grade (labelled samples); adds the ``true_grade`` column.
    """
    import pandas as pd
    rows = []
    for p in preds:
        row = {"image": p.image}
        if truth is not None:
            row["true_grade"] = truth.get(p.image)
        row.update(grade=p.grade, grade_name=p.grade_name)
        row.update({f"p{g}": (p.probs[g] if p.probs else None) for g in GRADES})
        row.update(score=p.score, error=p.error)
        rows.append(row)
    columns = ["image", *(["true_grade"] if truth is not None else []), "grade", "grade_name",
               *(f"p{g}" for g in GRADES), "score", "error"]
    table = pd.DataFrame(rows, columns=columns)
    if truth is not None:
        table["true_grade"] = table["true_grade"].astype("Int64")
    return table
