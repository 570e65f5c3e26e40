"""Predict and explain: grade photographs with a trained run and show where the model looked.

``predict`` decodes and preprocesses each photograph exactly as the run was trained (its own image
size, Ben Graham setting and normalisation, never today's widget values) and returns one
:class:`Prediction` per input, a rejected file included. ``explain`` runs a class-activation map
from pytorch-grad-cam on what the model saw. ``cam_score`` measures on the synthetic set, whose
lesion masks are known, how often the map points at a lesion compared with a random map.

A model shared across Streamlit sessions is hooked by one request at a time: every forward pass
here holds a per-model lock (CAM hooks would otherwise record another request's activations).
"""
from __future__ import annotations

import json
import math
import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from . import metrics
from .data import ImageError, load_image, preprocess, read_dataset
from .data.loaders import normalize, to_float
from .data.preprocess import MAX_PIXELS, _to_rgb, fundus_bbox
from .config import TrainConfig
from .evaluate import Trained, load_trained
from .models import normalization

# ICDR severity scale (Wilkinson et al. 2003), as in ANCHORS.md.
GRADE_INFO: dict[int, dict[str, str]] = {
    0: {"name": "No apparent retinopathy", "description": "No abnormalities."},
    1: {"name": "Mild NPDR", "description": "Microaneurysms only."},
    2: {"name": "Moderate NPDR", "description": "More than microaneurysms (haemorrhages, hard exudates, "
                                                "cotton-wool spots) but less than severe NPDR."},
    3: {"name": "Severe NPDR", "description": "More than 20 haemorrhages in each of 4 quadrants, venous beading "
                                              "in 2 or more quadrants, or IRMA in 1 or more (the 4-2-1 rule); "
                                              "no signs of proliferation."},
    4: {"name": "Proliferative DR", "description": "Neovascularisation, or vitreous or preretinal haemorrhage."},
}

# name -> pytorch-grad-cam class. On these ResNets (global average pool, then one linear layer) the
# gradient at layer4 is the same at every position, so HiResCAM's map equals Grad-CAM's (Draelos &
# Carin 2020, "Use HiResCAM instead of Grad-CAM"); it is listed because people look for it by name.
# XGradCAM, equal to Grad-CAM for the same reason, is left out.
CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "eigencam": EigenCAM,
               "layercam": LayerCAM}
TARGET_FREE = ("eigencam",)  # methods whose map does not depend on the grade explained
TTA_ANGLES = (10.0, -10.0)  # degrees; well inside training's +-30 (ANCHORS.md: the lab report's augmentation)
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Module -> threading.Lock
_LOCKS_GUARD = threading.Lock()


def list_cam_methods() -> list[str]:
    """Names ``explain`` accepts, for the UI and the CLI."""
    return list(CAM_METHODS)


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
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict:
        """JSON-safe: ``{"image", "grade", "probs"[, "score", "thresholds"]}`` or ``{"image", "error"}``."""
        if self.error:
            return {"image": self.image, "error": self.error}
        out = {"image": self.image, "grade": self.grade, "probs": self.probs}
        if self.score is not None:
            out.update(score=self.score, thresholds=self.thresholds)
        return out


@dataclass
class Explanation:
    """A class-activation map on what the model saw, and the prediction of the same forward pass."""

    heatmap: np.ndarray          # (S, S) float32 in [0, 1]
    overlay: np.ndarray          # (S, S, 3) uint8 RGB: the map blended over the preprocessed photo
    method: str
    target: int | None           # the grade explained; None for a regress head (the raw score is)
    contrast: int | None         # ... against this grade (see GradeTarget); None: the raw logit
    grade: int
    probs: list[float] | None
    score: float | None


# ----------------------------------------------------------------------------- models and inputs

def _as_trained(run_dir_or_model, checkpoint: str = "best.pt") -> Trained:
    if isinstance(run_dir_or_model, (str, os.PathLike)):
        return load_trained(run_dir_or_model, checkpoint)
    if hasattr(run_dir_or_model, "model") and hasattr(run_dir_or_model, "config"):
        return run_dir_or_model
    raise TypeError(f"expected a run folder or a retino.evaluate.Trained, got {type(run_dir_or_model).__name__}")


def _lock_for(model: torch.nn.Module) -> threading.Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


def _name(src, i: int) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return str(getattr(src, "name", None) or f"image {i + 1}")


