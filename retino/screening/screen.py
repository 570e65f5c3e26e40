"""Screening a folder: every photograph under it graded, one row per photo and one per patient (issue 11).

The job a clinic has is a folder of one day's photographs turned into a list of patients to refer.
:func:`screen` finds every JPEG/PNG under the folder (:func:`find_photos`), decodes each once,
preprocesses and measures it in worker processes exactly as the run was trained
(:func:`retino.inference.grading.prepare`), grades them here in batches through the one grading path
(:func:`retino.inference.grading.grade`: the gate's verdict with the model's own view, grade, referral), and writes three files side by side:

- ``<name>.csv``: one row per photo (:data:`PHOTO_COLUMNS`). A file that cannot be graded is a row
  with its ``error``, never the end of the screen. Rows are appended as each batch finishes, flushed
  and fsynced, so a kill loses at most one batch; at the end the file is rewritten sorted, atomically.
- ``<name>.patients.csv``: one row per patient (:data:`PATIENT_COLUMNS`), rewritten at the end from
  every photo row: "refer" when either eye is referable, "refer: ungraded eye" when an eye was not
  graded or was ungradable, else "no referral".
- ``<name>.json``: what made the report (run, checkpoint, folder, settings, threshold) and a summary.

By default the report goes under the runs folder (:func:`default_report`), never into the folder
screened; it is never written into a run folder or over a file a screen did not write, and one
screen at a time holds it. System folders are refused, links out of the folder are not followed,
and a folder of more than ``max_files`` photos is refused unless the caller asks for it
(:mod:`retino.screening.screen_paths`).

Re-run with the same report, a screen skips the photos already in it (an interrupted screen resumes);
a report made with another run or other settings is refused rather than mixed.

A photo is referable by the run's rule (:func:`retino.inference.choices.referral_cut`): P(grade >= 2) after
the run's temperature (classify head), or the raw score (regress head), at or above the run's
operating point chosen on val; without one, P >= 0.5, or the run's own cut point between grades 1 and 2.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import pandas as pd
import torch

from ..inference import engine as engines, grading, trained as inference
from ..config import TrainConfig
from ..data import ImageError
from ..data._spawn import spawn_context
from ..data._workers import usable_cores
from .screen_paths import MAX_FILES, check_out, default_report, find_photos, refuse_partials, report_lock
from ..inference.choices import REFER, REFER_UNGRADED
from .screen_report import (PROB_COLUMNS, Appender, ScreenError, error_row, open_report, patient_table,
                            read_report, report_paths, write_table)
from ..data.dicom import patient_eye
from .. import fileio

__all__ = ["screen", "ScreenResult", "prepare_photo", "default_workers", "POOL_MIN_PHOTOS"]



@dataclass
class ScreenResult:
    """A finished (or stopped) screen: the files written and their tables."""

    report: Path                # one row per photo
    patients_report: Path       # one row per patient
    meta: Path                  # settings and summary (JSON)
    photos: pd.DataFrame        # PHOTO_COLUMNS, sorted by image
    patients: pd.DataFrame      # PATIENT_COLUMNS, referable first
    threshold: float            # on P(grade >= 2) or the regression score
    threshold_source: str
    temperature: float
    new: int                    # photos graded (or rejected) by this call
    skipped: int                # photos already in the report
    complete: bool              # False when stopped before the end
    engine: dict | None = None  # what ran the network (retino.inference.engine's info: name, version, threads)
    world_size: int = 1         # processes that graded it (torchrun ranks, retino.screening.shard)

    def summary(self) -> dict:
        """Counts and paths, JSON-safe: what the CLI prints and the page shows."""
        p = self.photos
        graded = p["grade"].notna()
        status = self.patients["status"].value_counts()
        return {"report": str(self.report), "patients_report": str(self.patients_report), "meta": str(self.meta),
                "photos": int(len(p)), "graded": int(graded.sum()), "errors": int((~graded).sum()),
                "ungradable": int((p["quality"] == "ungradable").sum()),
                "not_fundus": int((p["quality"] == "not_fundus").sum()),
                "patients": int(len(self.patients)),
                "referable_patients": int(status.get(REFER, 0)),
                "ungraded_patients": int(status.get(REFER_UNGRADED, 0)),  # refer: an eye Retino did not grade
                "patients_to_refer": int(status.get(REFER, 0) + status.get(REFER_UNGRADED, 0)),
                "threshold": self.threshold, "threshold_source": self.threshold_source,
                "temperature": self.temperature, "new": self.new, "skipped": self.skipped, "complete": self.complete,
                "engine": self.engine, "world_size": self.world_size}


# ----------------------------------------------------------------------------- the photos

# ----------------------------------------------------------------------------- decoding (worker processes)

_WORKER: dict = {}


def _init_worker(config: dict, gate: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the screen and the pool
    torch.set_num_threads(1)  # the parent's forward pass has the cores; a worker decodes one photo at a time
    cv2.setNumThreads(1)
    _WORKER.update(config=TrainConfig.from_dict(config), gate=gate)


def _prepare_chunk(items: list[tuple[str, str]]) -> list[dict]:
    return [prepare_photo(image, path, _WORKER["config"], gate=_WORKER["gate"]) for image, path in items]


def prepare_photo(image: str, path: str, config: TrainConfig, *, gate: bool = True) -> dict:
    """One photo decoded once, preprocessed as the run was trained and measured by the gate: never raises.

    Returns:
        ``{"prepared": retino.inference.grading.Prepared}``; or ``{"error": "<image>: <reason>"}``.
    """
    try:
        return {"prepared": grading.prepare(path, config, image, gate=gate)}
    except ImageError as e:
        return {"error": str(e).replace(path, image)}
    except Exception as e:  # noqa: BLE001 - one file that breaks a decoder must not end a screen of thousands
        first = str(e).splitlines()[0] if str(e) else ""
        return {"error": f"{image}: cannot be graded ({type(e).__name__}{': ' + first if first else ''})"}


def _read_ahead(items: list[tuple[str, str]], config: TrainConfig, *, gate: bool, ahead: int):
    """``((image, path), prepared)`` in order, decoded by one thread of this process up to ``ahead``
    photos before they are asked for: the next batch decodes while this one's forward pass runs
    (ONNX Runtime and PyTorch release the GIL in it; so do PIL's decoder and OpenCV)."""
    todo = iter(items)
    pool = ThreadPoolExecutor(1, thread_name_prefix="screen-decode")
    try:
        pending = deque((item, pool.submit(prepare_photo, *item, config, gate=gate))
                        for item in itertools.islice(todo, ahead))
        while pending:
            item, future = pending.popleft()
            for nxt in itertools.islice(todo, 1):
                pending.append((nxt, pool.submit(prepare_photo, *nxt, config, gate=gate)))
            yield item, future.result()
    finally:  # a stopped screen waits for the photo being decoded, not for the queue behind it
        pool.shutdown(wait=True, cancel_futures=True)


def _prepared(items: list[tuple[str, str]], config: TrainConfig, *, gate: bool, workers: int, chunk: int,
              ahead: int = 0):
    """``((image, path), prepared)`` in the order of ``items``.

    Decoded in ``workers`` spawn processes, a chunk of photos a task, with a bounded number of tasks
    in flight: the forward pass is slower than decoding, and an unbounded queue would hold a whole
    folder's decoded photos in memory. ``workers`` 0: here, by a thread ``ahead`` photos in front
    (0: each photo when it is asked for).
    """
    if workers <= 0 and ahead > 0:
        yield from _read_ahead(items, config, gate=gate, ahead=ahead)
        return
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    if workers <= 0:
        for part in chunks:
            for image, path in part:
                yield (image, path), prepare_photo(image, path, config, gate=gate)
        return
    ahead = 2 * workers + 2
    with spawn_context() as ctx, ctx.Pool(workers, initializer=_init_worker, initargs=(config.to_dict(), gate)) as pool:
        pending, todo = deque(), iter(chunks)
        for part in todo:
            pending.append((part, pool.apply_async(_prepare_chunk, (part,))))
            if len(pending) >= ahead:
                break
        while pending:
            part, result = pending.popleft()
            done = result.get()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.apply_async(_prepare_chunk, (nxt,))))
            yield from zip(part, done)


