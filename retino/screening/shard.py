"""One screen shared by torchrun's ranks: each grades its share of the folder, rank 0 merges the shares.

``torchrun --nproc_per_node N -m retino screen RUN FOLDER --out x.csv`` (:func:`screen_sharded`):

1. Every rank finds the same photos (:func:`~retino.screening.screen_paths.find_photos`) and takes those
   whose name hashes to it (:func:`shard_of`): a photo stays with its rank when photos are added to the
   folder between an interrupted screen and its re-run, so no photo is graded into two shares. The error
   rows of the folder walk go to rank 0.
2. Each rank grades on its own device (``cuda:LOCAL_RANK`` on a GPU machine) and on its own share of
   this machine's cores, into its own partial report ``x.rank<r>-of-<N>.csv`` (with its ``.patients.csv``
   and ``.json``) through the single-process screen (:func:`~retino.screening.screen._screen`): the same
   rows, the same appends, the same resume of a partial report cut short.
3. When every rank is done, rank 0 merges the partial rows (and those of an earlier ``x.csv``) into
   ``x.csv`` sorted as a single process sorts them, rebuilds ``x.patients.csv`` with the same
   :func:`~retino.screening.screen_report.patient_table`, writes ``x.json`` (with ``world_size``),
   each atomically, and only then removes the partial files.

Rank 0 holds ``x.csv``'s lock for the whole screen, and each rank its partial's. A screen over another
number of ranks refuses a report holding unmerged partials of N ranks (and so does a single process):
their rows would be left out of the merge.

The ranks talk through torchrun's key-value store rather than through collectives: a collective has
one fixed timeout, but a rank whose share was already graded before a kill may wait hours, rightly,
for one that was not. A rank that fails says so in the store (others stop at once, naming it); a rank
that dies or hangs stops its heartbeat, and the others give up after :data:`STALL_S` seconds, naming it.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import zlib
from pathlib import Path

import pandas as pd

from .. import fileio
from ..data._workers import usable_cores
from .screen import ScreenResult, _screen, default_workers, report_key
from .screen_paths import (MAX_FILES, check_out, default_report, find_photos, lock_path, partial_paths,
                           refuse_partials, report_lock, short)
from .screen_report import ScreenError, open_report, patient_table, read_report, report_paths, write_table

__all__ = ["screen_sharded", "sharded", "RankError", "shard_of"]

STALL_S = 300.0  # seconds a rank may be silent before the others give up on it (RETINO_SCREEN_STALL_S)
HEARTBEAT_S = 5.0
POLL_S = 0.5


class RankError(ScreenError):
    """Another rank failed or fell silent, or the ranks lost each other: the message names the rank."""


# ----------------------------------------------------------------------------- the partial reports

def sharded() -> bool:
    """Whether this process is one of several torchrun ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def shard_of(image: str, world: int) -> int:
    """The rank that grades ``image``: a hash of its name, so that a photo keeps its rank as the folder grows."""
    return zlib.crc32(image.encode("utf-8", "surrogateescape")) % world


# ----------------------------------------------------------------------------- the ranks