def _decode(src, size: int, name: str) -> Image.Image:
    """RGB PIL image from a path, bytes, file object or PIL image (EXIF honoured, bombs refused)."""
    if isinstance(src, Image.Image):  # decoded already: only the size check and the mode are left
        w, h = src.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{name}: {w} x {h} pixels is larger than the {MAX_PIXELS / 1e6:.0f} MP limit")
        return _to_rgb(ImageOps.exif_transpose(src))
    if not isinstance(src, (str, os.PathLike, bytes, bytearray)) and not hasattr(src, "read"):
        raise ImageError(f"{name}: expected a path, bytes, a file object or a PIL image, "
                         f"got {type(src).__name__}")
    if hasattr(src, "seek"):  # a Streamlit upload read by an earlier rerun starts at its end
        src.seek(0)
    return load_image(src, target=size)


def _load_for_model(src, trained: Trained, name: str) -> Prediction:
    """Decode and preprocess one input as the run was trained; ``error`` set when it is rejected."""
    cfg = trained.config
    try:
        img = _decode(src, cfg.image_size, name)
        seen = preprocess(img, cfg.image_size, ben_graham_norm=cfg.ben_graham)
    except ImageError as e:
        return Prediction(name, error=str(e))
    except (OSError, ValueError, cv2.error) as e:  # anything else a malformed file can raise while decoding
        return Prediction(name, error=f"{name}: cannot be decoded: {str(e).splitlines()[0] if str(e) else e!r}")
    img.thumbnail((1024, 1024))
    return Prediction(name, seen=seen, original=img)


def _to_input(seen: np.ndarray, norm, device) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> normalised (B, 3, S, S) float on ``device``."""
    return normalize(to_float(torch.from_numpy(np.ascontiguousarray(seen)), device), *norm)


def _tta_views(x: torch.Tensor) -> torch.Tensor:
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


def _fill(pred: Prediction, out: torch.Tensor, trained: Trained) -> None:
    """Grade, probabilities or score from one image's output row."""
    out = out.float().cpu()
    if trained.config.head == "regress":
        pred.score = float(out.view(-1)[0])
        pred.thresholds = [float(t) for t in trained.thresholds]
        pred.grade = int(metrics.apply_thresholds([pred.score], pred.thresholds)[0])
    else:
        probs = out.softmax(-1)
        pred.probs = [float(p) for p in probs]
        pred.grade = int(probs.argmax())


# ----------------------------------------------------------------------------- predict

def predict(run_dir_or_model, images, *, tta: bool = False, checkpoint: str = "best.pt",
            batch_size: int = 8) -> list[Prediction]:
    """Grade photographs with a run's model.

    Args:
        run_dir_or_model: a run folder (its ``checkpoint`` is loaded) or a ``retino.evaluate.Trained``.
        images: paths, bytes, binary file objects (Streamlit uploads) or PIL images; a single one
            is accepted too.
        tta: average over the image, its vertical flip and rotations by ``TTA_ANGLES``
            (softmax probabilities for a classify head, raw scores for a regress head).

    Returns:
        One :class:`Prediction` per input, in order; a rejected input has ``error`` set and no grade.
    """
    trained = _as_trained(run_dir_or_model, checkpoint)
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(images, "read"):
        images = [images]
    preds = [_load_for_model(src, trained, _name(src, i)) for i, src in enumerate(images)]
    good = [p for p in preds if p.ok]
    model = trained.model
    device = next(model.parameters()).device
    for start in range(0, len(good), batch_size):
        chunk = good[start:start + batch_size]
        x = to_float(torch.from_numpy(np.stack([p.seen for p in chunk])), device)  # (B, 3, S, S) in [0, 1]
        if tta:
            x = _tta_views(x)  # (V*B, 3, S, S)
        with _lock_for(model), torch.inference_mode():
            model.eval()
            out = model(normalize(x, *trained.norm)).float()  # (V*B, K)
        if tta:
            out = out.view(-1, len(chunk), out.shape[-1])  # (V, B, K)
            # mean score, or mean probabilities (as log-probabilities, which _fill's softmax turns back)
            out = out.mean(0) if trained.config.head == "regress" else out.softmax(-1).mean(0).log()
        for p, row in zip(chunk, out):
            _fill(p, row, trained)
    return preds


# ----------------------------------------------------------------------------- explain

def _cut_below(module, inputs, output):
    """Forward hook: the target layer's output as a leaf, so backward stops there.

    Every CAM here needs only d(target)/d(activations) at the target layer; letting backward run on
    computes gradients for the 11-23M weights below it that nobody reads: on a 2-core CPU at 512 px
    the map then takes 2x (ResNet-18) to 2.5x (ResNet-50) as long (bench/predict_cam.py). The map
    is identical (tests/test_explain.py).
    """
    return output.detach().requires_grad_(True)


