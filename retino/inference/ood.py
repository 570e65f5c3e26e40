"""The model's own view of a photograph: is it like the photos the run was trained on?

:func:`fit_ood` fits a Mahalanobis-distance model to a run's penultimate features (Lee et al. 2018,
"A simple unified framework for detecting out-of-distribution samples and adversarial attacks",
https://arxiv.org/abs/1807.03888: class means, one shared covariance) with a cut-off that passes 99%
of the calibration photos (issue 11); :func:`fit_run_ood` does it for a run at the end of training,
into ``RUN_DIR/ood.npz``, and :func:`read_run_ood` reads it back for ``predict``, which takes the
features from the grading pass itself (:func:`penultimate_features` with ``with_output=True``).
:func:`retino.inference.quality.judge` turns the score into a reason.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..fileio import write_atomic


def penultimate_features(model: torch.nn.Module, x: torch.Tensor, *, with_output: bool = False):
    """The pooled features a Retino (torchvision-layout) ResNet feeds its ``fc``: (B, d) float.

    The layers are called in turn rather than hooked, so a model shared between threads needs no
    lock for this. ``with_output=True`` also returns ``fc``'s output (logits or the regression
    score) from the same pass: ``(features, output)``.
    """
    missing = [n for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4", "avgpool", "fc")
               if not hasattr(model, n)]
    if missing:
        raise ValueError(f"{type(model).__name__} has no {', '.join(missing)}: expected a Retino or "
                         f"torchvision ResNet")
    with torch.inference_mode():
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))   # (B, 64, H/4, W/4)
        h = model.layer4(model.layer3(model.layer2(model.layer1(h))))  # (B, d, H/32, W/32)
        feats = torch.flatten(model.avgpool(h), 1).float()           # (B, d)
        return (feats, model.fc(feats)) if with_output else feats


def features_of(trained, seen: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Penultimate features of preprocessed photos (N, S, S, 3) uint8 with a ``Trained`` run: (N, d).

    Normalised with the run's own mean/std, as prediction does; what :func:`fit_ood` is fitted on.
    """
    from ..data.augment import normalize, to_float
    seen = np.asarray(seen)
    if seen.ndim != 4 or seen.shape[-1] != 3 or seen.dtype != np.uint8:
        raise ValueError(f"expected preprocessed photos (N, S, S, 3) uint8, got {seen.dtype} {seen.shape}")
    device = next(trained.model.parameters()).device
    out = [penultimate_features(trained.model, normalize(to_float(torch.from_numpy(seen[i:i + batch_size]), device),
                                                         *trained.norm)).cpu().numpy()
           for i in range(0, len(seen), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, trained.model.fc.in_features), np.float32)


def _matrix(features, what: str) -> np.ndarray:
    a = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if a.ndim != 2 or a.shape[0] < 1 or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{what} must be a 2-D array (n, d) of numbers, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return a.astype(np.float64)


