"""One epoch of training and one pass of evaluation, on any device and under torchrun.

``train_one_epoch`` makes no host sync per step: loss and correct counts accumulate on the device and
are read every ``log_every`` steps (0: about twice a second), where the stop flag is also agreed
across ranks. ``validate`` returns a split's raw outputs, each rank evaluating its shard and rank 0
gathering them. :mod:`retino.training.train` runs these epoch after epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from . import lifecycle
from ..evaluation import metrics
from ..config import TrainConfig
from ..data.cache import node_barrier
from ..data.augment import to_input


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
    logged = state.step
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
        logged = state.step
        if stop:
            break
    _check_finite(state, cfg, epoch)
    if on_log and state.step != logged:  # the epoch's last steps fell between log points: one more read
        on_log(state)
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
    """Loss and every metric of :func:`retino.evaluation.metrics.classification_metrics` from a split's outputs."""
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
