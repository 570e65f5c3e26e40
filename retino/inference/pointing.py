"""The pointing game: does a run's class-activation map point at the lesions it graded?

Only the synthetic set knows where its lesions are (``masks/``), so ``cam_score`` runs there: for
each test image of grade >= 2 it asks whether the map's maximum lies on a lesion and how much of the
map's mass falls inside them, against what a uniform random map would score.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from . import trained as inference
from ..data import DatasetError, load_image, preprocess, read_dataset
from ..data.preprocess import crop_and_pad, fundus_bbox
from .explain import check_method, class_activation_maps
from ..fileio import resolve_data_path
from ..grades import REFERABLE_GRADE


def _mask_like_model_input(mask: np.ndarray, rgb: np.ndarray, size: int) -> np.ndarray:
    """A lesion mask through the image's own crop, pad and resize (nearest): (size, size) bool.

    ``rgb`` is the decoded photo the model input was made from (possibly decoded at reduced scale).
    """
    if mask.shape != rgb.shape[:2]:
        mask = cv2.resize(mask, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    # the same box, resize and padding preprocess() applies to the image
    return crop_and_pad(mask, fundus_bbox(rgb), size, interpolation=cv2.INTER_NEAREST) > 0


def _pointing_tolerance(size: int) -> int:
    """Pixels a hit may miss a lesion by: 15 px at ~500 px as in the pointing game's paper
    (Zhang et al. 2016, "Top-down neural attention by excitation backprop"), i.e. ~3% of the side."""
    return max(1, round(size / 32))


def _scored_images(ds, masks_dir: Path, limit: int) -> list[tuple[Path, int]]:
    """(path, grade) of the test images of referable grade that have a mask."""
    test = ds.splits["test"]
    rows = [(Path(path), int(g)) for path, g in zip(test["path"], test["grade"])
            if g >= REFERABLE_GRADE and (masks_dir / f"{Path(path).stem}.png").is_file()]
    return rows[:limit] if limit else rows


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

    Raises:
        DatasetError: the data set has no masks, or no scorable image.
    """
    trained = inference.as_trained(run_dir)
    check_method(method)
    ds = read_dataset(resolve_data_path(data or trained.config.data))
    masks_dir = Path(ds.root) / "masks"
    if not masks_dir.is_dir():
        raise DatasetError(f"{ds.root}: has no masks/ folder; cam-score needs a synthetic set "
                           "(python -m retino synth DIR)")
    rows = _scored_images(ds, masks_dir, limit)
    if not rows:
        raise DatasetError(f"{ds.root}: no test image of grade >= {REFERABLE_GRADE} has a mask in {masks_dir}")
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
                raise DatasetError(f"{masks_dir / (path.stem + '.png')}: not a readable mask image")
            seen.append(preprocess(rgb, size, ben_graham_norm=bg))
            lesions.append(_mask_like_model_input(mask, rgb, size))
            grades.append(grade)
        maps, _ = class_activation_maps(trained, np.stack(seen), grades, method, contrast)
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