def fit_ood(features_val, labels=None, *, fit_features=None, fit_labels=None, pass_rate: float = 0.99) -> dict:
    """Mahalanobis out-of-distribution model with a cut-off that passes ``pass_rate`` of ``features_val``.

    Class means (one per label; one mean when there are no labels) and one covariance shared by
    the classes, shrunk towards a scaled identity by Ledoit-Wolf (scikit-learn) so it stays
    invertible with fewer photos than feature dimensions. The means and covariance come from
    ``fit_features`` (the training photos) when given, else from ``features_val`` itself; the
    cut-off is the smallest distance that at least ``pass_rate`` of ``features_val`` lie within.

    Returns:
        plain numbers and numpy arrays: ``means`` (k, d), ``precision`` (d, d), ``classes``,
        ``cutoff``, ``pass_rate``, ``n_fit``, ``n_val``, ``shrinkage``; :func:`save_ood` stores it.
    """
    from sklearn.covariance import LedoitWolf
    val = _matrix(features_val, "features_val")
    fit = val if fit_features is None else _matrix(fit_features, "fit_features")
    lab = labels if fit_features is None else fit_labels
    if fit.shape[1] != val.shape[1]:
        raise ValueError(f"fit_features have {fit.shape[1]} dimensions, features_val {val.shape[1]}")
    if not 0.5 <= pass_rate < 1.0:
        raise ValueError(f"pass_rate must be in [0.5, 1), got {pass_rate}")
    if lab is None:
        classes, idx = np.array([-1]), np.zeros(len(fit), int)
    else:
        lab = np.asarray(lab).reshape(-1)
        if len(lab) != len(fit):
            raise ValueError(f"{len(lab)} labels for {len(fit)} feature rows")
        classes, idx = np.unique(lab, return_inverse=True)
    means = np.stack([fit[idx == i].mean(0) for i in range(len(classes))])   # (k, d)
    lw = LedoitWolf(assume_centered=True).fit(fit - means[idx])
    params = {"method": "mahalanobis", "means": means.astype(np.float32),
              "precision": lw.precision_.astype(np.float32), "classes": [int(c) for c in classes],
              "shrinkage": float(lw.shrinkage_), "pass_rate": float(pass_rate),
              "n_fit": int(len(fit)), "n_val": int(len(val))}
    scores = np.sort(ood_score(val, params))
    k = int(np.ceil(pass_rate * len(scores)))                   # >= pass_rate of val at or below it
    params["cutoff"] = float(scores[k - 1])
    return params


def ood_score(features, params: dict) -> np.ndarray:
    """Mahalanobis distance of each row to the nearest class mean: (n,) float; larger = stranger."""
    x = _matrix(features, "features")
    means, prec = np.asarray(params["means"], np.float64), np.asarray(params["precision"], np.float64)
    if x.shape[1] != means.shape[1]:
        raise ValueError(f"features have {x.shape[1]} dimensions, the OOD model {means.shape[1]}")
    diff = x[:, None, :] - means[None]                           # (n, k, d)
    d2 = np.einsum("nkd,de,nke->nk", diff, prec, diff)
    return np.sqrt(np.maximum(d2.min(1), 0.0))


def is_ood(features, params: dict) -> np.ndarray:
    """True where a row's :func:`ood_score` is above the calibrated cut-off: (n,) bool."""
    return ood_score(features, params) > params["cutoff"]


def save_ood(path, params: dict) -> Path:
    """Write an OOD model as ``.npz`` (no pickle) and return its path."""
    path = Path(path)
    buf = io.BytesIO()                                          # a file object: numpy adds no suffix
    np.savez(buf, **{k: np.asarray(v) for k, v in params.items()})
    write_atomic(path, buf.getvalue())                          # a reader never sees half a file
    return path


