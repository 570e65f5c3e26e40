"""The ``evaluate`` and ``compare`` verbs: a run's test report with intervals, and B minus A, paired.

Both read what :mod:`retino.evaluation.report` wrote at the end of training (``predictions.csv``,
``evaluation.json`` through :func:`retino.inference.choices.read_evaluation`, ``test.json``). A run that is
still training or failed is refused. A run stopped during its final evaluation (or whose
``evaluation.json`` belongs to another epoch) gets that final evaluation finished here, on val, as
training would have done it. A run made before the val split is evaluated once on test to make
``predictions.csv`` (its choices were made on test: ``selected_on`` says so). ``--data`` runs the
model over another data set with the run's own choices applied unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import runs
from . import stats
from ..inference.choices import read_evaluation, referral_of
from ..inference.trained import load_trained
from .report import (BOOT_SEED, N_BOOT, _calibrated_referable, _write_csv, add_referable, choose_on, head_of,
                     prediction_table, read_predictions, report, write_evaluation)
from .. import fileio

FINAL_PHASE = "evaluating"  # status.json's phase while training evaluates its chosen checkpoint


# ----------------------------------------------------------------------------- the verbs

def check_finished(run_dir) -> str | None:
    """The run's state, where ``evaluate`` and ``compare`` may score it; RunError (one line) where not.

    Refused: a run still training, a failed one, and one stopped before its final evaluation (its
    best.pt may still move). A folder without status.json (made by hand, or by an older Retino) passes.
    """
    run_dir = Path(run_dir)
    try:
        status = runs.read_status(run_dir)
    except runs.RunError:
        return None
    state = status.get("state")
    resume = f"python -m retino train --resume --run-dir {run_dir}"
    if state in runs.ACTIVE:
        raise runs.RunError(f"{run_dir.name}: is still training (state {state}); evaluate it when it has finished")
    if state == "failed":
        raise runs.RunError(f"{run_dir.name}: failed ({status.get('error') or 'no reason recorded'}); "
                            f"it has no final evaluation: fix the cause and run {resume}")
    if state not in ("completed", None) and FINAL_PHASE not in str(status.get("phase") or ""):
        raise runs.RunError(f"{run_dir.name}: {state} before it finished training; finish it with {resume}")
    return state


def evaluate_run(run_dir, *, data: str | None = None, split: str = "test") -> dict:
    """``python -m retino evaluate``: the report of a run's chosen checkpoint on ``split``.

    From predictions.csv; with ``data`` (another data set), the model is run on that set's split
    with the run's own choices (temperature, operating point) applied unchanged.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.RunError(f"{run_dir}: the run folder does not exist")
    check_finished(run_dir)
    if data:
        trained = load_trained(run_dir)
        table = _predict_split(run_dir, data, split, trained=trained)
        chosen = _chosen_of(trained)
        return {**report(table, chosen, split=split, epoch=trained.epoch), "data": str(data)}
    table, chosen = ensure_predictions(run_dir)
    return report(table, chosen, split=split, epoch=chosen.get("epoch"))


def _chosen_of(trained) -> dict:
    """The choices load_trained applied, as evaluation.json holds them (for the report)."""
    return {"selected_on": trained.selected_on or "val", "temperature": trained.temperature or 1.0,
            "operating_point": trained.operating_point, "head": trained.config.head,
            "thresholds": list(trained.thresholds), "epoch": trained.epoch}


def ensure_predictions(run_dir) -> tuple[pd.DataFrame, dict]:
    """predictions.csv and the val choices for best.pt; made here where missing or made for another epoch.

    A run with a val split gets its final evaluation finished as training does it (choices on val,
    test reported once, the OOD model); a run from before the val split is evaluated on test, marked.
    """
    run_dir = Path(run_dir)
    trained = load_trained(run_dir)  # checks every run file first
    chosen = read_evaluation(run_dir, head=trained.config.head)
    try:
        table = read_predictions(run_dir)
    except runs.RunError:
        if (run_dir / "predictions.csv").exists():
            raise
        table = None
    if table is not None and chosen is not None and chosen.get("epoch") in (None, trained.epoch):
        fresh = add_referable(table, chosen, trained.thresholds)  # at today's rule: evaluation.json may be edited
        if "referable" not in table.columns or not fresh["referable"].equals(table["referable"].astype(bool)):
            _write_csv(run_dir / "predictions.csv", fresh)
        return fresh, chosen
    cfg = trained.config
    if table is not None or check_finished(run_dir) not in ("completed", None):
        # stopped in its final evaluation, or choices made for another epoch: never choose on test
        return _finish_final_evaluation(run_dir, trained)
    table = _predict_split(run_dir, cfg.data, "test", trained=trained)
    chosen = {**choose_on(table, "test", head=cfg.head, target_sensitivity=cfg.target_sensitivity),
              "epoch": trained.epoch, "head": cfg.head, "thresholds": list(trained.thresholds),
              "note": "chosen on test (a run made before the val split)"}
    table = add_referable(table, chosen)
    _write_csv(run_dir / "predictions.csv", table)
    fileio.write_json(run_dir / "evaluation.json", chosen)
    return table, chosen


