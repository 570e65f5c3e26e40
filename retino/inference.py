"""Inference: a run's model loaded from its own checkpoint, inputs prepared as the run was trained.

What :mod:`retino.predict`, :mod:`retino.explain`, :mod:`retino.pointing`, :mod:`retino.evaluate`
and the Predict page share: :func:`load_trained` (the architecture, weights, image size, Ben Graham
setting, normalisation and thresholds the run saved, never today's widget values), :func:`prepare`
(decode and preprocess one input), :func:`model_input` (uint8 images to the normalised tensor, the
inference twin of :func:`retino.data.loaders.to_input`), :func:`forward` and :func:`read_output`.

A model shared across Streamlit sessions is used by one request at a time: every forward pass here
and every CAM holds the model's lock (CAM hooks would otherwise record another request's activations).
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from . import metrics, runs
from .config import TrainConfig
from .data import ImageError, load_image, preprocess
from .data.loaders import normalize, to_float
from .data.preprocess import MAX_PIXELS, _placement, _to_rgb, exif_upright, fundus_bbox
from .grades import DEFAULT_THRESHOLDS
from .models import build_model, normalization

ORIGINAL_MAX_PX = 1024  # the decoded photo kept for display is shrunk to this side at most
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # nn.Module -> threading.Lock
_LOCKS_GUARD = threading.Lock()


@dataclass
class Trained:
    """A model ready for inference, with what it was trained with (never today's widget values)."""

    model: torch.nn.Module
    config: TrainConfig
    norm: tuple  # (mean, std)
    thresholds: list
    epoch: int
    run_dir: Path
    checkpoint: str = "best.pt"


def load_trained(run_dir, checkpoint: str = "best.pt", device: str = "cpu") -> Trained:
    """Build the run's architecture and load its checkpoint (weights_only: no pickled code runs).

    Raises:
        RunError: the run folder does not exist, or the checkpoint is missing or not Retino's.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.RunError(f"{run_dir}: the run folder does not exist")
    ckpt = runs.load_checkpoint(run_dir / checkpoint)
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        model = build_model(cfg.arch, pretrained=False, head=cfg.head)
        model.load_state_dict(ckpt["model"])
        norm = (tuple(ckpt["norm"]["mean"]), tuple(ckpt["norm"]["std"]))
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise runs.RunError(f"{run_dir / checkpoint}: does not hold a model Retino can load ({e})") from None
    model.to(device).eval()
    thresholds = list(ckpt.get("thresholds") or DEFAULT_THRESHOLDS)
    return Trained(model, cfg, norm, thresholds, int(ckpt.get("epoch", 0)), run_dir, checkpoint)


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
    if hasattr(run_or_model, "model") and hasattr(run_or_model, "config"):
        return run_or_model
    raise TypeError(f"expected a run folder or a retino.inference.Trained, got {type(run_or_model).__name__}")


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
    """
    if isinstance(src, Image.Image):  # decoded already: only the size check and the mode are left
        w, h = src.size
        if w * h > MAX_PIXELS:
            raise ImageError(f"{name}: {w} x {h} pixels is larger than the {MAX_PIXELS / 1e6:.0f} MP limit")
        upright, _ = exif_upright(src, name)  # unreadable EXIF: unrotated (load_image does the same)
        return _to_rgb(upright)
    if not isinstance(src, (str, os.PathLike, bytes, bytearray)) and not hasattr(src, "read"):
        raise ImageError(f"{name}: expected a path, bytes, a file object or a PIL image, "
                         f"got {type(src).__name__}")
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


def prepare(src, config: TrainConfig, name: str) -> tuple[np.ndarray, Image.Image, tuple]:
    """Decode and preprocess one input exactly as the run was trained.

    Returns:
        ``(seen, original, crop)``: what the model sees, (S, S, 3) uint8; the decoded photo shrunk
        to at most ``ORIGINAL_MAX_PX``; the fundus box as :func:`fundus_crop` fractions.

    Raises:
        ImageError: the input was rejected (one line that names it).
    """
    try:
        img = decode(src, name, config.image_size)
        rgb = np.asarray(img)
        seen = preprocess(rgb, config.image_size, ben_graham_norm=config.ben_graham)
        crop = fundus_crop(rgb)
    except ImageError:
        raise
    except (OSError, ValueError, cv2.error) as e:  # anything else a malformed file can raise while decoding
        reason = str(e).splitlines()[0] if str(e) else repr(e)
        raise ImageError(f"{name}: cannot be decoded: {reason}") from None
    img.thumbnail((ORIGINAL_MAX_PX, ORIGINAL_MAX_PX))
    return seen, img, crop


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

    Arguments in the order of :func:`retino.data.loaders.to_input`, and the values of its device path
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


def device_of(trained: Trained) -> torch.device:
    return next(trained.model.parameters()).device


def read_output(out: torch.Tensor, trained: Trained) -> tuple[int, list[float] | None, float | None]:
    """One image's output row as ``(grade, probs, score)``: probabilities for a classify head, the
    raw score (cut by the run's thresholds) for a regress head."""
    out = out.float().cpu()
    if trained.config.head == "regress":
        score = float(out.view(-1)[0])
        return int(metrics.apply_thresholds([score], trained.thresholds)[0]), None, score
    probs = out.softmax(-1)
    return int(probs.argmax()), [float(p) for p in probs], None