class Ranks:
    """This rank's line to the others: torchrun's store, a heartbeat, and :meth:`gather` that never hangs.

    Every rank must call :meth:`gather` with the same tags in the same order.
    """

    def __init__(self, store=None, rank: int | None = None, world: int | None = None, stall_s: float | None = None):
        """``store``: torchrun's (found through its environment) unless given, as tests give theirs."""
        import torch.distributed as dist
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
        self.stall_s = _stall_s() if stall_s is None else stall_s
        if store is None:
            try:
                store, _, _ = next(dist.rendezvous("env://", rank=self.rank, world_size=self.world))
            except Exception as e:  # noqa: BLE001 - no store: say so in one line
                raise RankError(f"rank {self.rank} of {self.world}: cannot reach the other ranks ({e}); "
                                f"start the screen with torchrun") from None
        # A restarted torchrun (--max-restarts) keeps its store: each attempt keeps to its own keys.
        self.store = dist.PrefixStore(f"retino-screen/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="screen-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"alive/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: gather says so
                return
            self._stop.wait(HEARTBEAT_S)

    def close(self) -> None:
        self._stop.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def fail(self, message: str) -> None:
        """Tell the other ranks this one failed, and why (they stop waiting, naming it)."""
        with contextlib.suppress(Exception):
            self.store.set(f"failed/{self.rank}", message)

    def gather(self, tag: str, value: dict) -> list[dict]:
        """Every rank's ``value`` for ``tag``, by rank, once all have given theirs.

        Raises:
            ScreenError: a rank failed (its message), fell silent for ``stall_s``, or the store is gone.
        """
        keys = [f"{tag}/{r}" for r in range(self.world)]
        others = [r for r in range(self.world) if r != self.rank]
        beats = {r: (-1, time.monotonic()) for r in others}
        try:
            self.store.set(keys[self.rank], json.dumps(value))
            while not self.store.check(keys):
                for r in others:
                    if self.store.check([f"failed/{r}"]):
                        why = self.store.get(f"failed/{r}").decode("utf-8", "replace")
                        raise RankError(f"rank {r} of {self.world} failed: {why}")
                    beat = int(self.store.add(f"alive/{r}", 0))
                    if beat != beats[r][0]:
                        beats[r] = (beat, time.monotonic())
                    elif time.monotonic() - beats[r][1] > self.stall_s:
                        raise RankError(f"rank {r} of {self.world} gave no sign of life for {self.stall_s:.0f} s "
                                        f"(killed, or hung): see its output")
                time.sleep(POLL_S)
            return [json.loads(self.store.get(k)) for k in keys]
        except RankError:
            raise
        except Exception as e:  # noqa: BLE001 - the store's host (torchrun's agent, rank 0's machine) is gone
            raise RankError(f"rank {self.rank} of {self.world}: lost the other ranks while waiting for them "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _stall_s() -> float:
    text = os.environ.get("RETINO_SCREEN_STALL_S", "").strip()
    try:
        value = float(text) if text else STALL_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ScreenError(f"RETINO_SCREEN_STALL_S={text!r}: expected a number of seconds > 0 (default {STALL_S:g})")
    return value


def _pin_cores(local_rank: int, local_world: int) -> int:
    """Keep this rank to its share of this machine's cores; returns how many.

    ONNX Runtime's and PyTorch's thread pools, and the decoding processes, size themselves from
    :func:`usable_cores`: N ranks each taking every core would make N times too many threads.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    share = max(1, (len(cores) or usable_cores()) // max(1, local_world))
    if len(cores) >= local_world > 1:
        mine = cores[local_rank * share:(local_rank + 1) * share]
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, mine)
    return share


# ----------------------------------------------------------------------------- the screen

def screen_sharded(run, folder, out=None, *, max_files: int | None = MAX_FILES, device: str = "auto",
                   engine: str = "auto", tta: bool = False, quality_gate: bool = True, workers: int | None = None,
                   progress: bool = False, **options):
    """This rank's share of the screen; on rank 0, the merged report's :class:`ScreenResult`, else None.

    Takes :func:`retino.screening.screen.screen`'s arguments. Run under torchrun (RANK, WORLD_SIZE,
    LOCAL_RANK, LOCAL_WORLD_SIZE and its store).

    Raises:
        ScreenError: on any rank, naming the rank whose folder, report or grading failed.
    """
    with Ranks() as ranks:
        try:
            return _sharded(ranks, run, folder, out, max_files=max_files, device=device, engine=engine, tta=tta,
                            quality_gate=quality_gate, workers=workers, progress=progress, **options)
        except RankError:  # another rank's failure, or the store's: said, naming the rank
            raise
        except ScreenError as e:
            ranks.fail(str(e))
            raise ScreenError(f"rank {ranks.rank} of {ranks.world}: {e}") from None
        except BaseException as e:  # Ctrl-C, a bug: the others stop waiting, and the traceback stays
            ranks.fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'stopped'}")
            raise


def _sharded(ranks: Ranks, run, folder, out, *, max_files, device, engine, tta, quality_gate, workers, progress,
             **options):
    import torch
    from ..inference import engine as engines, trained as inference
    from ..training.loop import TrainingError, pick_device

    rank, world = ranks.rank, ranks.world
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    photos, problems = find_photos(folder, limit=max_files)  # the cheap refusals first, as a single screen
    run_dir = Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.run_dir)
    paths = report_paths(out if out is not None else default_report(folder, run_dir))
    mine = partial_paths(paths[0], rank, world)
    refuse_partials(paths[0], world)
    check_out(mine)
    with contextlib.ExitStack() as final_lock:
        if rank == 0:
            check_out(paths)
            final_lock.enter_context(report_lock(paths))  # one screen at a time on the merged report
        try:
            dev = pick_device(device, local_rank)
        except TrainingError as e:
            raise ScreenError(str(e)) from None
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        cores = _pin_cores(local_rank, local_world)
        if dev.type == "cpu":
            torch.set_num_threads(cores)
        trained = inference.load_trained(run, device=str(dev), lazy=True) if isinstance(run, (str, os.PathLike)) \
            else inference.as_trained(run)
        temperature = float(trained.temperature or 1.0)
        key = report_key(trained, folder, tta=tta, quality_gate=quality_gate, threshold=inference.referral(trained)[0],
                         temperature=temperature)
        if rank == 0:
            # An earlier report (merged, or a single screen's cut short) is checked against this screen's
            # settings, its photos skipped by every rank and its rows kept in the merge; a new one is made
            # now, its key and header, as a single screen makes it: whatever a kill leaves then resumes.
            open_report(paths, key)
            # The ONNX export made once, before the other ranks look for it: each rank's _screen then opens
            # the file (and refuses an unknown engine as a single screen does).
            try:
                engines.get(trained, engine, fast=True)
            except engines.EngineError as e:
                raise ScreenError(str(e)) from None
        ranks.gather("started", {})
        earlier = set(read_report(paths[0])["image"]) if paths[0].exists() else set()
        share = [p for p in photos if shard_of(p[0], world) == rank and p[0] not in earlier]
        walk_errors = [r for r in problems if r["image"] not in earlier] if rank == 0 else []
        with report_lock(mine):
            result = _screen(trained, folder, mine[0], found=(share, walk_errors), device=dev.type, engine=engine,
                             tta=tta, quality_gate=quality_gate, progress=progress and rank == 0,
                             workers=default_workers(len(share)) if workers is None else workers, **options)
        todo = len(share) + len(walk_errors) - result.skipped
        done = ranks.gather("graded", {"new": result.new, "todo": todo, "complete": result.complete})
        if rank != 0:
            return None
        table = _merge([paths[0], *(partial_paths(paths[0], r, world)[0] for r in range(world))])
        patients = patient_table(table)
        merged = ScreenResult(paths[0], paths[1], paths[2], table, patients, result.threshold, result.threshold_source,
                              result.temperature, sum(d["new"] for d in done),
                              len(photos) + len(problems) - sum(d["todo"] for d in done),
                              all(d["complete"] for d in done), result.engine, world)
        # Each file atomically, the key unchanged; the partials stay until all three are in place
        fileio.write_json(paths[2], {"key": key, "summary": merged.summary()})
        write_table(paths[0], table)
        write_table(paths[1], patients)
        for r in range(world):  # only now that the merged files are in place
            partial = partial_paths(paths[0], r, world)
            for p in partial:
                p.unlink(missing_ok=True)
            lock_path(partial[0]).unlink(missing_ok=True)
        return merged


def _merge(reports: list[Path]) -> pd.DataFrame:
    """The rows of ``reports`` (the earlier merged report, then each rank's) as one photo report.

    A photo in two of them (a kill between writing the merged report and removing the partials)
    keeps its first row; the order is a single screen's (by image, stable).
    """
    tables, seen = [], set()
    for i, path in enumerate(reports):
        if not path.is_file():
            if i == 0:
                continue  # no earlier report
            raise ScreenError(f"{short(path)}: rank {i - 1}'s partial report is not here; on several machines "
                              f"--out must be in a folder every machine sees (a shared file system)")
        table = read_report(path)
        table = table[~table["image"].isin(seen)]
        seen.update(table["image"])
        if len(table):
            tables.append(table)
    if not tables:
        return read_report(reports[1]).iloc[0:0]
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    return table.sort_values("image", kind="stable").reset_index(drop=True)