READ_AHEAD_BATCHES = 1  # decoding in this process: batches a thread decodes ahead of the forward pass (0: none)
POOL_MIN_PHOTOS = 32  # a spawn worker takes seconds to import torch: fewer photos are decoded here by default


def default_workers(n_photos: int | None = None) -> int:
    """Decoding processes by default: the cores beyond two (at most 8); none for a few photos.

    Two cores are left to the forward pass: on a 2-core machine a decoding process only competes
    with it, and decoding here, a batch ahead in a thread, was faster (1 or 2 processes: 0.70-0.79x
    its photos a second on 50 photos, bench/inference.py).
    """
    if n_photos is not None and n_photos < POOL_MIN_PHOTOS:
        return 0
    return max(0, min(8, usable_cores() - 2))


# ----------------------------------------------------------------------------- the screen

def _rows(batch: list, trained: inference.Trained, *, tta: bool, gate: bool, engine: str) -> list[dict]:
    """Report rows for one batch of ``((image, path), prepared)``, in order, through the one grading path."""
    rows: list[dict | None] = [None] * len(batch)
    graded = [i for i, (_, prep) in enumerate(batch) if "error" not in prep]
    for i, ((image, _), prep) in enumerate(batch):
        if "error" in prep:
            rows[i] = error_row(image, prep["error"])
    answers = grading.grade(trained, [batch[i][1]["prepared"] for i in graded], tta=tta, refuse=gate,
                            engine=engine, fast=True)
    for i, a in zip(graded, answers):
        image, path = batch[i][0]
        q = a.quality or {}
        if a.refused:
            rows[i] = error_row(image, a.refused, q)
            continue
        patient, eye = patient_eye(image, path)  # a DICOM file's from its tags
        reasons = list(q.get("reasons", [])) + ([a.why] if a.why else [])
        row = {"image": image, "patient": patient, "eye": eye or "", "grade": a.grade,
               "referable_score": a.referable_score, "referable": a.referable,
               "quality": q.get("verdict"), "reasons": "; ".join(reasons)}
        if a.probs is not None:
            row.update(zip(PROB_COLUMNS, a.probs))
        else:
            row["score"] = a.score
        rows[i] = row
    return rows


