"""The ``evaluate`` and ``compare`` verbs: a run's test report with intervals, and B minus A, paired.

Both read what :mod:`retino.report` wrote at the end of training (``predictions.csv``,
``evaluation.json``, ``test.json``); a run made before them is evaluated once to make
``predictions.csv`` (its choices were made on test: ``selected_on`` says so), and ``--data`` runs the
model over another data set with the run's own choices applied unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import runs, stats
from .inference import Trained, load_trained  # noqa: F401  (moved to retino.inference; old imports keep working)
from .report import (BOOT_SEED, N_BOOT, PROB_COLS, _calibrated_referable, _write_csv, choose_on,  # noqa: F401
                     prediction_table, read_chosen, read_predictions, report, write_evaluation)


# ----------------------------------------------------------------------------- the verbs

def evaluate_run(run_dir, *, data: str | None = None, split: str = "test") -> dict:
    """``python -m retino evaluate``: the report of a run's chosen checkpoint on ``split``.

    From predictions.csv; with ``data`` (another data set), the model is run on that set's split
    with the run's own choices (temperature, operating point) applied unchanged.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.RunError(f"{run_dir}: the run folder does not exist")
    if data:
        table = _predict_split(run_dir, data, split)
        chosen = read_chosen(run_dir) or {"selected_on": "test", "temperature": 1.0}
        return {**report(table, chosen, split=split, epoch=_epoch(run_dir)), "data": str(data)}
    table, chosen = ensure_predictions(run_dir)
    return report(table, chosen, split=split, epoch=chosen.get("epoch"))


def ensure_predictions(run_dir) -> tuple[pd.DataFrame, dict]:
    """predictions.csv and the val choices; an older run is evaluated once to make them (chosen on test)."""
    run_dir = Path(run_dir)
    chosen = read_chosen(run_dir)
    try:
        table = read_predictions(run_dir)
    except runs.RunError:
        if (run_dir / "predictions.csv").exists():
            raise
        table = None
    if table is not None and chosen is not None:
        return table, chosen
    trained = load_trained(run_dir)
    cfg = trained.config
    table = _predict_split(run_dir, cfg.data, "test", trained=trained)
    _write_csv(run_dir / "predictions.csv", table)
    chosen = {**choose_on(table, "test", head=cfg.head, target_sensitivity=cfg.target_sensitivity),
              "epoch": trained.epoch, "head": cfg.head, "thresholds": list(trained.thresholds),
              "note": "chosen on test (older run)"}
    runs.write_json(run_dir / "evaluation.json", chosen)
    return table, chosen


def _epoch(run_dir) -> int | None:
    chosen = read_chosen(run_dir)
    return chosen.get("epoch") if chosen else None


def _predict_split(run_dir, data: str, split: str, trained=None) -> pd.DataFrame:
    """Run a run's best checkpoint over one split of a data set (as trained: size, Ben Graham, norm)."""
    from dataclasses import replace
    from .data import read_dataset
    from .train import Context, load_split, make_loader, pick_device, validate
    trained = trained or load_trained(run_dir)
    cfg = replace(trained.config, data=str(data), workers="auto")
    ds = read_dataset(cfg.data, val_fraction=cfg.val_fraction)
    if split not in ds.splits:
        raise runs.RunError(f"{data}: has no {split} split")
    part = load_split(ds.splits[split], cfg, progress=False, desc=f"cache {split}")
    ctx = Context(pick_device("auto"))
    trained.model.to(ctx.device)
    outputs = validate(trained.model, make_loader(part, cfg, ctx, train=False), cfg=cfg, ctx=ctx, norm=trained.norm)
    return prediction_table({split: (part.frame, outputs)}, head=cfg.head, thresholds=trained.thresholds)


def compare_runs(run_a, run_b, *, data: str | None = None, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """``python -m retino compare``: B minus A on the same test images, paired by patient resampling.

    Raises RunError when the two runs were not evaluated on the same images.
    """
    tables, chosen = [], []
    for run in (run_a, run_b):
        if data:
            tables.append(_predict_split(run, data, "test"))
            chosen.append(read_chosen(run) or {"temperature": 1.0})
        else:
            t, c = ensure_predictions(run)
            tables.append(t[t["split"] == "test"])
            chosen.append(c)
    a, b = (t.set_index("image") for t in tables)
    if set(a.index) != set(b.index) or len(a) != len(b):
        common = len(set(a.index) & set(b.index))
        raise runs.RunError(f"the runs were not evaluated on the same images: {Path(run_a).name} has {len(a)} "
                            f"test images, {Path(run_b).name} has {len(b)}, {common} in common; compare them "
                            f"on one data set with --data DIR")
    b = b.loc[a.index]
    if not np.array_equal(a["label"].to_numpy(), b["label"].to_numpy()):
        raise runs.RunError("the runs' test images carry different labels: they were not evaluated on the same data")
    sides = []
    for t, c in ((a, chosen[0]), (b, chosen[1])):
        op = (c.get("operating_point") or {}).get("threshold")
        sides.append(({"y_true": t["label"].to_numpy(dtype=np.int64), "y_pred": t["grade"].to_numpy(dtype=np.int64),
                       "ref_score": _calibrated_referable(t, c.get("temperature", 1.0))},
                      op if op is not None else 0.5))
    diff = stats.paired_difference(sides[0][0], sides[1][0], groups=a["patient"].to_numpy(),
                                   threshold_a=sides[0][1], threshold_b=sides[1][1], n_boot=n_boot, seed=seed)
    return runs.json_safe({"a": str(run_a), "b": str(run_b), "n_images": int(len(a)),
                           "n_patients": int(a["patient"].nunique()), "diff": diff, "verdict": verdicts(diff)})


def verdicts(diff: dict) -> dict:
    """A plain sentence per metric: which run is better, or no detectable difference."""
    out = {}
    for name, d in diff.items():
        lo, hi = d.get("lo"), d.get("hi")
        if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
            out[name] = "not computable on these images"
        elif lo > 0:
            out[name] = "B is better: the interval excludes 0"
        elif hi < 0:
            out[name] = "A is better: the interval excludes 0"
        else:
            out[name] = "no detectable difference: the interval includes 0"
    return out
