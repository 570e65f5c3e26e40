"""The one grading path: decoded photos in, answers out, for every door that grades a photo.

Predict (page and CLI) is :func:`grade` over a batch of its inputs; Screen is :func:`grade` over a
folder, its worker processes only decoding, preprocessing and measuring each photo once
(:func:`prepare`). One forward pass per photo gives the grade, the calibrated probabilities, the
referable score and the model's own out-of-distribution view for the quality gate; the referral
rule is the run's (:mod:`retino.inference.choices`), with the reason beside any answer where referral and
grade part (a grade-1 photo referable at an operating point below 0.5, say).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import choices, engine as engines, trained as inference, ood, quality
from ..evaluation import metrics
from ..data.augment import normalize

TTA_ANGLES = (10.0, -10.0)  # degrees; well inside training's +-30 (ANCHORS.md: the lab report's augmentation)


@dataclass
class Prepared:
    """What a worker makes of one photo: the model's input and the gate's measures (decoded once)."""

    seen: np.ndarray                     # (S, S, 3) uint8, preprocessed as the run was trained
    measures: dict | None = None         # quality.measure of the decoded photo; None: gate off
    original: object = field(default=None, repr=False)  # the decoded photo (PIL), at most 1024 px
    crop: tuple | None = None            # the fundus box (inference.fundus_crop fractions)
    mask: np.ndarray | None = field(default=None, repr=False)
    warnings: list = field(default_factory=list)


@dataclass
class Answer:
    """One photo's answer: the gate's verdict and, unless refused, grade and referral."""

    quality: dict | None                 # {"verdict", "reasons", ...scores}, the model's view included
    refused: str | None = None           # "not a fundus photograph: <reason>": not graded
    grade: int | None = None
    probs: list | None = None            # classify head: P(grade 0..4) after the run's temperature
    score: float | None = None           # regress head: the raw score
    referable_score: float | None = None
    referable: bool | None = None
    threshold: float | None = None
    rule: str | None = None
    why: str | None = None               # why referral and grade part, else None
    heatmap: np.ndarray | None = None    # (S, S) float32 class-activation map from the grading pass (``cam``)


def prepare(src, config, name: str, *, gate: bool = True, keep: bool = False) -> Prepared:
    """Decode and preprocess one photo as the run was trained and take the gate's measures, once.

    ``config``: the run's ``TrainConfig`` (a worker process holds no model).
    ``keep``: keep the decoded photo (shrunk), the fundus box and the mask for display and maps.

    Raises:
        ImageError: the input was rejected (one line that names it).
    """
    p = inference.prepare_input(src, config, name, keep_photo=gate)
    return Prepared(p.seen, quality.measure(p.photo) if gate else None, p.original if keep else None,
                    p.crop, p.mask if keep else None, p.warnings)


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


def grade(trained: inference.Trained, batch: list[Prepared], *, tta: bool = False, refuse: bool = True,
          engine: str = "auto", fast: bool = False, cam: str | None = None) -> list[Answer]:
    """Answers for a batch of prepared photos, in order: one forward pass (TTA views included).

    ``engine``: what runs the network (:func:`retino.inference.engine.get`: ONNX Runtime on a CPU by
    default); ``fast``: PyTorch's BatchNorm-folded copy where PyTorch runs it (Screen's batches).

    ``refuse``: a photo the gate calls not a fundus is not graded. Where the run has an OOD model,
    its view (from the unaugmented pass) is part of every graded photo's verdict.
    ``cam``: also a class-activation map per photo (``Answer.heatmap``, masked to the fundus) by that
    method (:func:`retino.inference.explain.list_cam_methods`), from the grading pass itself; with ``tta``
    the map comes from a pass of its own over the photos (the views are not explained).
    """
    answers = []
    for p in batch:
        q = quality.judge(p.measures) if p.measures is not None else None
        refused = (f"not a fundus photograph: {q.reasons[0]}" if refuse and q is not None
                   and q.verdict == "not_fundus" else None)
        answers.append(Answer(q.as_dict() if q is not None else None, refused))
    todo = [i for i, a in enumerate(answers) if a.refused is None]
    if not todo:
        return answers
    runner = None if cam is not None and not tta else engines.get(trained, engine, fast=fast)
    device = getattr(runner, "device", None) or inference.device_of(trained)  # ONNX Runtime's: the CPU
    x = inference.unit_input(np.stack([batch[i].seen for i in todo]), device)  # (B, 3, S, S) in [0, 1]
    if tta:
        x = tta_views(x)  # (V*B, 3, S, S); the first B rows are the photos themselves
    b = len(todo)
    heat = None
    if cam is not None:
        from .explain import class_activation_maps
        caught: list = []
        heat, cam_out = class_activation_maps(trained, np.stack([batch[i].seen for i in todo]), [None] * b, cam,
                                              features=caught if (trained.ood is not None and not tta) else None)
    if cam is not None and not tta:  # the map's pass is the grading pass
        out = cam_out.cpu().numpy().astype(np.float64)
        feats = caught[0].cpu().numpy() if caught else None
    else:
        out, feats = runner.run(normalize(x, *trained.norm), trained.ood is not None)
    out = out.reshape(-1, b, out.shape[-1])  # (V, B, K)
    head = trained.config.head
    if head == "regress":
        score = out.mean(0)[:, 0]
        grades, ref, probs = metrics.apply_thresholds(score, trained.thresholds), score, None
    else:
        t = trained.temperature or 1.0
        z = out / t
        z = np.exp(z - z.max(-1, keepdims=True))
        probs = (z / z.sum(-1, keepdims=True)).mean(0)  # mean calibrated probabilities over the views
        grades, ref, score = probs.argmax(1), choices.p_referable(probs), None
    distances = ood.ood_score(feats[:b], trained.ood) if feats is not None else None
    cut, rule = inference.referral(trained)
    trained_on = (trained.ood or {}).get("trained_on") or None
    for j, i in enumerate(todo):
        a, p = answers[i], batch[i]
        if distances is not None and p.measures is not None:
            a.quality = quality.judge(p.measures, ood=(float(distances[j]), float(trained.ood["cutoff"])),
                                      trained_on=trained_on).as_dict()
        a.grade = int(grades[j])
        a.probs = None if probs is None else [float(v) for v in probs[j]]
        a.score = None if score is None else float(score[j])
        a.referable_score = float(ref[j])
        a.referable = bool(a.referable_score >= cut)
        a.threshold, a.rule = cut, rule
        a.why = choices.referral_reason(head, a.grade, a.referable, a.referable_score, cut)
        if heat is not None:
            mask = batch[i].mask
            a.heatmap = heat[j] if mask is None else np.where(mask, heat[j], np.float32(0))
    return answers
