"""Predict: grade photographs with a trained run, optionally averaged over test-time augmentation.

``predict`` decodes and preprocesses each photograph exactly as the run was trained (through
:mod:`retino.inference`), puts it through the quality gate (:mod:`retino.quality`: a photo that is
not a fundus is not graded; an ungradable one is graded with the reasons), grades it with the run's
calibrated probabilities and says whether it is referable at the run's operating point. It returns
one :class:`Prediction` per input, a rejected file included.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import inference, ood, quality
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
    mask: np.ndarray | None = field(default=None, repr=False)  # (S, S) bool: preprocess's boundary_mask
    error: str | None = None                    # "<image>: <reason>", or "not a fundus photograph: <reason>"
    quality: dict | None = None                 # the gate's verdict: {"verdict", "reasons", ...scores}
    referable: bool | None = None               # referable DR (grade >= 2) by ``referable_rule``
    referable_score: float | None = None        # P(grade >= 2) after the temperature, or the raw score
    referable_threshold: float | None = None
    referable_rule: str | None = None           # the rule in words: the run's operating point or the default
    temperature: float | None = None            # the probabilities' temperature; None: not calibrated
    warnings: list[str] = field(default_factory=list)  # to show beside the result (unreadable EXIF)
    measures: dict | None = field(default=None, repr=False)  # the gate's measures, before the model's view

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reason(self) -> str | None:
        """``error`` without the image's name in front, for a caller that names the image itself."""
        return None if self.error is None else self.error.removeprefix(f"{self.image}: ")

    @property
    def grade_name(self) -> str | None:
        """The ICDR name of the grade (``"Moderate NPDR"``); None for a rejected input."""
        return GRADE_INFO[self.grade]["name"] if self.grade is not None else None

    def as_dict(self) -> dict:
        """JSON-safe: ``{"image", "grade", "grade_name", "probs"[, "score", "thresholds"], "temperature",
        "referable", "referable_score", "referable_threshold", "referable_rule", "quality", "warnings"}``,
        or ``{"image", "error"[, "quality"][, "warnings"]}`` for a rejected input (``quality`` where
        the photo was decoded and judged)."""
        if self.error:
            out = {"image": self.image, "error": self.error}
            if self.quality is not None:
                out["quality"] = self.quality
            if self.warnings:
                out["warnings"] = list(self.warnings)
            return out
        out = {"image": self.image, "grade": self.grade, "grade_name": self.grade_name, "probs": self.probs}
        if self.score is not None:
            out.update(score=self.score, thresholds=self.thresholds)
        out.update(temperature=self.temperature, referable=self.referable, referable_score=self.referable_score,
                   referable_threshold=self.referable_threshold, referable_rule=self.referable_rule,
                   quality=self.quality, warnings=list(self.warnings))
        return out


def _named(error: ImageError, name: str) -> str:
    """``"<name>: <reason>"`` with the caller's name for the input, whatever name the decoder used."""
    if error.path is not None:
        return f"{name}: {error.reason}"
    text = str(error)
    return text if text.startswith(f"{name}: ") else f"{name}: {text}"


def load(src, trained: inference.Trained, name: str, *, measure: bool = False) -> Prediction:
    """An input prepared for the model as a not-yet-graded Prediction; ``error`` set when rejected.

    ``measure``: also take the quality gate's measures of the decoded photo (``Prediction.measures``).
    """
    try:
        p = inference.prepare_input(src, trained.config, name, keep_photo=measure)
    except ImageError as e:
        return Prediction(name, error=_named(e, name))
    pred = Prediction(name, seen=p.seen, original=p.original, crop=p.crop, mask=p.mask, warnings=p.warnings)
    if measure:
        pred.measures = quality.measure(p.photo)
    return pred


