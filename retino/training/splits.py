"""A run's splits as datasets and loaders: the decode-once cache (built by every rank's share under
torchrun) or per-image decoding, unreadable images left out and listed, empty splits refused."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import lifecycle
from ..config import TrainConfig
from ..data import DatasetError
from ..data.cache import build_cache, local_group
from ..data.loaders import CachedImages, DecodedImages
from ..data._workers import resolve_workers
from ..data.loaders import make_loader as data_loader
from .loop import Context


@dataclass
class Split:
    dataset: torch.utils.data.Dataset
    frame: pd.DataFrame  # the images kept (image, path, grade, patient, eye), in dataset order
    skipped: list        # (path, error) left out because they could not be decoded

    @property
    def labels(self) -> np.ndarray:
        return self.frame["grade"].to_numpy(dtype=np.int64)


def load_split(df: pd.DataFrame, cfg: TrainConfig, *, progress: bool, desc: str, ctx: Context | None = None) -> Split:
    """A split's images as a torch Dataset: from the decode-once cache, or decoded per item.

    Under torchrun the ranks of a machine build the cache together, each its share of the rows.
    Unreadable images are left out (and listed in ``skipped``) either way.
    """
    paths, labels = df["path"].tolist(), df["grade"].to_numpy(dtype=np.int64)
    if not cfg.cache:
        ds = DecodedImages(paths, labels, cfg.image_size, cfg.ben_graham)
        kept = df[df["path"].isin(set(ds.paths))] if ds.skipped else df
        return Split(ds, kept.reset_index(drop=True), ds.skipped)
    local_rank, local_world = local_group() if ctx is not None and ctx.world > 1 else (0, 1)
    cache = build_cache(paths, cfg.image_size, ben_graham=cfg.ben_graham, progress=progress, desc=desc,
                        workers=resolve_workers(cfg.workers, purpose="cache", local_world=local_world),
                        rank=local_rank, world=local_world, barrier=ctx.barrier if ctx else None,
                        stop=lifecycle.STOP)
    keep = np.flatnonzero(cache.ok)
    skipped = [(paths[i], cache.errors[i]) for i in sorted(cache.errors)]
    return Split(CachedImages(cache.path, keep, labels[keep]), df.iloc[keep].reset_index(drop=True), skipped)


def check_split(split: Split, name: str, data: str) -> None:
    """Refuse, before any training, a split left empty by unreadable images."""
    if len(split.frame):
        return
    if split.skipped:
        path, error = split.skipped[0]
        raise DatasetError(f"{data}: all {len(split.skipped)} {name} images are unreadable "
                           f"(first: {error}); fix or remove them")
    raise DatasetError(f"{data}: the {name} split has no images")


def make_loader(split: Split, cfg: TrainConfig, ctx: Context, *, train: bool):
    """Train: whole shuffled batches, this rank's share. Evaluation: this rank's shard, in order, unpadded.

    On a CPU the cache is read in this process; on a GPU a thread reads whole batches into pinned
    memory (retino/data/feeder.py), so the copy overlaps the step.
    """
    return data_loader(split.dataset, batch_size=cfg.batch_size if train else (cfg.eval_batch_size or
                                                                                 2 * cfg.batch_size),
                       train=train, labels=split.labels, balanced=cfg.sampler == "balanced", seed=cfg.seed,
                       rank=ctx.rank, world=ctx.world, device_type=ctx.device.type, workers=cfg.workers)
