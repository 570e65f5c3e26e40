"""Inference: a run's model loaded from its own checkpoint, inputs prepared as the run was trained.

What :mod:`retino.inference.grading`, :mod:`retino.inference.explain`, :mod:`retino.inference.pointing`, :mod:`retino.evaluation.evaluate`
and the pages share: :func:`load_trained` (the architecture and weights, with the run's choices read
once by :func:`retino.inference.choices.read_choices`: image size, Ben Graham setting, normalisation,
thresholds, temperature, operating point and OOD model, never today's widget values), :func:`prepare_input` (decode and preprocess one input), :func:`model_input` (uint8
images to the normalised tensor, the inference twin of :func:`retino.data.augment.to_input`),
:func:`forward` / :func:`forward_features`, :func:`read_output` and :func:`referral`.

A model shared across Streamlit sessions is used by one request at a time: every forward pass here
and every CAM holds the model's lock (CAM hooks would otherwise record another request's activations).
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from . import choices, ood
from ..evaluation import metrics
from .. import runs
from ..config import TrainConfig
from ..data import ImageError, load_image, preprocess
from ..data.augment import normalize, to_float
from ..data.preprocess import MAX_PIXELS, _placement, _to_rgb, exif_upright, fundus_bbox
from ..grades import DEFAULT_THRESHOLDS
from ..models import build_model, normalization

ORIGINAL_MAX_PX = 1024  # the decoded photo kept for display is shrunk to this side at most
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Module -> threading.Lock
_LOCKS_GUARD = threading.Lock()


@dataclass
class Trained:
    """A model ready for inference, with what it was trained with (never today's widget values).

    ``model`` is built on first use when the run was loaded lazily (:func:`load_trained`): grading
    through a cached ONNX model never needs the PyTorch network, nor torchvision to build it.
    """

    _model: torch.nn.Module | None
    config: TrainConfig
    norm: tuple  # (mean, std)
    thresholds: list
    epoch: int
    run_dir: Path
    checkpoint: str = "best.pt"
    temperature: float | None = None     # classify head: chosen on val (evaluation.json); None: not calibrated
    operating_point: dict | None = None  # {"threshold", "target_sensitivity", ...} chosen on val, or None
    selected_on: str | None = None       # "val", or "test" for a run made before the val split
    ood: dict | None = None              # retino.inference.ood.fit_run_ood's model (ood.npz), or None
    notes: list = field(default_factory=list)  # choices missing or stale, and how to make them
    build: object = field(default=None, repr=False, compare=False)  # () -> nn.Module, for a lazy model
    device: torch.device | None = field(default=None, repr=False, compare=False)  # where the model is (lazy)
    engines: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # retino.inference.engine.get's
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None and self.build is not None:
            with self._lock:  # two Streamlit sessions asking at once build it once
                if self._model is None:
                    self._model = self.build()
        return self._model

    @model.setter
    def model(self, value: torch.nn.Module) -> None:
        self._model = value


def load_trained(run_dir, checkpoint: str = "best.pt", device: str = "cpu", *, lazy: bool = False) -> Trained:
    """Build the run's architecture and load its checkpoint (weights_only: no pickled code runs), with
    the run's choices for it (:func:`retino.inference.choices.read_choices`: every file read once and checked).

    ``lazy``: build the network on first use of ``.model`` (an ONNX engine whose model is cached never
    asks); a checkpoint whose weights do not fit the architecture then fails at that use.

    Raises:
        RunError: the run folder does not exist, the checkpoint is missing or not Retino's, or a run
            file holds what cannot be applied (one line naming the file and field).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.RunError(f"{run_dir}: the run folder does not exist")
    ckpt = runs.load_checkpoint(run_dir / checkpoint)
    ch = choices.read_choices(run_dir, checkpoint, ckpt=ckpt)

    def build() -> torch.nn.Module:
        try:
            model = build_model(ch.config.arch, pretrained=False, head=ch.config.head)
            model.load_state_dict(ckpt["model"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise runs.RunError(f"{run_dir / checkpoint}: does not hold a model Retino can load ({e})") from None
        return model.to(device).eval()

    if "model" not in ckpt or not isinstance(ckpt["model"], dict):
        raise runs.RunError(f"{run_dir / checkpoint}: does not hold a model Retino can load (no 'model' weights)")
    trained = from_choices(None if lazy else build(), ch)
    trained.build, trained.device = build, torch.device(device)
    return trained


def from_choices(model: torch.nn.Module, ch: choices.Choices) -> Trained:
    """A ``Trained`` for ``model`` applying the run's choices ``ch``."""
    return Trained(model, ch.config, ch.norm, list(ch.thresholds), ch.epoch, ch.run_dir, ch.checkpoint,
                   temperature=ch.temperature, operating_point=ch.operating_point, selected_on=ch.selected_on,
                   ood=ch.ood, notes=list(ch.notes))


def referral(trained: Trained) -> tuple[float, str]:
    """The cut a referable score is compared with (``score >= cut``) and the rule in words
    (:func:`retino.inference.choices.referral_cut`, the one definition)."""
    return choices.referral_cut(trained.config.head, trained.operating_point, trained.thresholds,
                                trained.selected_on)


def as_trained(run_or_model, checkpoint: str = "best.pt") -> Trained:
    """A ``Trained`` from a run folder, a ``Trained`` itself, or a bare Retino ResNet.

    A bare ``torch.nn.Module`` gets ImageNet normalisation and a head read from its output size;
    its inputs must be preprocessed already.
    """
    if isinstance(run_or_model, (str, os.PathLike)):
        return load_trained(run_or_model, checkpoint)
    if isinstance(run_or_model, torch.nn.Module):
        regress = getattr(getattr(run_or_model, "fc", None), "out_features", 5) == 1
        cfg = TrainConfig(head="regress" if regress else "classify", loss="mse" if regress else "ce")
        return Trained(run_or_model, cfg, normalization(cfg.arch, False), list(DEFAULT_THRESHOLDS), 0, Path("."))
    if isinstance(run_or_model, Trained):
        return run_or_model
    raise TypeError(f"expected a run folder or a retino.inference.trained.Trained, got {type(run_or_model).__name__}")


def model_lock(model: torch.nn.Module) -> threading.Lock:
    """The lock every forward pass and CAM on ``model`` holds (one per model object)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.Lock()
        return lock


# ----------------------------------------------------------------------------- inputs

def input_name(src, i: int) -> str:
    """How an input is named in results and messages: its path, upload name, or ``image N``."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return str(getattr(src, "name", None) or f"image {i + 1}")


def decode(src, name: str, size: int | None = None) -> Image.Image:
    """RGB PIL image from a path, bytes, file object or PIL image (EXIF honoured, bombs refused).

    ``size``: the working size, so a large JPEG may be decoded at reduced scale; None = full size.
    ``img.info["warnings"]``: what the caller should show beside the result (unreadable EXIF).
    """
    if isinstance(src, Image.Image):  # decoded already: only the size check and the mode are left
        w, h = src.size
        if w * h > MAX_PIXELS:
            raise ImageError(name, f"{w} x {h} pixels is larger than the {MAX_PIXELS / 1e6:.0f} MP limit")
        upright, notes = exif_upright(src, name)  # unreadable EXIF: unrotated, said (as load_image does)
        rgb = _to_rgb(upright)
        rgb.info["warnings"] = notes
        return rgb
    if not isinstance(src, (str, os.PathLike, bytes, bytearray)) and not hasattr(src, "read"):
        raise ImageError(name, f"expected a path, bytes, a file object or a PIL image, got {type(src).__name__}")
    if hasattr(src, "seek"):  # a Streamlit upload read by an earlier rerun starts at its end
        src.seek(0)
    return load_image(src, target=size)


def fundus_crop(rgb: np.ndarray) -> tuple[float, float, float, float]:
    """The fundus box preprocessing crops to, as fractions of the photo: (top, bottom, left, right).

    Fractions, so the box holds for the same photo decoded at any scale.
    """
    h, w = rgb.shape[:2]
    top, bottom, left, right = fundus_bbox(rgb)
    return top / h, bottom / h, left / w, right / w


@dataclass
class Prepared:
    """One input decoded and preprocessed as the run was trained."""

    seen: np.ndarray           # (S, S, 3) uint8: what the model sees
    mask: np.ndarray           # (S, S) bool: preprocess's boundary_mask, where the fundus is kept
    original: Image.Image      # the decoded photo, shrunk to at most ORIGINAL_MAX_PX
    crop: tuple                # the fundus box as fundus_crop fractions
    warnings: list             # lines to show beside the result (unreadable EXIF)
    photo: np.ndarray | None   # (H, W, 3) uint8: the decoded photo for the quality gate (None: not kept)


def prepare_input(src, config: TrainConfig, name: str, *, keep_photo: bool = False) -> Prepared:
    """Decode and preprocess one input exactly as the run was trained.

    ``keep_photo``: also keep the decoded photo at a size the quality gate can judge
    (re-decoded at ``quality.GATE_TARGET`` when the run's draft decode made it smaller than
    ``quality.GATE_MIN_SIDE``).

    Raises:
        ImageError: the input was rejected (one line that names it).
    """
    from .quality import GATE_MIN_SIDE, GATE_TARGET
    try:
        img = decode(src, name, config.image_size)
        rgb = np.asarray(img)
        seen, mask = preprocess(rgb, config.image_size, ben_graham_norm=config.ben_graham, return_mask=True)
        crop = fundus_crop(rgb)
        photo = None
        if keep_photo:
            photo = rgb
            if min(rgb.shape[:2]) < GATE_MIN_SIDE and not isinstance(src, Image.Image):
                photo = np.asarray(decode(src, name, GATE_TARGET))
    except ImageError:
        raise
    except (OSError, ValueError, cv2.error) as e:  # anything else a malformed file can raise while decoding
        reason = str(e).splitlines()[0] if str(e) else repr(e)
        raise ImageError(name, f"cannot be decoded: {reason}") from None
    warnings = list(img.info.get("warnings") or [])
    img.thumbnail((ORIGINAL_MAX_PX, ORIGINAL_MAX_PX))
    return Prepared(seen, mask, img, crop, warnings, photo)


def prepare(src, config: TrainConfig, name: str) -> tuple[np.ndarray, Image.Image, tuple]:
    """:func:`prepare_input` as ``(seen, original, crop)``.

    Raises:
        ImageError: the input was rejected (one line that names it).
    """
    p = prepare_input(src, config, name)
    return p.seen, p.original, p.crop


def map_on_photo(heat: np.ndarray, crop: tuple, shape: tuple[int, int]) -> np.ndarray:
    """A map over the model's input (S, S) laid back over the photo it came from: (H, W) float32.

    Undoes preprocessing's geometry (``crop_and_pad``: the fundus box resized to the square's side,
    then centred): the padding is cut off, the rest is scaled to the box and placed there; outside
    the box the map is 0. ``crop`` is :func:`fundus_crop`'s box, ``shape`` the photo's (H, W) at any scale.
    """
    height, width = shape
    top, bottom = round(crop[0] * height), round(crop[1] * height)
    left, right = round(crop[2] * width), round(crop[3] * width)
    h, w = max(bottom - top, 1), max(right - left, 1)
    size = heat.shape[0]
    _, nh, nw, y0, x0 = _placement(h, w, size)  # where preprocess put the box in the square
    inside = np.ascontiguousarray(np.asarray(heat, np.float32)[y0:y0 + nh, x0:x0 + nw])
    out = np.zeros((height, width), np.float32)
    out[top:top + h, left:left + w] = cv2.resize(inside, (w, h), interpolation=cv2.INTER_LINEAR)
    return out


# ----------------------------------------------------------------------------- the forward pass

def unit_input(images, device) -> torch.Tensor:
    """(B, S, S, 3) uint8 (array or tensor) -> (B, 3, S, S) float in [0, 1] on ``device``."""
    batch = images if torch.is_tensor(images) else torch.from_numpy(np.ascontiguousarray(images))
    return to_float(batch, device)


def model_input(images, device, norm) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> the normalised (B, 3, S, S) float the model takes, on ``device``.

    Arguments in the order of :func:`retino.data.augment.to_input`, and the values of its device path
    without augmentation. Not its CPU path: that one fills a shared output buffer, which two
    Streamlit sessions predicting at once must not share.
    """
    return normalize(unit_input(images, device), *norm)


def forward(trained: Trained, x: torch.Tensor) -> torch.Tensor:
    """Model outputs (B, K) as float32 for (B, 3, S, S) inputs in [0, 1], under the model's lock."""
    model = trained.model
    with model_lock(model), torch.inference_mode():
        model.eval()
        return model(normalize(x, *trained.norm)).float()


def forward_features(trained: Trained, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model outputs (B, K) and penultimate features (B, d), both float32, from one pass (under the lock).

    What the out-of-distribution score needs costs no second forward pass.
    """
    model = trained.model
    with model_lock(model), torch.inference_mode():
        model.eval()
        feats, out = ood.penultimate_features(model, normalize(x, *trained.norm), with_output=True)
        return out.float(), feats


def device_of(trained: Trained) -> torch.device:
    """Where the model runs; a lazy model's device is known without building it."""
    if trained._model is None and trained.device is not None:
        return trained.device
    return next(trained.model.parameters()).device


def calibrated(out: torch.Tensor, trained: Trained) -> torch.Tensor:
    """Probabilities ``softmax(logits / T)`` at the run's temperature (T = 1 where it has none): (..., K)."""
    return (out.float() / (trained.temperature or 1.0)).softmax(-1)


def read_output(out: torch.Tensor, trained: Trained) -> tuple[int, list[float] | None, float | None]:
    """One image's output row as ``(grade, probs, score)``: probabilities (after the run's
    temperature) for a classify head, the raw score (cut by the run's thresholds) for a regress head."""
    out = out.float().cpu()
    if trained.config.head == "regress":
        score = float(out.view(-1)[0])
        return int(metrics.apply_thresholds([score], trained.thresholds)[0]), None, score
    probs = calibrated(out, trained)
    return int(probs.argmax()), [float(p) for p in probs], None


def referable_score(probs: list[float] | None, score: float | None) -> float:
    """P(grade >= 2) from a classify head's probabilities, or a regress head's raw score."""
    return float(score) if probs is None else choices.p_referable(probs)