def _gate(pred: Prediction, refuse: bool) -> None:
    """The photo's own verdict; with ``refuse``, a photo that is not a fundus gets its error (not graded)."""
    q = quality.judge(pred.measures)
    pred.quality = q.as_dict()
    if refuse and q.verdict == "not_fundus":
        pred.error = f"not a fundus photograph: {q.reasons[0]}"


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
    """Grade, probabilities or score, and the referral, from one image's output row."""
    pred.grade, pred.probs, pred.score = inference.read_output(out, trained)
    if pred.score is not None:
        pred.thresholds = [float(t) for t in trained.thresholds]
    pred.temperature = trained.temperature if pred.probs is not None else None
    pred.referable_threshold, pred.referable_rule = inference.referral(trained)
    pred.referable_score = inference.referable_score(pred.probs, pred.score)
    pred.referable = pred.referable_score >= pred.referable_threshold


def _model_view(trained: inference.Trained) -> str | None:
    return (trained.ood or {}).get("trained_on") or None


def predict(run_or_trained, images, *, tta: bool = False, checkpoint: str = "best.pt", batch_size: int = 8,
            quality_gate: bool = True) -> list[Prediction]:
    """Grade photographs with a run's model.

    Args:
        run_or_trained: a run folder (its ``checkpoint`` is loaded) or a ``retino.inference.Trained``.
        images: paths, bytes, binary file objects (Streamlit uploads) or PIL images; a single one
            is accepted too.
        tta: average over the image, its vertical flip and rotations by ``TTA_ANGLES``
            (calibrated probabilities for a classify head, raw scores for a regress head).
        quality_gate: a photo the gate finds not to be a fundus is not graded (``error`` says why);
            False grades every decodable photo. Either way ``quality`` holds the verdict; where the
            run has an OOD model (``ood.npz``) the model's view, from the grading pass itself, is in it.

    Returns:
        One :class:`Prediction` per input, in order; a rejected input has ``error`` set and no grade.
    """
    trained = inference.as_trained(run_or_trained, checkpoint)
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(images, "read"):
        images = [images]
    preds = [load(src, trained, inference.input_name(src, i), measure=True) for i, src in enumerate(images)]
    for p in preds:
        if p.ok:
            _gate(p, refuse=quality_gate)
    good = [p for p in preds if p.ok]
    device = inference.device_of(trained)
    for start in range(0, len(good), batch_size):
        chunk = good[start:start + batch_size]
        x = inference.unit_input(np.stack([p.seen for p in chunk]), device)  # (B, 3, S, S) in [0, 1]
        if tta:
            x = tta_views(x)  # (V*B, 3, S, S); the first B rows are the photos themselves
        if trained.ood is not None:
            out, feats = inference.forward_features(trained, x)  # (V*B, K), (V*B, d): one pass
            distances = ood.ood_score(feats[:len(chunk)].cpu().numpy(), trained.ood)  # (B,) unaugmented views
            for p, d in zip(chunk, distances):
                p.quality = quality.judge(p.measures, ood=(d, trained.ood["cutoff"]),
                                          trained_on=_model_view(trained)).as_dict()
        else:
            out = inference.forward(trained, x)  # (V*B, K)
        if tta:
            out = out.view(-1, len(chunk), out.shape[-1])  # (V, B, K)
            # mean score, or mean calibrated probabilities as T * log(p): read_output's softmax(. / T)
            # turns them back into p exactly (the mean sums to 1)
            out = out.mean(0) if trained.config.head == "regress" else \
                inference.calibrated(out, trained).mean(0).log() * (trained.temperature or 1.0)
        for p, row in zip(chunk, out):
            fill(p, row, trained)
    return preds


def predictions_table(preds: list[Prediction], truth: dict | None = None):
    """One row per prediction: image, [true_grade,] grade, grade_name, p0..p4, score, referable,
    quality, reasons, error.

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
        q = p.quality or {}
        row.update(score=p.score, referable=p.referable, quality=q.get("verdict"),
                   reasons="; ".join(q.get("reasons", [])) or None, error=p.error)
        rows.append(row)
    columns = ["image", *(["true_grade"] if truth is not None else []), "grade", "grade_name",
               *(f"p{g}" for g in GRADES), "score", "referable", "quality", "reasons", "error"]
    table = pd.DataFrame(rows, columns=columns)
    if truth is not None:
        table["true_grade"] = table["true_grade"].astype("Int64")
    return table
