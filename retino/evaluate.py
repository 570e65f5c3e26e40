"""A trained run's model, loaded from its own checkpoint and config, and its metrics on a data set."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import metrics, runs
from .config import TrainConfig
from .models import build_model


@dataclass
class Trained:
    """A model ready for inference, with what it was trained with (never today's widget values)."""

    model: torch.nn.Module
    config: TrainConfig
    norm: tuple  # (mean, std)
    thresholds: list
    epoch: int
    run_dir: Path


def load_trained(run_dir, checkpoint: str = "best.pt", device: str = "cpu") -> Trained:
    """Build the run's architecture and load its checkpoint (weights_only: no pickled code runs)."""
    run_dir = Path(run_dir)
    ckpt = runs.load_checkpoint(run_dir / checkpoint)
    try:
        cfg = TrainConfig.from_dict(ckpt["config"])
        model = build_model(cfg.arch, pretrained=False, head=cfg.head)
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise runs.RunError(f"{run_dir / checkpoint}: does not hold a model Retino can load ({e})") from None
    model.to(device).eval()
    norm = (tuple(ckpt["norm"]["mean"]), tuple(ckpt["norm"]["std"]))
    return Trained(model, cfg, norm, list(ckpt.get("thresholds", [0.5, 1.5, 2.5, 3.5])), int(ckpt["epoch"]), run_dir)


def evaluate_run(run_dir, *, data: str | None = None, checkpoint: str = "best.pt") -> dict:
    """Every test metric of a run's checkpoint on its test split (or another data set's)."""
    from .data import read_dataset
    from .train import Context, evaluate, load_split, make_criterion, make_loader, pick_device
    trained = load_trained(run_dir, checkpoint)
    cfg = trained.config
    cfg.data = data or cfg.data
    cfg.workers = min(cfg.workers, 2)
    ds = read_dataset(cfg.data)
    split = load_split(ds.splits["test"], cfg, progress=False, desc="cache test")
    ctx = Context(pick_device("auto"))
    trained.model.to(ctx.device)
    loader = make_loader(split, cfg, ctx, train=False)
    criterion = make_criterion(cfg, np.asarray(ds.splits["train"]["grade"]), ctx.device)
    out = evaluate(trained.model, loader, cfg, ctx.device, criterion, trained.norm, trained.thresholds)
    base = metrics.majority_baseline(split.labels)
    return {"run": str(run_dir), "checkpoint": checkpoint, "epoch": trained.epoch, "data": cfg.data,
            "skipped": len(split.skipped), **out, "majority_baseline": base}
