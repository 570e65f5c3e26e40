"""Training: a config in, epochs of :mod:`retino.training.loop`, checkpoints out.

``fit(cfg, run_dir)`` reads the data set, trains on its **train** split, validates every epoch on
**val** (and evaluates **test** for the curves only), keeps ``best.pt`` by val QWK, and at the end
evaluates the chosen checkpoint once on val and test (``predictions.csv``, ``test.json``; see
:mod:`retino.evaluation.report`). Nothing here reads a test figure to choose anything.

One epoch (no host sync per step) and one evaluation pass are :mod:`retino.training.loop`; the splits and
their loaders :mod:`retino.training.splits`. A run writes only through :mod:`retino.runs`; its process
lifecycle (heartbeat, locks, signals) is :mod:`retino.training.lifecycle`. Under ``torchrun`` it trains with
DistributedDataParallel; only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import lifecycle, tracking
from ..evaluation import metrics
from .. import runs
from ..config import TrainConfig
from ..data import DatasetError, read_dataset
from ..data.loaders import epoch_seed
from .loop import Context, EpochState, TrainingError, setup_context, split_metrics, train_one_epoch, validate
from .splits import check_split, load_split, make_loader
from ..grades import DEFAULT_THRESHOLDS
from ..models import build_model, normalization
from .. import fileio


# ----------------------------------------------------------------------------- model and optimiser

def build_optimizer(model, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"Invalid optimizer '{cfg.optimizer}'. Only sgd and adamw are supported.")


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """A per-step LambdaLR: linear warm-up, then cosine to 0, x0.1 every ``step_size`` epochs, or flat."""
    total, warm = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        if cfg.schedule == "step":
            return 0.1 ** (step // (cfg.step_size * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_criterion(cfg: TrainConfig, train_labels: np.ndarray):
    """``loss(out, y)`` on any device: CE (optionally class-weighted) for classify, MSE/SmoothL1 for regress."""
    if cfg.head == "regress":
        fn = F.mse_loss if cfg.loss == "mse" else F.smooth_l1_loss
        return lambda out, y: fn(out.float().view(-1), y.float())
    counts = np.bincount(train_labels, minlength=5)
    weight = torch.tensor(metrics.class_weights(counts, cfg.class_weights), dtype=torch.float32)
    on_device: dict = {}  # the weights copied once per device: a copy each step was a GPU sync each step

    def loss(out, y):
        w = on_device.get(out.device)
        if w is None:
            w = on_device[out.device] = weight.to(out.device)
        return F.cross_entropy(out.float(), y, weight=w)
    return loss


# ----------------------------------------------------------------------------- checkpoints

_RESUME_ONLY = ("optimizer", "scheduler", "partial", "aug_rng")


def unwrap(model):
    net = model.module if hasattr(model, "module") else model
    return getattr(net, "_orig_mod", net)  # torch.compile wrapper


def make_checkpoint(*, model, optimizer, scheduler, cfg, dataset_info, epoch, partial, gen, thresholds,
                    best, best_epoch, norm, row=None) -> dict:
    """A plain dict (torchvision references' style): weights, optimizer, where the run is, its config.

    ``row`` is the epoch's metrics line, so a resume can restore a line torn off metrics.jsonl.
    """
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch, "partial": partial, "aug_rng": gen.get_state(),
            "thresholds": list(thresholds), "best_qwk": best, "best_epoch": best_epoch, "selected_on": "val",
            "config": cfg.to_dict(), "dataset": dataset_info, "row": row,
            "norm": {"mean": list(norm[0]), "std": list(norm[1])}}


def for_predicting(ckpt: dict) -> dict:
    """best.pt: the weights without the optimizer (a third of the size)."""
    return {k: v for k, v in ckpt.items() if k not in _RESUME_ONLY}


# ----------------------------------------------------------------------------- the run

def fit(cfg: TrainConfig, run_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into ``run_dir`` (or continue it from last.pt); returns the best epoch's metrics."""
    cfg.validate()
    run_dir = Path(run_dir)
    ctx = setup_context(cfg)
    lifecycle.install_stop_handlers()
    beat = None
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    with (lifecycle.run_lock(run_dir) if ctx.main else contextlib.nullcontext()):
        if ctx.main:
            beat = lifecycle.Heartbeat(run_dir, {"state": "starting", "pid": os.getpid(), "epoch": 0, "step": 0,
                                                 "epochs": cfg.epochs, "error": None, "started": time.time(),
                                                 "phase": "starting", "ood_skipped": None})
            runs.append_log(run_dir, f"{'resuming' if resume else 'starting'} {cfg.display_name()}: {cfg.arch} "
                                     f"{'pretrained' if cfg.pretrained else 'from scratch'}, {cfg.epochs} epochs, "
                                     f"data {cfg.data} (pid {os.getpid()})")
            beat.update()
            beat.start()
        try:
            queue = (lifecycle.device_queue(run_dir, ctx.device, beat) if ctx.main and ctx.world == 1
                     else contextlib.nullcontext())
            with queue:
                if beat:
                    beat.update(state="running")
                result = _fit(cfg, run_dir, ctx, beat, resume, progress)
            if beat:
                state = "stopped" if lifecycle.STOP.is_set() else "completed"
                beat.update(state=state, eta_s=0, phase=None)
                at = result.get("stopped_at")
                runs.append_log(run_dir, f"stopped at epoch {at['epoch']}, step {at['step']}: resume continues "
                                         f"from there" if at else state)
            return result
        except lifecycle.StoppedWhileQueued:
            beat.update(state="stopped", eta_s=0)
            runs.append_log(run_dir, "stopped while waiting for the device")
            return {"stopped_at": {"epoch": 0, "step": 0}}
        except BaseException as e:
            if beat:
                message = lifecycle.failure_message(e, batch_size=cfg.batch_size, image_size=cfg.image_size)
                beat.update(state="failed", error=message)
                runs.append_log(run_dir, f"failed: {message}")
            raise
        finally:
            if beat:
                beat.done.set()
            if ctx.world > 1 and dist.is_initialized():
                dist.destroy_process_group()


def _fit(cfg: TrainConfig, run_dir: Path, ctx: Context, beat, resume: bool, progress: bool) -> dict:
    from tqdm import tqdm
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    show = progress and ctx.main

    ds = read_dataset(cfg.data, val_fraction=cfg.val_fraction)
    has_last = resume and (run_dir / "last.pt").is_file()
    finishing = resume and not has_last and trained_without_last(run_dir, cfg)
    starting_over = not (has_last or finishing)
    # the model before the data's cache: missing ImageNet weights are one line now, not after minutes
    # of caching; a run continued from a checkpoint takes its weights from there, not from ImageNet
    model = build_model(cfg.arch, pretrained=cfg.pretrained and starting_over, head=cfg.head,
                        weights_path=(cfg.weights or None) if starting_over else None)
    norm = normalization(cfg.arch, cfg.pretrained)
    fingerprint = ds.fingerprint() if hasattr(ds, "fingerprint") else runs.labels_fingerprint(ds.splits)

    def save_config(dataset: dict) -> None:
        runs.write_config(run_dir, cfg.to_dict(), dataset=dataset, norm=norm, world=ctx.world,
                          device=str(ctx.device), data_fingerprint=fingerprint)

    if ctx.main and starting_over:
        runs.reconcile(run_dir, None, for_predicting)  # a fresh start (or a resume before any epoch)
        runs.remove_final(run_dir)
        save_config(ds.describe())  # before caching: a run killed while caching has its settings to resume

    lifecycle.save_point("caching", 0)  # config.json written, no image cached yet
    # data: train / val / test, each checked before a single step
    splits = {}
    for name in ("train", "val", "test"):
        if beat:
            beat.update(phase=f"caching {name} images")
            runs.append_log(run_dir, f"caching {name} images")
        splits[name] = load_split(ds.splits[name], cfg, progress=show, desc=f"cache {name}", ctx=ctx)
        check_split(splits[name], name, cfg.data)
    train_loader = make_loader(splits["train"], cfg, ctx, train=True)
    eval_loaders = {name: make_loader(splits[name], cfg, ctx, train=False) for name in ("val", "test")}
    dataset_info = {**ds.describe(), "skipped": [{"file": p, "error": e} for s in splits.values()
                                                for p, e in s.skipped]}
    if ctx.main and starting_over and dataset_info["skipped"]:
        save_config(dataset_info)  # now with the images the cache could not read

    # model on its device, optimiser, criterion
    model.to(ctx.device)
    if ctx.device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = train_loader.batch_sampler.steps
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    criterion = make_criterion(cfg, splits["train"].labels)
    gen = torch.Generator()
    thresholds, best, best_epoch, start_epoch, partial = list(DEFAULT_THRESHOLDS), -math.inf, 0, 1, None

    if has_last:
        ckpt = runs.load_checkpoint(run_dir / "last.pt")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        thresholds, best = list(ckpt["thresholds"]), float(ckpt["best_qwk"])
        best_epoch = int(ckpt.get("best_epoch") or 0)
        partial, start_epoch = ckpt.get("partial"), ckpt["epoch"] + 1
        if partial is not None:
            gen.set_state(ckpt["aug_rng"])
        if ctx.main:
            runs.reconcile(run_dir, ckpt, for_predicting)
            if start_epoch <= cfg.epochs:
                runs.remove_final(run_dir)  # more epochs: the last final evaluation no longer describes the run
    elif finishing:
        start_epoch = cfg.epochs + 1  # every epoch saved, last.pt removed: only the final evaluation is left
    tracker = tracking.Tracker(run_dir, main=ctx.main, config=cfg.to_dict())  # RUN/tb; MLflow if set
    if ctx.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile and ctx.device.type == "cuda":  # GPU-only: inductor on a 2-core CPU compiles for minutes
        model = torch.compile(model)

    eta = _Eta(cfg, steps_per_epoch, n_eval=len(splits["val"].frame) + len(splits["test"].frame))
    log = lifecycle.TrainLog(run_dir, cfg.epochs, steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs + 1):
        state = EpochState.from_dict(partial) if partial is not None else EpochState()
        if partial is None:
            gen.manual_seed(epoch_seed(cfg.seed, epoch))
        partial = None
        train_loader.batch_sampler.set_epoch(epoch, start=state.step * cfg.batch_size)
        t0, seen0 = time.time(), state.seen
        bar = tqdm(total=steps_per_epoch, initial=state.step, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not show, leave=False)
        if beat:
            beat.update(phase="training", epoch=epoch, step=state.step, steps=steps_per_epoch)

        def on_log(s: EpochState) -> None:
            bar.update(s.step - bar.n)
            if beat:
                loss = float(s.loss_sum) / max(s.seen, 1)
                tracker.step((epoch - 1) * steps_per_epoch + s.step, loss, optimizer.param_groups[0]["lr"])
                rate = eta.observe(s.seen * ctx.world)
                beat.progress(epoch=epoch, step=s.step, steps=steps_per_epoch, images_per_s=round(rate, 1),
                              eta_s=eta.seconds_left(epoch, s.step), train_loss=loss,
                              **_step_log(beat, epoch, s.step, steps_per_epoch, loss, optimizer))
                log.step(epoch, s.step, loss, rate, optimizer.param_groups[0]["lr"])

        def save_partial() -> dict:
            """Save this epoch as far as it got (a partial epoch in last.pt), so Resume continues it."""
            if ctx.main:
                runs.save_checkpoint(run_dir / "last.pt", make_checkpoint(
                    model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg, dataset_info=dataset_info,
                    epoch=epoch - 1, partial=state.as_dict(), gen=gen, thresholds=thresholds, best=best,
                    best_epoch=best_epoch, norm=norm))
            return {"stopped_at": {"epoch": epoch, "step": state.step}}

        eta.start_epoch(state.seen * ctx.world)
        state = train_one_epoch(model, train_loader, optimizer=optimizer, scheduler=scheduler, criterion=criterion,
                                cfg=cfg, ctx=ctx, norm=norm, gen=gen, state=state, thresholds=thresholds,
                                on_log=on_log, epoch=epoch)
        bar.close()
        if lifecycle.STOP.is_set() and state.step < steps_per_epoch:  # mid-epoch
            return save_partial()
        train_seconds = time.time() - t0
        if beat:
            beat.update(phase="validating")
        t_eval = time.time()
        try:
            outputs = {name: validate(model, loader, cfg=cfg, ctx=ctx, norm=norm)
                       for name, loader in eval_loaders.items()}
        except RuntimeError as e:
            if not lifecycle.workers_stopped(e, ctx.world):
                raise
            return save_partial()  # trained but not evaluated: Resume goes straight to the evaluation
        eta.eval_took(time.time() - t_eval)
        for name in outputs if ctx.main else ():
            if len(outputs[name]) != len(splits[name].frame):
                raise DatasetError(f"{cfg.data}: {len(splits[name].frame) - len(outputs[name])} {name} images "
                                   f"broke while decoding (named above); fix them, or train with --cache true")
        if ctx.main and not all(np.isfinite(o).all() for o in outputs.values()):
            raise TrainingError(f"loss became NaN at epoch {epoch} step {state.step}: the model's outputs are no "
                                f"longer finite (lr {cfg.lr:g}): lower --lr")
        if ctx.main:
            if cfg.head == "regress":  # thresholds optimised for QWK on val predictions, never on test
                thresholds = metrics.fit_thresholds(outputs["val"].reshape(-1), splits["val"].labels)
            row = {"epoch": epoch, "train_loss": float(state.loss_sum) / max(state.seen, 1),
                   "train_acc": int(state.correct) / max(state.seen, 1), "lr": optimizer.param_groups[0]["lr"]}
            for name in ("val", "test"):
                row.update(split_metrics(outputs[name], splits[name].labels, head=cfg.head, thresholds=thresholds,
                                         criterion=criterion, prefix=f"{name}_"))
            row.update(thresholds=list(thresholds) if cfg.head == "regress" else None, selected_on="val",
                       train_images_per_s=(state.seen - seen0) * ctx.world / max(train_seconds, 1e-6),
                       seconds=time.time() - t0)
            is_best = row["val_qwk"] > best
            if is_best:
                best, best_epoch = row["val_qwk"], epoch
            ckpt = make_checkpoint(model=model, optimizer=optimizer, scheduler=scheduler, cfg=cfg,
                                   dataset_info=dataset_info, epoch=epoch, partial=None, gen=gen,
                                   thresholds=thresholds, best=best, best_epoch=best_epoch, norm=norm,
                                   row=fileio.json_safe(row))
            # metrics, then last.pt, then best.pt: a kill between two of them leaves a folder that a
            # resume reconciles exactly (runs.reconcile): metrics ahead of last.pt are replayed, a
            # best.pt behind last.pt's best epoch is rewritten from last.pt.
            lifecycle.save_point("before-metrics", epoch)
            runs.append_metrics(run_dir, row)
            tracker.epoch(row)
            lifecycle.save_point("before-last", epoch)
            runs.save_checkpoint(run_dir / "last.pt", ckpt)
            lifecycle.save_point("before-best", epoch)
            if is_best:
                runs.save_checkpoint(run_dir / "best.pt", for_predicting(ckpt))
            beat.update(epoch=epoch, step=steps_per_epoch, best_qwk=best, best_epoch=best_epoch,
                        val_qwk=row["val_qwk"], val_acc=row["val_acc"], test_qwk=row["test_qwk"],
                        test_acc=row["test_acc"])
            line = (f"epoch {epoch}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                    f"train_acc {row['train_acc']:.3f}  val_acc {row['val_acc']:.3f}  "
                    f"val_qwk {row['val_qwk']:.3f}  ({row['seconds']:.0f}s)")
            runs.append_log(run_dir, line + ("  best so far" if is_best else ""))
            if progress:
                print(line, file=sys.stderr, flush=True)
        if ctx.world > 1:
            dist.barrier()
        stop, _ = ctx.agree(lifecycle.STOP.is_set(), 0.0)
        if stop and epoch < cfg.epochs:
            return {"stopped_at": {"epoch": epoch, "step": steps_per_epoch}}

    _final_evaluation(cfg, run_dir, ctx, beat, model, eval_loaders, splits, norm)
    if ctx.main:
        tracker.finish(cfg.to_dict(), runs.best_row(runs.read_metrics(run_dir)), runs.read_json(run_dir / "test.json"))
    if ctx.main and not cfg.keep_last:
        (run_dir / "last.pt").unlink(missing_ok=True)  # 134 MB for a ResNet18; --keep-last keeps it
    return (runs.best_row(runs.read_metrics(run_dir)) or {}) if ctx.main else {}


def trained_without_last(run_dir: Path, cfg: TrainConfig) -> bool:
    """Every epoch is saved and best.pt is there, but last.pt is gone (removed at completion): a resume
    can only redo the final evaluation, from best.pt."""
    return len(runs.read_metrics(run_dir)) >= cfg.epochs and (Path(run_dir) / "best.pt").is_file()


def _final_evaluation(cfg, run_dir: Path, ctx: Context, beat, model, eval_loaders, splits, norm) -> None:
    """The chosen checkpoint (best.pt, by val QWK) on val and test, once: predictions.csv and test.json."""
    from ..inference.ood import fit_run_ood
    from ..evaluation.report import write_evaluation
    if beat:
        beat.update(phase="evaluating the chosen checkpoint on test")
    best = runs.load_checkpoint(run_dir / "best.pt", map_location=ctx.device) if ctx.main else None
    if ctx.world > 1:
        holder = [best["model"] if best else None]
        dist.broadcast_object_list(holder, src=0)
        state = holder[0]
    else:
        state = best["model"]
    unwrap(model).load_state_dict(state)
    outputs = {name: validate(model, loader, cfg=cfg, ctx=ctx, norm=norm) for name, loader in eval_loaders.items()}
    if ctx.main:
        write_evaluation(run_dir, {name: (splits[name].frame, outputs[name]) for name in outputs},
                         head=cfg.head, thresholds=list(best["thresholds"]), epoch=int(best["epoch"]),
                         target_sensitivity=cfg.target_sensitivity)
        runs.append_log(run_dir, f"final evaluation of epoch {int(best['epoch'])}: predictions.csv, "
                                 f"evaluation.json and test.json written")
        lifecycle.save_point("before-ood", cfg.epochs)  # test.json written, ood.npz not yet
        # the model's own view for the quality gate: its penultimate features of train, cut-off on val
        if fit_run_ood(run_dir, unwrap(model), splits["train"], splits["val"], norm=norm,
                       epoch=int(best["epoch"])) is None and beat:
            beat.update(ood_skipped=True)  # nothing to fit: the run is complete without ood.npz


# ----------------------------------------------------------------------------- progress

class _Eta:
    """Time left from the measured rate of recent steps (not the first, slow ones) plus evaluation."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, n_eval: int):
        self.cfg, self.steps, self.n_eval = cfg, steps_per_epoch, n_eval
        self.rate, self.eval_s = 0.0, None
        self.t, self.seen = time.monotonic(), 0

    def start_epoch(self, seen: int) -> None:
        self.t, self.seen = time.monotonic(), seen

    def observe(self, seen: int) -> float:
        now = time.monotonic()
        if seen > self.seen and now > self.t:
            recent = (seen - self.seen) / (now - self.t)
            self.rate = recent if self.rate == 0 else 0.7 * self.rate + 0.3 * recent
        self.t, self.seen = now, seen
        return self.rate

    def eval_took(self, seconds: float) -> None:
        self.eval_s = seconds

    def seconds_left(self, epoch: int, step: int) -> int:
        if self.rate <= 0:
            return 0
        steps_left = (self.steps - step) + (self.cfg.epochs - epoch) * self.steps
        evals_left = self.cfg.epochs - epoch + 2  # this epoch's, later ones', and the final evaluation
        # before the first evaluation, guess it from the training rate (no backward pass: ~3x as fast)
        per_eval = self.eval_s if self.eval_s is not None else self.n_eval / (3 * self.rate)
        return round(steps_left * self.cfg.batch_size / self.rate + evals_left * per_eval)


STEP_LOG_LEN = 200  # points of the live loss curve kept in status.json


def _step_log(beat, epoch: int, step: int, steps_per_epoch: int, loss: float, optimizer) -> dict:
    """The live curve's next point (global step, epoch loss so far, lr), at most STEP_LOG_LEN kept."""
    log = list(beat.status.get("step_log") or [])
    log.append({"step": (epoch - 1) * steps_per_epoch + step, "epoch": epoch, "loss": loss,
                "lr": optimizer.param_groups[0]["lr"]})
    if len(log) > STEP_LOG_LEN:
        log = log[::2]  # halve the resolution instead of forgetting the start
    return {"step_log": log}
