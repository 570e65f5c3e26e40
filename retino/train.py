"""Training: ``train_one_epoch`` and ``evaluate`` return metric dicts; ``fit`` orchestrates a run.

A run writes only through :mod:`retino.runs`. It survives SIGTERM (finishes the step, saves, state
``stopped``), resumes mid-epoch or from the last whole epoch with identical curves on the CPU, and
under ``torchrun`` trains with DistributedDataParallel (only rank 0 writes).
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import metrics, runs
from .compare import best_row
from .config import TrainConfig
from .data import read_dataset
from .data.cache import build_cache
from .data.loaders import CachedImages, DecodedImages, EpochSampler, rows_collate, to_input
from .models import build_model, normalization


# ----------------------------------------------------------------------------- process context

@dataclass
class Context:
    """Where this process trains: device, distributed rank, and the stop flag set by SIGTERM."""

    device: torch.device
    rank: int = 0
    world: int = 1
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def should_stop(self) -> bool:
        """The stop flag, agreed across ranks so every process stops at the same step."""
        if self.world == 1:
            return self.stop.is_set()
        flag = torch.tensor([float(self.stop.is_set())], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
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
    return Context(device, rank, world)


# ----------------------------------------------------------------------------- data

@dataclass
class Split:
    dataset: torch.utils.data.Dataset
    labels: np.ndarray
    skipped: list  # (path, error) left out because they could not be decoded


def load_split(df, cfg: TrainConfig, *, progress: bool, desc: str) -> Split:
    """A split's images as a torch Dataset: from the decode-once cache, or decoded per item."""
    paths, labels = df["path"].tolist(), df["grade"].to_numpy(dtype=np.int64)
    if not cfg.cache:
        return Split(DecodedImages(paths, labels, cfg.image_size, cfg.ben_graham), labels, [])
    cache = build_cache(paths, cfg.image_size, ben_graham=cfg.ben_graham, workers=cfg.workers,
                        progress=progress, desc=desc)
    keep = np.flatnonzero(cache.ok)
    skipped = [(paths[i], cache.errors[i]) for i in sorted(cache.errors)]
    return Split(CachedImages(cache.path, keep, labels[keep]), labels[keep], skipped)


def make_loader(split: Split, cfg: TrainConfig, ctx: Context, *, train: bool) -> DataLoader:
    sampler = EpochSampler(split.labels, balanced=train and cfg.sampler == "balanced", shuffle=train,
                           seed=cfg.seed, rank=ctx.rank if train else 0, world=ctx.world if train else 1)
    batch = cfg.batch_size if train else (cfg.eval_batch_size or 2 * cfg.batch_size)
    # On a CPU device the cache is read in this process: a row is a memory-mapped read, cheaper than
    # handing it between processes, and worker processes would take cores from the model and the
    # augmentation (bench/data_pipeline.py: 1.6-2.4x the images/s of 2 workers on 2 cores).
    in_process = ctx.device.type == "cpu" and isinstance(split.dataset, CachedImages)
    workers = 0 if in_process else cfg.workers
    return DataLoader(split.dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
                      drop_last=False, collate_fn=rows_collate if in_process else None)


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


def make_criterion(cfg: TrainConfig, train_labels: np.ndarray, device):
    if cfg.head == "regress":
        return F.mse_loss if cfg.loss == "mse" else F.smooth_l1_loss
    counts = np.bincount(train_labels, minlength=5)
    weight = torch.tensor(metrics.class_weights(counts, cfg.class_weights), dtype=torch.float32, device=device)
    return lambda logits, y: F.cross_entropy(logits, y, weight=weight)