def load_ood(path) -> dict:
    """Read what :func:`save_ood` wrote; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not an OOD model written by retino.inference.ood.save_ood ({e})") from None
    missing = {"means", "precision", "cutoff"} - set(raw)
    if missing:
        raise ValueError(f"{path}: not an OOD model, it lacks {', '.join(sorted(missing))}")
    out = {k: (v if v.ndim else v.item()) for k, v in raw.items()}
    out["classes"] = [int(c) for c in np.atleast_1d(out.get("classes", [-1]))]
    return out


# ----------------------------------------------------------------------------- a run's OOD model

OOD_FILE = "ood.npz"        # in the run folder, beside best.pt
OOD_MAX_FIT = 2000          # training photos the class means and covariance are fitted on (a seeded sample):
                            # ~4x the 512 dimensions of a ResNet-18's features (Ledoit-Wolf shrinkage keeps
                            # a ResNet-50's 2048 invertible); ~20 s of forward passes at 128 px on a 2-core CPU


def split_images(dataset, positions) -> np.ndarray:
    """Rows of a training split's dataset as (N, S, S, 3) uint8: what the model was trained on.

    ``dataset``: ``retino.data.loaders.CachedImages`` (read from its memory map at once) or any
    dataset whose items are ``(image, label)`` (``DecodedImages``; images that broke since are left out).
    """
    positions = np.asarray(positions, dtype=np.int64)
    if hasattr(dataset, "npy_path") and hasattr(dataset, "indices"):
        rows = np.asarray(dataset.indices)[positions]
        order = np.argsort(rows)                                # ascending: sequential reads of the memmap
        arr = np.load(dataset.npy_path, mmap_mode="r")
        out = np.empty((len(rows),) + arr.shape[1:], arr.dtype)
        out[order] = arr[rows[order]]
        return out
    images = []
    for i in positions:
        item = dataset[int(i)]
        image = item[0] if isinstance(item, tuple) else None
        if image is not None:
            images.append(np.asarray(image.numpy() if isinstance(image, torch.Tensor) else image, np.uint8))
    if not images:
        raise ValueError("none of these images of the split is readable")
    return np.stack(images)


def _trained_on(run_dir: Path) -> str:
    """What the run was trained on, in words, where it matters to a reader: Retino's synthetic set
    (its synth.json marks it), else ""."""
    try:
        data = json.loads((run_dir / "config.json").read_text())["train"]["data"]
        return "synthetic fundus images" if (Path(data) / "synth.json").is_file() else ""
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def fit_run_ood(run_dir, model: torch.nn.Module, train_split, val_split, *, norm, epoch: int | None = None,
                max_fit: int = OOD_MAX_FIT, seed: int = 0, batch_size: int = 64) -> Path | None:
    """Fit a run's OOD model on its chosen checkpoint: ``RUN_DIR/ood.npz``, which ``predict`` reads.

    Class means and covariance from (a seeded sample of at most ``max_fit``) training photos, the
    cut-off that passes 99% of the val photos (issue 11), both exactly as the model saw them
    (``train.Split``s: the cached, preprocessed uint8 images, no augmentation).

    Args:
        run_dir: the run folder.
        model: the chosen checkpoint's network (unwrapped from DDP/compile), on its device.
        train_split, val_split: ``retino.training.splits.Split`` (``.dataset``, ``.labels``).
        norm: the run's ``(mean, std)``.
        epoch: the checkpoint's epoch, stored so a later best.pt is not judged by a stale model.

    Returns:
        The file's path; None (with a warning, nothing written) when the splits give nothing to fit:
        a finished run does not fail for want of its OOD model, predict then goes without it.
    """
    from types import SimpleNamespace
    run_dir = Path(run_dir)
    n_train = len(train_split.dataset)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n_train, size=min(n_train, max_fit), replace=False))
    labels = np.asarray(train_split.labels)[pick]
    trained = SimpleNamespace(model=model, norm=norm)

    def features(dataset, positions) -> np.ndarray:  # a batch at a time: 2,000 photos at 512 px are 1.5 GB
        return np.concatenate([features_of(trained, split_images(dataset, positions[i:i + batch_size]))
                               for i in range(0, len(positions), batch_size)])

    was_training = model.training
    model.eval()
    try:
        fit = features(train_split.dataset, pick)
        val = features(val_split.dataset, np.arange(len(val_split.dataset)))
        if len(fit) != len(labels):     # an uncached image that broke since: no label to pair it with
            labels = None
        params = fit_ood(val, fit_features=fit, fit_labels=labels)
    except ValueError as e:             # an empty split, or every image of a batch unreadable since
        warnings.warn(f"{run_dir}: no OOD model ({e}); predict will go without the model's view")
        return None
    finally:
        model.train(was_training)
    params.update(epoch=-1 if epoch is None else int(epoch), trained_on=_trained_on(run_dir))
    return save_ood(run_dir / OOD_FILE, params)


def read_run_ood(run_dir, epoch: int | None = None) -> dict | None:
    """A run's ``ood.npz``, or None where it has none or it belongs to another epoch's checkpoint."""
    path = Path(run_dir) / OOD_FILE
    if not path.is_file():
        return None
    params = load_ood(path)
    stored = int(params.get("epoch", -1))
    if epoch is not None and stored >= 0 and stored != int(epoch):
        return None
    return params
