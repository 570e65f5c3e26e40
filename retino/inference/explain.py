"""Explain: where the model looked, as a class-activation map from pytorch-grad-cam.

``explain`` runs a CAM method at the last residual block (``layer4[-1]``) on what the model saw, for
the predicted grade or a chosen one, against grade 0 by default (:class:`GradeTarget`), and returns
the map, its overlay and the prediction of the same forward pass. The map has the resolution of
``layer4``: the image size / 32 cells a side, and is zero outside the image's boundary mask
(``preprocess(..., return_mask=True)``: Ben Graham's 90% of the fundus radius, away from clipped
edges), so it cannot point at what preprocessing blanked or at the fundus's rim (issue 11 §2).
:func:`overlay_on_photo` lays it over the original photo.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from . import trained as inference
from ..data import ImageError

# name -> pytorch-grad-cam class. On these ResNets (global average pool, then one linear layer) the
# gradient at layer4 is the same at every position, so HiResCAM's map equals Grad-CAM's (Draelos &
# Carin 2020, "Use HiResCAM instead of Grad-CAM"); it is listed because people look for it by name.
# XGradCAM, equal to Grad-CAM for the same reason, is left out.
CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "eigencam": EigenCAM,
               "layercam": LayerCAM}
TARGET_FREE = ("eigencam",)  # methods whose map does not depend on the grade explained
MAP_STRIDE = 32  # layer4's output is the input size / 32 a side (five stride-2 steps in a ResNet)


def list_cam_methods() -> list[str]:
    """Names ``explain`` accepts, for the UI and the CLI."""
    return list(CAM_METHODS)


def check_method(method: str) -> None:
    """ValueError listing the choices for a CAM method ``explain`` does not know."""
    if method not in CAM_METHODS:
        raise ValueError(f"Invalid CAM method {method!r}. Choose one of: {', '.join(CAM_METHODS)}.")


def map_cells(image_size: int) -> int:
    """Cells a side of a CAM at ``image_size``: what decides how fine the map can be."""
    return max(1, image_size // MAP_STRIDE)


@dataclass
class Explanation:
    """A class-activation map on what the model saw, and the prediction of the same forward pass."""

    heatmap: np.ndarray          # (S, S) float32 in [0, 1]; 0 outside the boundary mask
    overlay: np.ndarray          # (S, S, 3) uint8 RGB: the map blended over the preprocessed photo
    method: str
    target: int | None           # the grade explained; None for a regress head (the raw score is)
    contrast: int | None         # ... against this grade (see GradeTarget); None: the raw logit
    grade: int
    probs: list[float] | None
    score: float | None


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
    of a softmax also carries what raises every grade alike, which changes no probability. How much
    the contrast helps a given run: ``python -m retino cam-score RUN`` against the same with
    ``--contrast none`` (no figure is quoted here: it moves with every change to training). This
    is Finer-CAM's ``FinerWeightedTarget(grade, [contrast], alpha=1)``; ``contrast`` None, or equal
    to the grade, explains the raw logit as ``ClassifierOutputTarget`` does.
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


def class_activation_maps(trained: inference.Trained, seen: np.ndarray, targets: list[int | None],
                          method: str = "gradcam", contrast: int | None = 0,
                          features: list | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Maps (B, S, S) float32 in [0, 1] and model outputs (B, K) for a batch of preprocessed images.

    ``seen``: (B, S, S, 3) uint8; ``targets``: the grade each map explains (None = predicted).
    ``features``: a list that receives the penultimate features (B, d) of the map's own forward
    pass (the first pass: methods such as Score-CAM run more), so grading needs no second pass.
    """
    check_method(method)
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
    maps = None
    layer = model.layer4[-1]
    with inference.model_lock(model), torch.inference_mode(False), torch.enable_grad():  # CAMs need autograd
        x = inference.model_input(seen, inference.device_of(trained), trained.norm)  # (B, 3, S, S)
        hook = layer.register_forward_hook(_cut_below)  # registered first, so it runs before the CAM's hooks
        caught: list = []
        fc_hook = (model.fc.register_forward_pre_hook(lambda _m, inp: caught.append(inp[0].detach()))
                   if features is not None else None)
        try:
            with CAM_METHODS[method](model=model, target_layers=[layer]) as cam:
                maps = cam(input_tensor=x, targets=cam_targets)  # (B, S, S)
                outputs = cam.outputs.detach().float()  # (B, K): the prediction of the same pass
        finally:
            hook.remove()
            if fc_hook is not None:
                fc_hook.remove()
        if features is not None and caught:
            features.append(torch.flatten(caught[0], 1).float())
    if maps is None:
        raise RuntimeError(f"{method} produced no map (see the message printed above)")
    return np.clip(np.nan_to_num(maps.astype(np.float32)), 0.0, 1.0), outputs