def _checkpoint_id(trained: inference.Trained) -> str:
    try:
        st = os.stat(Path(trained.run_dir) / getattr(trained, "checkpoint", "best.pt"))
        return f"{st.st_size}-{st.st_mtime_ns}"
    except OSError:
        return "unknown"


def report_key(trained: inference.Trained, folder, *, tta: bool, quality_gate: bool, threshold: float,
               temperature: float) -> dict:
    """What made a report (run, checkpoint, folder, settings): a resumed report must have been made with the same."""
    return {"run": str(Path(trained.run_dir).resolve()), "checkpoint": getattr(trained, "checkpoint", "best.pt"),
            "checkpoint_id": _checkpoint_id(trained), "folder": str(Path(folder).resolve()), "tta": bool(tta),
            "quality_gate": bool(quality_gate), "threshold": threshold, "temperature": temperature}


def screen(run, folder, out=None, *, max_files: int | None = MAX_FILES, **options) -> ScreenResult:
    """Grade every photograph under ``folder`` with a run, holding the report's lock; see :func:`_screen`.

    The folder is searched and the report's place checked before the model loads: a system folder,
    more than ``max_files`` photos (None: no limit), a report in a run folder or over a file a screen
    did not write, and a report another screen is writing are refused in one line.
    """
    found = find_photos(folder, limit=max_files)  # the cheap refusals first, before torch loads a model
    run_dir = Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.run_dir)
    paths = report_paths(out if out is not None else default_report(folder, run_dir))
    check_out(paths)
    refuse_partials(paths[0], world=1)  # a torchrun screen's unmerged shards: finished by the same torchrun command
    with report_lock(paths):
        return _screen(run, folder, paths[0], found=found, **options)