class GradeTarget:
    """What a CAM explains for one image of a classify head: a grade's log-odds against another.

    ``logit[grade] - logit[contrast]`` (grade None = the image's predicted grade). Against grade 0
    the map answers "where is the evidence for this grade rather than a healthy eye": a raw logit
    of a softmax also carries what raises every grade alike, which changes no probability (on the
    synthetic set's demo run the pointing-game hit rate rises from random + 0.09 to random + 0.21).
    This is Finer-CAM's ``FinerWeightedTarget(grade, [contrast], alpha=1)``; ``contrast`` None, or
    equal to the grade, explains the raw logit as ``ClassifierOutputTarget`` does.
    """

    def __init__(self, grade: int | None = None, contrast: int | None = 0):
        self.grade, self.contrast = grade, contrast

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # (K,) one image's outputs
        g = int(logits.argmax()) if self.grade is None else self.grade
        if self.contrast is None or self.contrast == g:
            return logits[g]
        return logits[g] - logits[self.contrast]


def _check_grade(value, n_out: int, what: str) -> None:
    # checked before the CAM runs: its context manager swallows the IndexError a bad grade raises
    if value is not None and not (isinstance(value, (int, np.integer)) and 0 <= value < n_out):
        raise ValueError(f"{what} must be one of 0..{n_out - 1}, got {value!r}")


def _cams(trained: Trained, seen: np.ndarray, targets: list[int | None], method: str,
          contrast: int | None = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Maps (B, S, S) float32 in [0, 1] and model outputs (B, K) for a batch of preprocessed images."""
    if method not in CAM_METHODS:
        raise ValueError(f"Invalid CAM method {method!r}. Choose one of: {', '.join(CAM_METHODS)}.")
    model = trained.model
    if not hasattr(model, "layer4"):
        raise ValueError(f"{type(model).__name__} has no layer4: explain expects a Retino ResNet")
    if trained.config.head == "regress":  # one output, the raw score: explain what raises it
        cam_targets = [ClassifierOutputTarget(0) for _ in targets]
    else:
        n_out = model.fc.out_features
        _check_grade(contrast, n_out, "contrast grade")
        for t in targets:
            _check_grade(t, n_out, "target grade")
        cam_targets = [GradeTarget(None if t is None else int(t), contrast) for t in targets]
    device = next(model.parameters()).device
    maps = None
    layer = model.layer4[-1]
    with _lock_for(model), torch.inference_mode(False), torch.enable_grad():  # CAMs need autograd
        x = _to_input(seen, trained.norm, device)  # (B, 3, S, S)
        hook = layer.register_forward_hook(_cut_below)  # registered first, so it runs before the CAM's hooks
        try:
            with CAM_METHODS[method](model=model, target_layers=[layer]) as cam:
                maps = cam(input_tensor=x, targets=cam_targets)  # (B, S, S)
                outputs = cam.outputs.detach().float()  # (B, K): the prediction of the same pass
        finally:
            hook.remove()
    if maps is None:
        raise RuntimeError(f"{method} produced no map (see the message printed above)")
    return np.clip(np.nan_to_num(maps.astype(np.float32)), 0.0, 1.0), outputs


def overlay(seen: np.ndarray, heatmap: np.ndarray, *, image_weight: float = 0.5) -> np.ndarray:
    """The heat map blended over a preprocessed uint8 image: (S, S, 3) uint8 RGB."""
    rgb = seen.astype(np.float32) / 255.0  # the de-normalised model input, in [0, 1]
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=float(image_weight))


def explain(model, image, *, method: str = "gradcam", target: int | None = None, contrast: int | None = 0,
            image_weight: float = 0.5) -> Explanation:
    """Class-activation map of one image at the model's last residual block (``layer4[-1]``).

    Args:
        model: a ``retino.evaluate.Trained`` (gives the image size, preprocessing, normalisation and
            head), or a run folder. A bare ``torch.nn.Module`` gets ImageNet normalisation and a head
            read from its output size; ``image`` must then be preprocessed already.
        image: a :class:`Prediction` from ``predict`` (its ``seen`` image is used), a preprocessed
            (S, S, 3) uint8 array, or anything ``predict`` accepts (decoded and preprocessed here).
        method: one of ``list_cam_methods()``.
        target: the grade to explain; None = the predicted grade. Ignored by a regress head, whose
            map explains its raw score.
        contrast: explain the target's log-odds against this grade (default 0: "rather than no
            retinopathy"; see :class:`GradeTarget`); None = the target's raw logit.
        image_weight: the photo's share of the overlay (1 - the map's opacity).

    Raises:
        ImageError: the image was rejected (its one-line reason).
        ValueError: unknown method or a target outside 0-4.
    """
    if isinstance(model, torch.nn.Module):  # no run around it: ImageNet statistics, head from the output size
        head = "regress" if getattr(getattr(model, "fc", None), "out_features", 5) == 1 else "classify"
        model = Trained(model, TrainConfig(head=head), normalization("resnet18", False), [0.5, 1.5, 2.5, 3.5], 0,
                        Path("."))
    trained = _as_trained(model)
    if isinstance(image, Prediction):
        if not image.ok:
            raise ImageError(image.error)
        seen = image.seen
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        seen = image
    else:
        pred = _load_for_model(image, trained, _name(image, 0))
        if not pred.ok:
            raise ImageError(pred.error)
        seen = pred.seen
    maps, outputs = _cams(trained, seen[None], [target], method, contrast)
    result = Prediction("")
    _fill(result, outputs[0], trained)
    regress = trained.config.head == "regress"
    explained = None if regress else (result.grade if target is None else int(target))
    return Explanation(maps[0], overlay(seen, maps[0], image_weight=image_weight), method, explained,
                       None if regress or contrast == explained else contrast,
                       result.grade, result.probs, result.score)


def predictions_table(preds: list[Prediction]):
    """One row per prediction (image, grade, grade_name, p0..p4, score, error): the page's CSV."""
    import pandas as pd
    rows = []
    for p in preds:
        row = {"image": p.image, "grade": p.grade, "grade_name": GRADE_INFO[p.grade]["name"] if p.ok else None}
        row.update({f"p{g}": (p.probs[g] if p.probs else None) for g in range(5)})
        row.update(score=p.score, error=p.error)
        rows.append(row)
    return pd.DataFrame(rows, columns=["image", "grade", "grade_name", "p0", "p1", "p2", "p3", "p4", "score", "error"])