def overlay(seen: np.ndarray, heatmap: np.ndarray, *, image_weight: float = 0.5) -> np.ndarray:
    """The heat map blended over a preprocessed uint8 image: (S, S, 3) uint8 RGB."""
    rgb = seen.astype(np.float32) / 255.0  # the de-normalised model input, in [0, 1]
    return show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=float(image_weight))


def overlay_on_photo(photo: np.ndarray, heatmap: np.ndarray, crop: tuple, *,
                     image_weight: float = 0.5) -> np.ndarray:
    """The heat map of a model input laid over the original photo, at the photo's size: (H, W, 3) uint8.

    ``photo``: (H, W, 3) uint8 RGB, the photo the input was made from (any scale); ``crop``: its
    fundus box (``Prediction.crop``). The colours and the blend are ``show_cam_on_image``'s (JET,
    ``image_weight`` of the photo), done in uint8: its float32 copies would take ~0.6 GB for a 12 MP
    camera photo. Unlike it, the blend is not rescaled to its brightest pixel.
    """
    heat = inference.map_on_photo(heatmap, crop, photo.shape[:2])
    colours = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(np.ascontiguousarray(photo, np.uint8), float(image_weight), colours,
                           1.0 - float(image_weight), 0.0)


def explain(model, image, *, method: str = "gradcam", target: int | None = None, contrast: int | None = 0,
            image_weight: float = 0.5, mask: np.ndarray | None = None) -> Explanation:
    """Class-activation map of one image at the model's last residual block (``layer4[-1]``).

    Args:
        model: a ``retino.inference.trained.Trained`` (gives the image size, preprocessing, normalisation and
            head), or a run folder. A bare ``torch.nn.Module`` gets ImageNet normalisation and a head
            read from its output size; ``image`` must then be preprocessed already.
        image: a :class:`~retino.inference.predict.Prediction` (its ``seen`` image is used), a preprocessed
            (S, S, 3) uint8 array, or anything ``predict`` accepts (decoded and preprocessed here).
        method: one of ``list_cam_methods()``.
        target: the grade to explain; None = the predicted grade. Ignored by a regress head, whose
            map explains its raw score.
        contrast: explain the target's log-odds against this grade (default 0: "rather than no
            retinopathy"; see :class:`GradeTarget`); None = the target's raw logit.
        image_weight: the photo's share of the overlay (1 - the map's opacity).
        mask: (S, S) bool, where the map may be non-zero; default: the image's boundary mask
            (``Prediction.mask``, or made here for a decoded input). A preprocessed array given
            without one is not masked: its fundus box is no longer known.

    Raises:
        ImageError: the image was rejected (its one-line reason).
        ValueError: unknown method or a target outside 0-4.
    """
    trained = inference.as_trained(model)
    if hasattr(image, "seen") and hasattr(image, "ok"):  # a retino.inference.predict.Prediction (not imported: it grades here)
        if not image.ok:
            raise ImageError(image.error)
        seen, keep = image.seen, image.mask
    elif isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        seen, keep = image, None
    else:
        prepared = inference.prepare_input(image, trained.config, inference.input_name(image, 0))
        seen, keep = prepared.seen, prepared.mask
    keep = keep if mask is None else np.asarray(mask, bool)
    if keep is not None and keep.shape != seen.shape[:2]:
        raise ValueError(f"mask has shape {keep.shape}, the image {seen.shape[:2]}")
    maps, outputs = class_activation_maps(trained, seen[None], [target], method, contrast)
    heat = maps[0] if keep is None else np.where(keep, maps[0], np.float32(0))  # (S, S)
    grade, probs, score = inference.read_output(outputs[0], trained)
    regress = trained.config.head == "regress"
    explained = None if regress else (grade if target is None else int(target))
    return Explanation(heat, overlay(seen, heat, image_weight=image_weight), method, explained,
                       None if regress or contrast == explained else contrast, grade, probs, score)