def _screen(run, folder, out=None, *, found=None, batch_size: int = 16, tta: bool = False,
            workers: int | None = None, quality_gate: bool = True, device: str = "cpu", engine: str = "auto",
            on_progress=None, progress: bool = False, stop=None) -> ScreenResult:
    """Grade every photograph under ``folder`` with a run; write the photo and patient reports.

    Args:
        run: a run folder (its best checkpoint) or a ``retino.inference.trained.Trained``.
        folder: searched recursively for .jpeg/.jpg/.png (any case).
        out: the photo report, ``x.csv`` (:func:`report_paths`); default :func:`default_report`.
            Photos already in it are skipped (a resumed screen).
        batch_size: photos a forward pass.
        tta: average over ``grading.tta_views`` (4x the work).
        workers: decoding processes (0: decode here; None: :func:`default_workers` for the folder).
        engine: what runs the network: ``auto`` (ONNX Runtime on a CPU, PyTorch on a GPU), ``torch`` or
            ``onnx`` (:mod:`retino.inference.engine`); recorded in the report's JSON.
        quality_gate: run ``retino.inference.quality.assess``: ``not_fundus`` photos are not graded,
            ``ungradable`` ones are, with the reasons beside the grade.
        on_progress: called ``(done, total)`` after each batch's rows are written; an exception it
            raises stops the screen (the rows written so far stay).
        progress: a tqdm bar on stderr.
        stop: a ``threading.Event``; when set, the screen stops after the current batch.
        found: :func:`find_photos`'s answer for ``folder`` when the caller has it.

    Raises:
        ScreenError: the folder or the report cannot be used (one line).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ScreenError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    if workers is not None and int(workers) < 0:
        raise ScreenError(f"workers must be >= 0 (0: decode in this process), got {workers}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ScreenError("device cuda: no CUDA GPU is available here; use cpu or auto")
    photos, problems = found if found is not None else find_photos(folder)
    run_dir = Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.run_dir)
    paths = report_paths(out if out is not None else default_report(folder, run_dir))
    trained = inference.load_trained(run, device=device, lazy=True) if isinstance(run, (str, os.PathLike)) \
        else inference.as_trained(run)
    try:
        runner = engines.get(trained, engine, fast=True)  # made (an ONNX export, checked) before any photo
    except engines.EngineError as e:
        raise ScreenError(str(e)) from None
    temperature = float(trained.temperature or 1.0)
    cut, source = inference.referral(trained)
    if trained.notes:
        source += " (" + "; ".join(trained.notes) + ")"
    key = report_key(trained, folder, tta=tta, quality_gate=quality_gate, threshold=cut, temperature=temperature)
    done = open_report(paths, key)
    todo = [p for p in photos if p[0] not in done]
    fresh_problems = [r for r in problems if r["image"] not in done]
    total, finished, complete = len(todo) + len(fresh_problems), 0, True
    workers = default_workers(len(todo)) if workers is None else int(workers)
    chunk = max(1, min(8, batch_size // max(1, 2 * workers)))
    appender = Appender(paths[0])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="screen", unit="photo")
    try:
        appender.write(fresh_problems)
        finished = len(fresh_problems)
        with contextlib.closing(_prepared(todo, trained.config, gate=quality_gate, workers=workers, chunk=chunk,
                                          ahead=READ_AHEAD_BATCHES * batch_size)) as stream:
            batch = []
            for item in stream:
                batch.append(item)
                if len(batch) < batch_size and finished + len(batch) < total:
                    continue
                appender.write(_rows(batch, trained, tta=tta, gate=quality_gate, engine=engine))
                finished += len(batch)
                batch = []
                if bar is not None:
                    bar.update(finished - bar.n)
                if on_progress is not None:
                    on_progress(finished, total)
                if stop is not None and stop.is_set():
                    complete = finished >= total
                    break
    finally:
        appender.close()
        if bar is not None:
            bar.close()
    table = read_report(paths[0]).sort_values("image", kind="stable").reset_index(drop=True)
    patients = patient_table(table)
    write_table(paths[0], table)
    write_table(paths[1], patients)
    result = ScreenResult(paths[0], paths[1], paths[2], table, patients, cut, source, temperature,
                          finished, len(photos) + len(problems) - total, complete, runner.info())
    fileio.write_json(paths[2], {"key": key, "summary": result.summary()})
    return result