def _finish_final_evaluation(run_dir: Path, trained) -> tuple[pd.DataFrame, dict]:
    """What training's final evaluation writes, for best.pt: choices on val, the test report, ood.npz."""
    from ..data import read_dataset
    from ..inference.ood import fit_run_ood
    from ..training.splits import load_split
    cfg = trained.config
    splits = read_dataset(cfg.data, val_fraction=cfg.val_fraction).splits
    if "val" not in splits:
        raise runs.RunError(f"{cfg.data}: has no val split to choose {run_dir.name}'s operating point on")
    parts = {name: _predict_split(run_dir, cfg.data, name, trained=trained, outputs=True) for name in ("val", "test")}
    write_evaluation(run_dir, parts, head=cfg.head, thresholds=trained.thresholds, epoch=trained.epoch,
                     target_sensitivity=cfg.target_sensitivity)
    split_objs = {name: load_split(splits[name], cfg, progress=False, desc=f"cache {name}") for name in ("train", "val")}
    fit_run_ood(run_dir, trained.model, split_objs["train"], split_objs["val"], norm=trained.norm, epoch=trained.epoch)
    return read_predictions(run_dir), read_evaluation(run_dir, head=cfg.head)


def _predict_split(run_dir, data: str, split: str, trained=None, outputs: bool = False):
    """Run a run's best checkpoint over one split of a data set (as trained: size, Ben Graham, norm).

    ``outputs``: ``(frame, outputs)`` as :func:`retino.evaluation.report.write_evaluation` takes them, not the table.
    """
    from dataclasses import replace
    from ..data import read_dataset
    from ..training.loop import Context, pick_device, validate
    from ..training.splits import load_split, make_loader
    trained = trained or load_trained(run_dir)
    cfg = replace(trained.config, data=str(data), workers="auto")
    ds = read_dataset(cfg.data, val_fraction=cfg.val_fraction)
    if split not in ds.splits:
        raise runs.RunError(f"{data}: has no {split} split")
    part = load_split(ds.splits[split], cfg, progress=False, desc=f"cache {split}")
    ctx = Context(pick_device("auto"))
    trained.model.to(ctx.device)
    out = validate(trained.model, make_loader(part, cfg, ctx, train=False), cfg=cfg, ctx=ctx, norm=trained.norm)
    if outputs:
        return part.frame, out
    return prediction_table({split: (part.frame, out)}, head=cfg.head, thresholds=trained.thresholds)


def compare_runs(run_a, run_b, *, data: str | None = None, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """``python -m retino compare``: B minus A on the same test images, paired by patient resampling.

    Raises RunError when the two runs were not evaluated on the same images.
    """
    tables, chosen = [], []
    for run in (run_a, run_b):
        check_finished(run)
        if data:
            trained = load_trained(run)
            tables.append(_predict_split(run, data, "test", trained=trained))
            chosen.append(_chosen_of(trained))
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
        cut, _ = referral_of(c, head_of(t, c))
        sides.append(({"y_true": t["label"].to_numpy(dtype=np.int64), "y_pred": t["grade"].to_numpy(dtype=np.int64),
                       "ref_score": _calibrated_referable(t, c.get("temperature", 1.0))}, cut))
    diff = stats.paired_difference(sides[0][0], sides[1][0], groups=a["patient"].to_numpy(),
                                   threshold_a=sides[0][1], threshold_b=sides[1][1], n_boot=n_boot, seed=seed)
    return fileio.json_safe({"a": str(run_a), "b": str(run_b), "n_images": int(len(a)),
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