def autocast(cfg: TrainConfig, device):
    if device.type == "cuda" and cfg.amp:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def outputs_to_predictions(out: torch.Tensor, head: str, thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grades, scores, referable score) from model outputs; scores are probs (B, 5) or raw (B,)."""
    out = out.float()
    if head == "regress":
        score = out.view(-1).cpu().numpy()
        return metrics.apply_thresholds(score, thresholds), score, score
    probs = out.softmax(1).cpu().numpy()
    return probs.argmax(1), probs, metrics.referable_score_from_probs(probs)


# ----------------------------------------------------------------------------- one epoch

@dataclass
class EpochState:
    """Accumulators of a training epoch, saved in a mid-epoch checkpoint so a resume continues it."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    step: int = 0
    scores: list = field(default_factory=list)  # regression: (score, label) pairs for the thresholds
    labels: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "seen": self.seen, "step": self.step,
                "scores": torch.tensor(self.scores, dtype=torch.float64),
                "labels": torch.tensor(self.labels, dtype=torch.int64)}

    @classmethod
    def from_dict(cls, d: dict) -> "EpochState":
        return cls(float(d["loss_sum"]), int(d["correct"]), int(d["seen"]), int(d["step"]),
                   d["scores"].tolist(), d["labels"].tolist())


def _batches(loader, ctx):
    """The loader's batches; if its workers die after a stop was asked for, the epoch just ends there.

    A signal sent to the whole process group (Ctrl-C in a terminal, ``pkill -f``, systemd stopping
    the unit) reaches the data-loader workers too and kills them; the stop is still graceful.
    """
    it = iter(loader)
    _let_workers_die_quietly_when_stopping()
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            if _workers_stopped(e, ctx):
                return
            raise
        yield batch


_STOP: threading.Event | None = None  # this process's stop request, once fit() has installed its handlers


def _let_workers_die_quietly_when_stopping() -> None:
    """Wrap torch's SIGCHLD handler (set when the first worker pool starts) so that, after a stop
    was asked for, a worker's death is not raised in the middle of a step; the next fetch reports it.

    torch raises "DataLoader worker ... is killed by signal" from inside the signal handler, i.e.
    wherever the main thread happens to be (a convolution, the optimizer step).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if getattr(torch_handler, "retino", False) or not callable(torch_handler):
        return

    def handler(signum, frame):
        if _STOP is not None and _STOP.is_set():
            return
        torch_handler(signum, frame)
    handler.retino = True
    signal.signal(signal.SIGCHLD, handler)


def _workers_stopped(error: BaseException, ctx) -> bool:
    """The loader's workers died of the stop signal itself (single process; see ``_batches``)."""
    return ctx.world == 1 and ctx.stop.is_set() and "DataLoader worker" in str(error)


def train_one_epoch(model, loader, optimizer, scheduler, criterion, cfg, ctx, norm, gen, state: EpochState,
                    thresholds, on_step=None) -> EpochState:
    """Train until the loader ends or a stop is asked for; ``state`` carries over a resumed epoch."""
    model.train()
    for images, labels in _batches(loader, ctx):
        x = to_input(images, ctx.device, norm, mode=cfg.augment, gen=gen, interpolation=cfg.interpolation,
                     channels_last=cfg.channels_last)  # (B, 3, H, W)
        y = labels.to(ctx.device, non_blocking=True)
        with autocast(cfg, ctx.device):
            out = model(x)  # (B, 5) logits or (B, 1) score
            loss = criterion(out.float().view(-1), y.float()) if cfg.head == "regress" else criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        preds, scores, _ = outputs_to_predictions(out.detach(), cfg.head, thresholds)
        state.loss_sum += loss.item() * len(y)
        state.correct += int((preds == labels.numpy()).sum())
        state.seen += len(y)
        state.step += 1
        if cfg.head == "regress":
            state.scores.extend(scores.tolist())
            state.labels.extend(labels.tolist())
        if on_step:
            on_step(state)
        if ctx.should_stop():
            break
    return state


