"""A trainer process's life around the training loop: heartbeat, run lock, device queue, stop signals.

``train.py`` holds the loop; this module holds what keeps a run folder honest while the loop runs:
- :class:`Heartbeat` rewrites ``status.json`` every few seconds, so the dashboard can tell a live
  run from a dead one;
- :func:`run_lock` makes a run folder belong to one trainer at a time;
- :func:`device_queue` makes runs on one device wait their turn (state ``queued``);
- the one stop flag, :data:`retino._signals.STOP`, set by SIGTERM/SIGINT, read by the loop;
- :func:`batches` lets a stop that also killed the loader's workers end the epoch gracefully;
- :func:`save_point` marks the moments between two writes where the tests kill the process.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from pathlib import Path

from .. import _signals, runs

STOP = _signals.STOP  # the only stop flag: set before torch loads (CLI) or by the handlers below


class StoppedWhileQueued(Exception):
    """Stop was asked for before the run got its device."""


class RunBusy(runs.RunError):
    """Another process is training this run folder."""


# ----------------------------------------------------------------------------- status

class Heartbeat(threading.Thread):
    """Rewrites status.json every few seconds, so a live run is never mistaken for a dead one."""

    def __init__(self, run_dir: Path, status: dict, every: float = 2.0, progress_every: float = 0.5):
        super().__init__(daemon=True)
        self.run_dir, self.status, self.every, self.progress_every = run_dir, status, every, progress_every
        self.lock, self.done = threading.Lock(), threading.Event()
        self.written = 0.0

    def _write(self) -> None:
        try:
            runs.write_status(self.run_dir, **self.status)
        except OSError:  # a full disk: the next write tries again; the loop's own saves report it
            return
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


class TrainLog:
    """train.log's step lines while an epoch trains: at most one every ``every`` s (log points come
    about twice a second; a day's run would be 170,000 lines), and always the epoch's first point."""

    def __init__(self, run_dir: Path, epochs: int, steps_per_epoch: int, every: float = 10.0):
        self.run_dir, self.epochs, self.steps, self.every = run_dir, epochs, steps_per_epoch, every
        self.last, self.epoch = float("-inf"), None

    def step(self, epoch: int, step: int, loss: float, rate: float, lr: float) -> None:
        now = time.monotonic()
        if epoch == self.epoch and now - self.last < self.every:
            return
        self.last, self.epoch = now, epoch
        runs.append_log(self.run_dir, f"epoch {epoch}/{self.epochs} step {step}/{self.steps}  "
                                      f"train_loss {loss:.4f}  lr {lr:.3g}  {rate:.1f} images/s")


# ----------------------------------------------------------------------------- locks

@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold ``run_dir/.train.lock`` for the whole run: a second trainer on the same folder is refused.

    flock is released by the kernel when its holder dies, so a killed run never locks its folder.
    """
    path = Path(run_dir) / ".train.lock"
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunBusy(f"{run_dir}: is being trained by {holder}; wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()


@contextlib.contextmanager
def device_queue(run_dir: Path, device, beat: Heartbeat, stop: threading.Event = STOP):
    """Hold the device's lock while training: runs on one device wait their turn, state ``queued``.

    The state is ``starting`` until the lock is really found taken. The lock is released by the
    kernel when its holder dies, so a killed run never blocks the queue.
    """
    lock_dir = Path(run_dir).parent / ".locks"
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


# ----------------------------------------------------------------------------- signals

def install_stop_handlers() -> None:
    """SIGTERM and SIGINT set :data:`STOP`: the loop finishes its step, saves and exits ``stopped``."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (a test calling fit in a thread)
    _signals.install()


def batches(loader):
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
            if workers_stopped(e):
                return
            raise
        yield batch


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
        if STOP.is_set():
            return
        torch_handler(signum, frame)
    handler.retino = True
    signal.signal(signal.SIGCHLD, handler)


def workers_stopped(error: BaseException, world: int = 1) -> bool:
    """The loader's workers died of the stop signal itself (single process; see :func:`batches`)."""
    return world == 1 and STOP.is_set() and "DataLoader worker" in str(error)


# ----------------------------------------------------------------------------- faults

def save_point(name: str, epoch: int) -> None:
    """A moment between two writes of an epoch's save; ``RETINO_KILL_AT=<name>:<epoch>`` SIGKILLs here.

    The points: ``before-metrics``, ``before-last``, ``before-best`` (an epoch's save),
    ``before-ood`` (the final evaluation, at the last epoch) and ``caching:0`` (before the first image).

    The reliability tests use it to kill a trainer deterministically between two writes (the
    moments a real crash can fall between); unset, it costs one dictionary lookup.
    """
    if os.environ.get("RETINO_KILL_AT") == f"{name}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)


def failure_message(error: BaseException, *, batch_size: int, image_size: int) -> str:
    """One line for status.json and the CLI: what failed and, where we know, what to change."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "out of memory" in f"{type(error).__name__} {text}".lower() and not isinstance(error, MemoryError):
        return (f"CUDA out of memory at batch size {batch_size} and image size {image_size}: "
                f"lower --batch-size (e.g. {max(1, batch_size // 2)}) or --image-size")
    if isinstance(error, OSError) and error.errno == 28:
        if str(error).startswith("no space left in"):  # the cache build's own message: folder and MB
            return str(error)
        where = f" while writing {error.filename}" if error.filename else ""
        return f"no space left on device{where}: free some space, then resume the run"
    if type(error).__name__ == "TrainingError":  # already a sentence that says what to change
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
