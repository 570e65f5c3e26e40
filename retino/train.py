"""Training: a config in, a loop, checkpoints out.

``fit(cfg, run_dir)`` reads the data set, trains on its **train** split, validates every epoch on
**val** (and evaluates **test** for the curves only), keeps ``best.pt`` by val QWK, and at the end
evaluates the chosen checkpoint once on val and test (``predictions.csv``, ``test.json``; see
:mod:`retino.evaluate`). Nothing here reads a test figure to choose anything.

``train_one_epoch`` makes no host sync per step: loss and correct counts accumulate on the device and
are read every ``log_every`` steps (0: about twice a second), where the stop flag is also agreed
across ranks. ``validate`` returns a split's outputs, gathered on rank 0 under torchrun. A run writes
only through :mod:`retino.runs`; its process lifecycle (heartbeat, locks, signals) is
:mod:`retino.lifecycle`. Under ``torchrun`` it trains with DistributedDataParallel; only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import lifecycle, metrics, runs
from .config import TrainConfig
from .data import DatasetError, read_dataset
from .data.cache import build_cache, local_group, node_barrier
from .data.loaders import CachedImages, DecodedImages, epoch_seed, resolve_workers, to_input
from .data.loaders import make_loader as data_loader
from .grades import DEFAULT_THRESHOLDS
from .models import build_model, normalization


class TrainingError(RuntimeError):
    """The run cannot go on (a diverging loss, an empty split); the message says what to change."""


# ----------------------------------------------------------------------------- process context

@dataclass
class Context:
    """Where this process trains: device and distributed rank. The stop flag is :data:`lifecycle.STOP`."""

    device: torch.device
    rank: int = 0
    world: int = 1
    barrier: object = None  # this machine's ranks (cache building under torchrun), None alone

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, stop: bool, seconds: float) -> tuple[bool, float]:
        """(any rank asked to stop, the slowest rank's seconds): one all-reduce, at log points only."""
        if self.world == 1:
            return stop, seconds
        t = torch.tensor([float(stop), seconds], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        stop_any, slowest = t.tolist()
        return bool(stop_any), slowest


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup_context(cfg: TrainConfig) -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Context(device, rank, world, barrier=node_barrier() if world > 1 else None)


# ----------------------------------------------------------------------------- data

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
    return lambda out, y: F.cross_entropy(out.float(), y, weight=weight.to(out.device))


def autocast(cfg: TrainConfig, device):
    if device.type == "cuda" and cfg.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def grades_of(out: torch.Tensor, head: str, thresholds: torch.Tensor) -> torch.Tensor:
    """Predicted grades on the device: argmax, or the score cut at ``thresholds`` (as np.digitize)."""
    if head == "regress":
        return torch.bucketize(out.float().view(-1), thresholds, right=True)
    return out.argmax(1)


# ----------------------------------------------------------------------------- one epoch

@dataclass
class EpochState:
    """A training epoch's accumulators (device tensors: reading them is a host sync), saved mid-epoch."""

    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    correct: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    bad_step: torch.Tensor = field(default_factory=lambda: torch.tensor(-1))  # first non-finite loss
    seen: int = 0
    step: int = 0

    def to(self, device) -> "EpochState":
        self.loss_sum, self.correct, self.bad_step = (t.to(device) for t in (self.loss_sum, self.correct,
                                                                             self.bad_step))
        return self

    def as_dict(self) -> dict:
        return {"loss_sum": float(self.loss_sum), "correct": int(self.correct), "seen": self.seen,
                "step": self.step}

    @classmethod
    def from_dict(cls, d: dict) -> "EpochState":
        return cls(torch.tensor(float(d["loss_sum"]), dtype=torch.float64),
                   torch.tensor(int(d["correct"])), torch.tensor(-1), int(d["seen"]), int(d["step"]))


class Cadence:
    """When to read the device: every ``every`` steps, or (0) as often as keeps it about twice a second."""

    def __init__(self, every: int, target_s: float = 0.5):
        self.every, self.target_s = every, target_s
        self.next = every or 1  # auto: read after the first step, then as its measured time says

    def due(self, step: int) -> bool:
        return step >= self.next

    def schedule(self, step: int, seconds_per_step: float) -> None:
        interval = self.every or max(1, min(1000, round(self.target_s / max(seconds_per_step, 1e-6))))
        self.next = step + interval


def train_one_epoch(model, loader, *, optimizer, scheduler, criterion, cfg: TrainConfig, ctx: Context, norm,
                    gen: torch.Generator, state: EpochState, thresholds, on_log=None, epoch: int = 0) -> EpochState:
    """Train until the loader ends or a stop is agreed; ``state`` carries over a resumed epoch.

    ``on_log(state)`` is called at each log point, after the accumulators were read (the only syncs).
    Raises TrainingError when the loss stops being finite.
    """
    model.train()
    thr = torch.tensor(list(thresholds), dtype=torch.float32, device=ctx.device)
    state.to(ctx.device)
    cadence, t_last, step_last = Cadence(cfg.log_every), time.monotonic(), state.step
    for images, labels in lifecycle.batches(loader):
        if len(labels) == 0:  # every image of the batch broke since the scan (uncached; each named once)
            continue
        x = to_input(images, ctx.device, norm, mode=cfg.augment, gen=gen, interpolation=cfg.interpolation,
                     channels_last=cfg.channels_last)  # (B, 3, H, W)
        y = labels.to(ctx.device, non_blocking=True)  # (B,)
        with autocast(cfg, ctx.device):
            out = model(x)  # (B, 5) logits or (B, 1) score
        loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = len(labels)
        finite = torch.isfinite(loss.detach())
        state.bad_step = torch.where(~finite & (state.bad_step < 0), state.step + 1, state.bad_step)
        state.loss_sum += loss.detach().double() * n
        state.correct += (grades_of(out.detach(), cfg.head, thr) == y).sum()
        state.seen += n
        state.step += 1
        stop = lifecycle.STOP.is_set()
        if ctx.world == 1 and not stop and not cadence.due(state.step):
            continue  # a single process reads its stop flag for free; ranks agree at log points only
        if ctx.world > 1 and not cadence.due(state.step):
            continue
        now = time.monotonic()
        stop, slowest = ctx.agree(stop, (now - t_last) / max(1, state.step - step_last))
        cadence.schedule(state.step, slowest)
        t_last, step_last = now, state.step
        _check_finite(state, cfg, epoch)
        if on_log:
            on_log(state)
        if stop:
            break
    _check_finite(state, cfg, epoch)
    return state


def _check_finite(state: EpochState, cfg: TrainConfig, epoch: int) -> None:
    bad = int(state.bad_step)
    if bad >= 0:
        raise TrainingError(f"loss became NaN at epoch {epoch} step {bad} (or infinite; lr {cfg.lr:g}): "
                            f"lower --lr")


@torch.inference_mode()
def validate(model, loader, *, cfg: TrainConfig, ctx: Context, norm) -> np.ndarray | None:
    """This split's raw outputs, (N, 5) logits or (N, 1) scores as float32, in split order.

    Each rank evaluates its shard; rank 0 gathers and returns the whole split, other ranks None.
    One host copy per split, at the end.
    """
    model.eval()
    outs = []
    for images, labels in loader:
        if len(labels) == 0:
            continue
        x = to_input(images, ctx.device, norm, channels_last=cfg.channels_last)
        with autocast(cfg, ctx.device):
            outs.append(model(x).float())
    mine = torch.cat(outs).cpu().numpy() if outs else np.zeros((0, 1 if cfg.head == "regress" else 5), np.float32)
    if ctx.world == 1:
        return mine
    shards = [None] * ctx.world
    dist.all_gather_object(shards, mine)
    if not ctx.main:
        return None
    n = sum(len(s) for s in shards)
    whole = np.empty((n, mine.shape[1]), np.float32)
    for r, shard in enumerate(shards):  # rank r held items r, r + world, ...
        whole[r::ctx.world] = shard
    return whole


def split_metrics(outputs: np.ndarray, labels: np.ndarray, *, head: str, thresholds, criterion,
                  prefix: str) -> dict:
    """Loss and every metric of :func:`retino.metrics.classification_metrics` from a split's outputs."""
    out = torch.from_numpy(outputs)
    loss = float(criterion(out, torch.tensor(labels))) if len(labels) else math.nan
    if head == "regress":
        score = outputs.reshape(-1).astype(np.float64)
        pred, ref = metrics.apply_thresholds(score, thresholds), score
    else:
        probs = out.softmax(1).numpy()
        pred, ref = probs.argmax(1), metrics.referable_score_from_probs(probs)
    row = metrics.classification_metrics(labels, pred, referable_score=ref, prefix=prefix)
    row[f"{prefix}loss"] = loss
    return row


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
                                                 "phase": "starting"})
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
                beat.update(state="stopped" if lifecycle.STOP.is_set() else "completed", eta_s=0, phase=None)
            return result
        except lifecycle.StoppedWhileQueued:
            beat.update(state="stopped", eta_s=0)
            return {"stopped_at": {"epoch": 0, "step": 0}}
        except BaseException as e:
            if beat:
                beat.update(state="failed", error=lifecycle.failure_message(
                    e, batch_size=cfg.batch_size, image_size=cfg.image_size))
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

    # data: train / val / test, each checked before a single step
    ds = read_dataset(cfg.data, val_fraction=cfg.val_fraction)
    splits = {}
    for name in ("train", "val", "test"):
        if beat:
            beat.update(phase=f"caching {name} images")
        splits[name] = load_split(ds.splits[name], cfg, progress=show, desc=f"cache {name}", ctx=ctx)
        check_split(splits[name], name, cfg.data)
    train_loader = make_loader(splits["train"], cfg, ctx, train=True)
    eval_loaders = {name: make_loader(splits[name], cfg, ctx, train=False) for name in ("val", "test")}
    dataset_info = {**ds.describe(), "skipped": [{"file": p, "error": e} for s in splits.values()
                                                for p, e in s.skipped]}

    # model, optimiser, criterion
    model = build_model(cfg.arch, pretrained=cfg.pretrained, head=cfg.head, weights_path=cfg.weights or None)
    norm = normalization(cfg.arch, cfg.pretrained)
    model.to(ctx.device)
    if ctx.device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = train_loader.batch_sampler.steps
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    criterion = make_criterion(cfg, splits["train"].labels)
    gen = torch.Generator()
    thresholds, best, best_epoch, start_epoch, partial = list(DEFAULT_THRESHOLDS), -math.inf, 0, 1, None

    if resume and (run_dir / "last.pt").is_file():
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
    elif ctx.main:
        runs.reconcile(run_dir, None, for_predicting)  # a fresh start (or a resume before any epoch)
        runs.write_config(run_dir, cfg.to_dict(), dataset=dataset_info, norm=norm, world=ctx.world,
                          device=str(ctx.device), data_fingerprint=ds.fingerprint() if hasattr(ds, "fingerprint")
                          else runs.labels_fingerprint(ds.splits))
    if ctx.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile and ctx.device.type == "cuda":  # GPU-only: inductor on a 2-core CPU compiles for minutes
        model = torch.compile(model)

    eta = _Eta(cfg, steps_per_epoch, n_eval=len(splits["val"].frame) + len(splits["test"].frame))
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
                rate = eta.observe(s.seen * ctx.world)
                beat.progress(epoch=epoch, step=s.step, steps=steps_per_epoch, images_per_s=round(rate, 1),
                              eta_s=eta.seconds_left(epoch, s.step), train_loss=loss,
                              **_step_log(beat, epoch, s.step, steps_per_epoch, loss, optimizer))

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
                                   row=runs.json_safe(row))
            # metrics, then last.pt, then best.pt: a kill between two of them leaves a folder that a
            # resume reconciles exactly (runs.reconcile): metrics ahead of last.pt are replayed, a
            # best.pt behind last.pt's best epoch is rewritten from last.pt.
            lifecycle.save_point("before-metrics", epoch)
            runs.append_metrics(run_dir, row)
            lifecycle.save_point("before-last", epoch)
            runs.save_checkpoint(run_dir / "last.pt", ckpt)
            lifecycle.save_point("before-best", epoch)
            if is_best:
                runs.save_checkpoint(run_dir / "best.pt", for_predicting(ckpt))
            beat.update(epoch=epoch, step=steps_per_epoch, best_qwk=best, best_epoch=best_epoch,
                        val_qwk=row["val_qwk"], val_acc=row["val_acc"], test_qwk=row["test_qwk"],
                        test_acc=row["test_acc"])
            if progress:
                print(f"epoch {epoch}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                      f"train_acc {row['train_acc']:.3f}  val_acc {row['val_acc']:.3f}  "
                      f"val_qwk {row['val_qwk']:.3f}  ({row['seconds']:.0f}s)", file=sys.stderr, flush=True)
        if ctx.world > 1:
            dist.barrier()
        stop, _ = ctx.agree(lifecycle.STOP.is_set(), 0.0)
        if stop and epoch < cfg.epochs:
            return {"stopped_at": {"epoch": epoch, "step": steps_per_epoch}}

    _final_evaluation(cfg, run_dir, ctx, beat, model, eval_loaders, splits, norm)
    if ctx.main and not cfg.keep_last:
        (run_dir / "last.pt").unlink(missing_ok=True)  # 134 MB for a ResNet18; --keep-last keeps it
    return (runs.best_row(runs.read_metrics(run_dir)) or {}) if ctx.main else {}


def _final_evaluation(cfg, run_dir: Path, ctx: Context, beat, model, eval_loaders, splits, norm) -> None:
    """The chosen checkpoint (best.pt, by val QWK) on val and test, once: predictions.csv and test.json."""
    from .ood import fit_run_ood
    from .report import write_evaluation
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
        # the model's own view for the quality gate: its penultimate features of train, cut-off on val
        fit_run_ood(run_dir, unwrap(model), splits["train"], splits["val"], norm=norm, epoch=int(best["epoch"]))


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