@torch.inference_mode()
def evaluate(model, loader, cfg, device, criterion, norm, thresholds, prefix="test_") -> dict:
    """Loss and every metric of :func:`retino.metrics.classification_metrics` on a split."""
    model.eval()
    loss_sum, n, all_preds, all_ref, all_y = 0.0, 0, [], [], []
    for images, labels in loader:
        x = to_input(images, device, norm, channels_last=cfg.channels_last)
        y = labels.to(device)
        with autocast(cfg, device):
            out = model(x)
        loss = criterion(out.float().view(-1), y.float()) if cfg.head == "regress" else criterion(out.float(), y)
        preds, _, ref = outputs_to_predictions(out, cfg.head, thresholds)
        loss_sum += loss.item() * len(y)
        n += len(y)
        all_preds.append(preds), all_ref.append(ref), all_y.append(labels.numpy())
    y_true, y_pred = np.concatenate(all_y), np.concatenate(all_preds)
    out = metrics.classification_metrics(y_true, y_pred, referable_score=np.concatenate(all_ref), prefix=prefix)
    out[f"{prefix}loss"] = loss_sum / max(n, 1)
    return out


# ----------------------------------------------------------------------------- the run

class Heartbeat(threading.Thread):
    """Rewrites status.json every few seconds, so a live run is never mistaken for a dead one."""

    def __init__(self, run_dir: Path, status: dict, every: float = 2.0, progress_every: float = 0.5):
        super().__init__(daemon=True)
        self.run_dir, self.status, self.every, self.progress_every = run_dir, status, every, progress_every
        self.lock, self.done = threading.Lock(), threading.Event()
        self.written = 0.0

    def _write(self) -> None:
        runs.write_status(self.run_dir, **self.status)
        self.written = time.monotonic()

    def update(self, **fields) -> None:
        """Record and write now (state changes, epoch ends)."""
        with self.lock:
            self.status.update(fields)
            self._write()

    def progress(self, **fields) -> None:
        """Record a step's figures; written at most every ``progress_every`` s (a GPU takes dozens of
        steps a second, and each write is a read, a rename and two fsyncs). ``update`` and the
        heartbeat write whatever was recorded last."""
        with self.lock:
            self.status.update(fields)
            if time.monotonic() - self.written >= self.progress_every:
                self._write()

    def run(self) -> None:
        while not self.done.wait(self.every):
            with self.lock:
                self._write()


class StoppedWhileQueued(Exception):
    """Stop was asked for before the run got its device."""


@contextlib.contextmanager
def device_queue(run_dir: Path, device: torch.device, beat: Heartbeat, stop: threading.Event):
    """Hold the device's lock while training: runs on one device wait their turn, state ``queued``.

    The lock is released by the kernel when its holder dies, so a killed run never blocks the queue.
    """
    lock_dir = run_dir.parent / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{device.type}{device.index or 0}.lock", "w") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if stop.is_set():
                    raise StoppedWhileQueued from None
                if beat.status.get("state") != "queued":
                    beat.update(state="queued")
                time.sleep(0.5)
        yield


def _install_stop_handlers(ctx: Context) -> None:
    global _STOP
    from . import _signals
    _STOP = ctx.stop
    if _signals.STOP.is_set():  # asked before training code was even loaded
        ctx.stop.set()

    def handler(signum, frame):
        ctx.stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


_RESUME_ONLY = ("optimizer", "scheduler", "partial", "aug_rng")


def _checkpoint(model, optimizer, scheduler, cfg, dataset_info, epoch, partial, gen, thresholds, best, norm):
    net = model.module if hasattr(model, "module") else model
    net = getattr(net, "_orig_mod", net)  # torch.compile wrapper
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch, "partial": partial, "aug_rng": gen.get_state(), "thresholds": list(thresholds),
            "best_qwk": best, "config": cfg.to_dict(), "dataset": dataset_info,
            "norm": {"mean": list(norm[0]), "std": list(norm[1])}}


def _oom_message(cfg: TrainConfig) -> str:
    return (f"CUDA out of memory at batch size {cfg.batch_size} and image size {cfg.image_size}: "
            f"lower --batch-size (e.g. {max(1, cfg.batch_size // 2)}) or --image-size")


