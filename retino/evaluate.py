"""Evaluate a trained run: every test metric of one of its checkpoints, on its test split or another set."""
from __future__ import annotations

import dataclasses

import numpy as np

from . import metrics
from .inference import Trained, load_trained  # noqa: F401  (Trained, load_trained: moved to retino.inference)


def evaluate_run(run_dir, *, data: str | None = None, checkpoint: str = "best.pt") -> dict:
    """Every test metric of a run's checkpoint on its test split (or another data set's).

    Returns the metrics of :func:`retino.metrics.classification_metrics` with the ``test_`` prefix,
    the test loss, and ``run``, ``checkpoint``, ``epoch``, ``data``, ``skipped`` (images left out
    as unreadable) and ``majority_baseline``.
    """
    from . import train
    from .data import read_dataset
    from .fileio import resolve_data_path
    # the trainer's validation pass; renamed from train.evaluate to train.validate (issue 13)
    validate = getattr(train, "validate", None) or getattr(train, "evaluate")
    trained = load_trained(run_dir, checkpoint)
    cfg = dataclasses.replace(trained.config, data=str(resolve_data_path(data or trained.config.data)),
                              workers=min(trained.config.workers, 2))
    ds = read_dataset(cfg.data)
    split = train.load_split(ds.splits["test"], cfg, progress=False, desc="cache test")
    ctx = train.Context(train.pick_device("auto"))
    trained.model.to(ctx.device)
    loader = train.make_loader(split, cfg, ctx, train=False)
    criterion = train.make_criterion(cfg, np.asarray(ds.splits["train"]["grade"]), ctx.device)
    out = validate(trained.model, loader, cfg, ctx.device, criterion, trained.norm, trained.thresholds)
    base = metrics.majority_baseline(split.labels)
    return {"run": str(run_dir), "checkpoint": checkpoint, "epoch": trained.epoch, "data": cfg.data,
            "skipped": len(split.skipped), **out, "majority_baseline": base}
