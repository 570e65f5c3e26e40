"""Predict: grade photographs with a trained run, optionally averaged over test-time augmentation.

``predict`` is the one grading path (:mod:`retino.inference.grading`) over a list of inputs: each photograph
decoded once and preprocessed exactly as the run was trained, judged by the quality gate with the
model's own view (a photo that is not a fundus is not graded; an ungradable one is graded with the
reasons), graded with the run's calibrated probabilities and its referral rule
(:mod:`retino.inference.choices`). It returns one :class:`Prediction` per input, a rejected file included.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import choices, grading, trained as inference
from .choices import PROB_COLS
from ..data import ImageError
from ..grades import GRADE_INFO


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
    referable_why: str | None = None            # why referral and grade part (grade 1 referable, ...), else None
    temperature: float | None = None            # the probabilities' temperature; None: not calibrated
    warnings: list[str] = field(default_factory=list)  # to show beside the result (unreadable EXIF)
    measures: dict | None = field(default=None, repr=False)  # the gate's measures, before the model's view
    heatmap: np.ndarray | None = field(default=None, repr=False)  # (S, S) map from the grading pass (``cam``)
    photo_size: tuple | None = None             # (W, H) of the photo as stored, read from its header

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        """What a clinic does about this eye (``choices.eye_status``): an eye not graded, or graded from an
        ungradable photo, is referred for examination, never passed."""
        return choices.eye_status(self.ok, (self.quality or {}).get("verdict"), self.referable)

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
            out = {"image": self.image, "error": self.error, "status": self.status}
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
                   referable_why=self.referable_why, status=self.status, quality=self.quality,
                   warnings=list(self.warnings))
        return out


def _named(error: ImageError, name: str) -> str:
    """``"<name>: <reason>"`` with the caller's name for the input, whatever name the decoder used."""
    if error.path is not None:
        return f"{name}: {error.reason}"
    text = str(error)
    return text if text.startswith(f"{name}: ") else f"{name}: {text}"


def load(src, trained: inference.Trained, name: str, *, measure: bool = False) -> tuple[Prediction, object]:
    """An input decoded once as a not-yet-graded Prediction and its :class:`retino.inference.grading.Prepared`
    (None when rejected: ``error`` then says why).

    ``measure``: also take the quality gate's measures of the decoded photo.
    """
    try:
        prep = grading.prepare(src, trained.config, name, gate=measure, keep=True)
    except ImageError as e:
        return Prediction(name, error=_named(e, name)), None
    pred = Prediction(name, seen=prep.seen, original=prep.original, crop=prep.crop, mask=prep.mask,
                      warnings=prep.warnings, measures=prep.measures)
    return pred, prep


def fill(pred: Prediction, answer: grading.Answer, trained: inference.Trained) -> None:
    """The Prediction's fields from the grading path's answer."""
    pred.quality = answer.quality
    if answer.refused:
        pred.error = answer.refused
        return
    pred.grade, pred.probs, pred.score = answer.grade, answer.probs, answer.score
    if pred.score is not None:
        pred.thresholds = [float(t) for t in trained.thresholds]
    pred.temperature = trained.temperature if pred.probs is not None else None
    pred.referable_score, pred.referable = answer.referable_score, answer.referable
    pred.referable_threshold, pred.referable_rule, pred.referable_why = answer.threshold, answer.rule, answer.why
    pred.heatmap = answer.heatmap


def predict(run_or_trained, images, *, tta: bool = False, checkpoint: str = "best.pt", batch_size: int = 8,
            quality_gate: bool = True, progress=None, cam: str | None = None,
            engine: str = "auto") -> list[Prediction]:
    """Grade photographs with a run's model, through the one grading path (:func:`retino.inference.grading.grade`).

    Args:
        run_or_trained: a run folder (its ``checkpoint`` is loaded) or a ``retino.inference.trained.Trained``.
        images: paths, bytes, binary file objects (Streamlit uploads) or PIL images; a single one
            is accepted too.
        tta: average over the image, its vertical flip and rotations by ``grading.TTA_ANGLES``
            (calibrated probabilities for a classify head, raw scores for a regress head).
        quality_gate: a photo the gate finds not to be a fundus is not graded (``error`` says why);
            False grades every decodable photo. Either way ``quality`` holds the verdict; where the
            run has an OOD model (``ood.npz``) the model's view, from the grading pass itself, is in it.
        progress: called ``(done, total)`` after each batch (the Predict page's bar).
        cam: a CAM method: each graded photo's ``heatmap`` from the grading pass itself (PyTorch's: a
            map needs gradients).
        engine: what runs the network otherwise: ``auto`` (ONNX Runtime on a CPU, PyTorch on a GPU),
            ``torch`` or ``onnx`` (:mod:`retino.inference.engine`).

    Returns:
        One :class:`Prediction` per input, in order; a rejected input has ``error`` set and no grade.
    """
    trained = inference.as_trained(run_or_trained, checkpoint)
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(images, "read"):
        images = [images]
    images = list(images)
    preds = []
    for start in range(0, len(images), batch_size):
        loaded = [load(src, trained, inference.input_name(src, start + k), measure=True)
                  for k, src in enumerate(images[start:start + batch_size])]
        good = [(p, prep) for p, prep in loaded if prep is not None]
        answers = grading.grade(trained, [prep for _, prep in good], tta=tta, refuse=quality_gate, cam=cam,
                                engine=engine)
        for (p, _), answer in zip(good, answers):
            fill(p, answer, trained)
        preds += [p for p, _ in loaded]
        if progress is not None:
            progress(len(preds), len(images))
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
        row.update({col: (p.probs[g] if p.probs else None) for g, col in enumerate(PROB_COLS)})
        q = p.quality or {}
        row.update(score=p.score, referable=p.referable, quality=q.get("verdict"),
                   reasons="; ".join(q.get("reasons", [])) or None, error=p.error)
        rows.append(row)
    columns = ["image", *(["true_grade"] if truth is not None else []), "grade", "grade_name",
               *PROB_COLS, "score", "referable", "quality", "reasons", "error"]
    table = pd.DataFrame(rows, columns=columns)
    if truth is not None:
        table["true_grade"] = table["true_grade"].astype("Int64")
    return table