def fit(cfg: TrainConfig, run_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into ``run_dir`` (or continue it from last.pt); returns the best epoch's metrics."""
    cfg.validate()
    run_dir = Path(run_dir)
    ctx = setup_context(cfg)
    _install_stop_handlers(ctx)
    beat = None
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        beat = Heartbeat(run_dir, {"state": "running", "pid": os.getpid(), "epoch": 0, "step": 0,
                                   "epochs": cfg.epochs, "error": None, "started": time.time()})
        beat.update()
        beat.start()
    try:
        queue = (device_queue(run_dir, ctx.device, beat, ctx.stop) if ctx.main and ctx.world == 1
                 else contextlib.nullcontext())
        with queue:
            if beat:
                beat.update(state="running")
            result = _fit(cfg, run_dir, ctx, beat, resume, progress)
        if beat:
            beat.update(state="stopped" if ctx.stop.is_set() else "completed", eta_s=0)
        return result
    except StoppedWhileQueued:
        beat.update(state="stopped", eta_s=0)
        return {"stopped_at": {"epoch": 0, "step": 0}}
    except BaseException as e:
        if beat:
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
            message = _oom_message(cfg) if oom else f"{type(e).__name__}: {e}"
            beat.update(state="failed", error=message)
        raise
    finally:
        if beat:
            beat.done.set()
        if ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, run_dir: Path, ctx: Context, beat: Heartbeat | None, resume: bool, progress: bool) -> dict:
    from tqdm import tqdm
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    ds = read_dataset(cfg.data)
    show = progress and ctx.main
    train_split = load_split(ds.splits["train"], cfg, progress=show, desc="cache train")
    test_split = load_split(ds.splits["test"], cfg, progress=show, desc="cache test")
    train_loader = make_loader(train_split, cfg, ctx, train=True)
    test_loader = make_loader(test_split, cfg, ctx, train=False)
    dataset_info = {**ds.describe(), "skipped": [{"file": p, "error": e} for p, e in
                                                train_split.skipped + test_split.skipped]}

    model = build_model(cfg.arch, pretrained=cfg.pretrained, head=cfg.head, weights_path=cfg.weights or None)
    norm = normalization(cfg.arch, cfg.pretrained)
    model.to(ctx.device)
    if ctx.device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = math.ceil(train_loader.sampler.per_rank / cfg.batch_size)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    criterion = make_criterion(cfg, train_split.labels, ctx.device)
    gen = torch.Generator()
    thresholds, best, start_epoch, partial = [0.5, 1.5, 2.5, 3.5], -math.inf, 1, None

    if resume:
        ckpt = runs.load_checkpoint(run_dir / "last.pt")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        thresholds, best = list(ckpt["thresholds"]), float(ckpt["best_qwk"])
        partial = ckpt.get("partial")
        start_epoch = ckpt["epoch"] + 1
        if partial is not None:
            gen.set_state(ckpt["aug_rng"])
        if ctx.main:
            runs.truncate_metrics(run_dir, ckpt["epoch"])
    elif ctx.main:
        runs.write_json(run_dir / "config.json", {
            "train": cfg.to_dict(), "dataset": dataset_info, "created": time.time(),
            "versions": {"retino": __import__("retino").__version__, "torch": torch.__version__,
                         "python": sys.version.split()[0]},
            "norm": {"mean": list(norm[0]), "std": list(norm[1])}, "world_size": ctx.world,
            "device": str(ctx.device)})
    if ctx.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile and ctx.device.type == "cuda":
        model = torch.compile(model)

    for epoch in range(start_epoch, cfg.epochs + 1):
        state = EpochState.from_dict(partial) if partial is not None else EpochState()
        if partial is None:
            gen.manual_seed(cfg.seed * 1_000_003 + epoch)
        partial = None
        train_loader.sampler.set_epoch(epoch, start=state.step * cfg.batch_size)
        t0, seen0 = time.time(), state.seen
        bar = tqdm(total=steps_per_epoch, initial=state.step, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not (progress and ctx.main), leave=False)

        def on_step(s: EpochState) -> None:
            bar.update()
            if beat:
                rate = (s.seen - seen0) * ctx.world / max(time.time() - t0, 1e-6)
                left = (steps_per_epoch - s.step) + (cfg.epochs - epoch) * (steps_per_epoch + 0.15 * steps_per_epoch)
                beat.progress(epoch=epoch, step=s.step, steps=steps_per_epoch, images_per_s=round(rate, 1),
                              eta_s=round(left * cfg.batch_size * ctx.world / max(rate, 1e-6)),
                              train_loss=s.loss_sum / max(s.seen, 1))

        def stopped_here() -> dict:
            """Save this epoch as far as it got (a partial epoch in last.pt), so Resume continues it."""
            if ctx.main:
                runs.save_checkpoint(run_dir / "last.pt", _checkpoint(
                    model, optimizer, scheduler, cfg, dataset_info, epoch - 1, state.as_dict(), gen,
                    thresholds, best, norm))
            return {"stopped_at": {"epoch": epoch, "step": state.step}}

        state = train_one_epoch(model, train_loader, optimizer, scheduler, criterion, cfg, ctx, norm, gen,
                                state, thresholds, on_step)
        bar.close()
        if ctx.stop.is_set() and state.step < steps_per_epoch:  # mid-epoch
            return stopped_here()
        train_seconds = time.time() - t0
        if cfg.head == "regress":  # thresholds optimised for QWK on this epoch's training predictions
            thresholds = metrics.fit_thresholds(np.array(state.scores), np.array(state.labels))
        row = None
        if ctx.main:
            net = model.module if hasattr(model, "module") else model
            try:
                test = evaluate(net, test_loader, cfg, ctx.device, criterion, norm, thresholds)
            except RuntimeError as e:
                if not _workers_stopped(e, ctx):
                    raise
                return stopped_here()  # trained but not evaluated: Resume goes straight to the evaluation
            row = {"epoch": epoch, "train_loss": state.loss_sum / max(state.seen, 1),
                   "train_acc": state.correct / max(state.seen, 1), "lr": optimizer.param_groups[0]["lr"],
                   **test,
                   "thresholds": list(thresholds) if cfg.head == "regress" else None,
                   "train_images_per_s": (state.seen - seen0) * ctx.world / max(train_seconds, 1e-6),
                   "seconds": time.time() - t0}
            is_best = row["test_qwk"] > best
            best = max(best, row["test_qwk"])
            # metrics before last.pt: a kill in between leaves last.pt one epoch behind, and a resume
            # truncates metrics.jsonl to last.pt's epoch and replays it, so epochs stay consecutive.
            runs.append_metrics(run_dir, row)
            ckpt = _checkpoint(model, optimizer, scheduler, cfg, dataset_info, epoch, None, gen, thresholds, best, norm)
            if is_best:  # best.pt is for predicting: the weights without the optimizer (a third of the size)
                runs.save_checkpoint(run_dir / "best.pt", {k: v for k, v in ckpt.items() if k not in _RESUME_ONLY})
            runs.save_checkpoint(run_dir / "last.pt", ckpt)
            beat.update(epoch=epoch, step=steps_per_epoch, best_qwk=best, test_qwk=row["test_qwk"],
                        test_acc=row["test_acc"])
            if progress:
                print(f"epoch {epoch}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                      f"train_acc {row['train_acc']:.3f}  test_acc {row['test_acc']:.3f}  "
                      f"test_qwk {row['test_qwk']:.3f}  ({row['seconds']:.0f}s)", file=sys.stderr, flush=True)
        if ctx.world > 1:
            dist.barrier()
        if ctx.should_stop():
            return {"stopped_at": {"epoch": epoch, "step": steps_per_epoch}}
    return (best_row(runs.read_metrics(run_dir)) or {}) if ctx.main else {}