# ----------------------------------------------------------------------------- scoring the maps

def _mask_like_model_input(mask: np.ndarray, rgb: np.ndarray, size: int) -> np.ndarray:
    """A lesion mask through the image's own crop, pad and resize (nearest): (size, size) bool.

    ``rgb`` is the decoded photo the model input was made from (possibly decoded at reduced scale).
    """
    if mask.shape != rgb.shape[:2]:
        mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    top, bottom, left, right = fundus_bbox(rgb)  # the same box preprocess() crops to
    crop = mask[top:bottom, left:right]
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    square[y0:y0 + h, x0:x0 + w] = crop
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_NEAREST) > 0


def _pointing_tolerance(size: int) -> int:
    """Pixels a hit may miss a lesion by: 15 px at ~500 px as in the pointing game's paper
    (Zhang et al. 2016, "Top-down neural attention by excitation backprop"), i.e. ~3% of the side."""
    return max(1, round(size / 32))


def _resolve_data(path) -> Path:
    """A run's data path; a relative one is tried from here, then from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return Path(__file__).resolve().parents[1] / p


def cam_score(run_dir, *, data=None, method: str = "gradcam", limit: int = 0, contrast: int | None = 0,
              batch_size: int = 16) -> dict:
    """Pointing game and heat-map mass in the lesions, on the test images of grade >= 2.

    The map explains each image's true grade (the pointing game's convention) against ``contrast``,
    as ``explain`` does by default, or, for a regress head, its raw score. A hit is a map maximum
    within a few pixels of a lesion (the mask dilated by ``_pointing_tolerance``). The random
    figures are the expected values for a uniform random map: its maximum falls anywhere in the
    image, its mass spreads evenly.

    Args:
        run_dir: a run folder or a ``Trained``.
        data: a synthetic data set with ``masks/`` (default: the run's own).
        limit: score at most this many images (0 = all).

    Returns:
        ``{"method", "n", "hit_rate", "random_hit_rate", "mass_in_mask", "random_mass_in_mask"}``.
    """
    trained = _as_trained(run_dir)
    if method not in CAM_METHODS:
        raise ValueError(f"Invalid CAM method {method!r}. Choose one of: {', '.join(CAM_METHODS)}.")
    ds = read_dataset(_resolve_data(data or trained.config.data))
    masks_dir = Path(ds.root) / "masks"
    if not masks_dir.is_dir():
        raise ValueError(f"{ds.root}: has no masks/ folder; cam-score needs a synthetic set "
                         "(python -m retino synth DIR)")
    test = ds.splits["test"]
    rows = [(Path(path), int(g)) for path, g in zip(test["path"], test["grade"])
            if g >= 2 and (masks_dir / f"{Path(path).stem}.png").is_file()]
    if limit:
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{ds.root}: no test image of grade >= 2 has a mask in {masks_dir}")
    size, bg = trained.config.image_size, trained.config.ben_graham
    tol = _pointing_tolerance(size)
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * tol + 1, 2 * tol + 1))
    hits, mass, r_hits, r_mass = [], [], [], []
    for start in range(0, len(rows), batch_size):
        seen, lesions, grades = [], [], []
        for path, grade in rows[start:start + batch_size]:
            rgb = np.asarray(load_image(path, target=size))  # as predict and training decode it
            mask = cv2.imread(str(masks_dir / f"{path.stem}.png"), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise ValueError(f"{masks_dir / (path.stem + '.png')}: not a readable mask image")
            seen.append(preprocess(rgb, size, ben_graham_norm=bg))
            lesions.append(_mask_like_model_input(mask, rgb, size))
            grades.append(grade)
        maps, _ = _cams(trained, np.stack(seen), grades, method, contrast)
        for heat, lesion in zip(maps, lesions):
            near = cv2.dilate(lesion.astype(np.uint8), disk) > 0
            peak = np.unravel_index(np.argmax(heat), heat.shape)
            hits.append(bool(heat.max() > 0 and near[peak]))  # a flat map points nowhere: a miss
            total = float(heat.sum())
            mass.append(float(heat[lesion].sum()) / total if total > 0 else float(lesion.mean()))
            r_hits.append(float(near.mean()))
            r_mass.append(float(lesion.mean()))
    return {"method": method, "n": len(hits), "hit_rate": float(np.mean(hits)),
            "random_hit_rate": float(np.mean(r_hits)), "mass_in_mask": float(np.mean(mass)),
            "random_mass_in_mask": float(np.mean(r_mass))}


# ----------------------------------------------------------------------------- the CLI verbs

def _cam_path(cam_dir: Path, image: str, used: set) -> Path:
    """``<stem>_cam.png``, numbered when two inputs share a stem."""
    stem = Path(image).stem or "image"
    name, i = f"{stem}_cam.png", 1
    while name in used:
        i += 1
        name = f"{stem}_{i}_cam.png"
    used.add(name)
    return cam_dir / name


def predict_cli(args) -> int:
    """``python -m retino predict``: exit 0 when every image was graded, 2 when any was rejected."""
    if args.cam_dir and args.cam_method not in CAM_METHODS:
        raise ValueError(f"Invalid --cam-method {args.cam_method!r}. Choose one of: {', '.join(CAM_METHODS)}.")
    trained = load_trained(args.run_dir)
    preds = predict(trained, args.images, tta=args.tta)
    cams: dict[int, str] = {}
    if args.cam_dir:
        cam_dir, used = Path(args.cam_dir), set()
        cam_dir.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(preds):
            if p.ok:
                path = _cam_path(cam_dir, p.image, used)
                Image.fromarray(explain(trained, p, method=args.cam_method).overlay).save(path)
                cams[i] = str(path)
    if args.json:
        out = [{**p.as_dict(), "cam": cams.get(i)} if p.ok else p.as_dict() for i, p in enumerate(preds)]
        print(json.dumps(out, indent=1))
    else:
        for i, p in enumerate(preds):
            if not p.ok:
                print(f"{p.image}: rejected: {p.error}")
                continue
            detail = (f"score {p.score:.2f}" if p.score is not None
                      else "p = " + " ".join(f"{q:.2f}" for q in p.probs))
            cam = f"  cam: {cams[i]}" if i in cams else ""
            print(f"{p.image}: grade {p.grade} ({GRADE_INFO[p.grade]['name']})  {detail}{cam}")
    return 0 if all(p.ok for p in preds) else 2


def cam_score_cli(args) -> int:
    """``python -m retino cam-score``: one JSON object with ``--json``, else two readable lines."""
    result = cam_score(args.run_dir, data=args.data, method=args.method, limit=args.limit, contrast=args.contrast)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['method']} on {result['n']} test images of grade >= 2:")
    print(f"  pointing game hit rate  {result['hit_rate']:.3f}   (random map {result['random_hit_rate']:.3f})")
    print(f"  heat-map mass in lesions {result['mass_in_mask']:.3f}   (random map {result['random_mass_in_mask']:.3f})")
    return 0
