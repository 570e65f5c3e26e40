"""The decode-once cache: every image decoded, cropped and resized once into a uint8 array file.

One ``.npy`` per (source files, working size, preprocessing): memory-mapped, so a 22 GB cache of
28,099 images at 512 px never has to fit in RAM. A sidecar ``.json`` (written last) marks it
complete and lists the images that could not be decoded. Building is guarded by a file lock, so two
runs that start together build it once.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._spawn import spawn_context
from .preprocess import ImageError, load_and_preprocess

CACHE_VERSION = 1  # bump when preprocess() changes what it produces


def cache_root() -> Path:
    return Path(os.environ.get("RETINO_CACHE", Path.home() / ".cache" / "retino"))


def cache_key(paths: list[str], size: int, ben_graham: bool) -> str:
    """Changes when any source file (path, size, mtime), the size or the preprocessing changes."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{int(ben_graham)}".encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{p}|missing".encode())
    return h.hexdigest()[:24]


@dataclass
class ImageCache:
    """A built cache: ``array()`` is (N, S, S, 3) uint8, ``ok[i]`` False for undecodable images."""

    path: Path
    ok: np.ndarray
    errors: dict  # index -> message

    def array(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


_worker_state: dict = {}


def _init_worker(tmp: str, size: int, ben_graham: bool) -> None:
    import cv2
    cv2.setNumThreads(1)  # one decode per process; the pool provides the parallelism
    _worker_state.update(arr=np.load(tmp, mmap_mode="r+"), size=size, bg=ben_graham)


def _decode_into(job: tuple[int, str]) -> tuple[int, str | None]:
    i, path = job
    try:
        _worker_state["arr"][i] = load_and_preprocess(path, _worker_state["size"],
                                                      ben_graham_norm=_worker_state["bg"])
        return i, None
    except ImageError as e:
        return i, str(e)
    except Exception as e:  # an image that passed the header scan but breaks the decoder
        return i, f"{Path(path).name}: cannot be decoded ({type(e).__name__}: {e})"


def _load_complete(npy: Path, meta: Path, n: int) -> ImageCache | None:
    try:
        info = json.loads(meta.read_text())
        if info.get("n") != n or not npy.is_file():
            return None
        ok = np.array(info["ok"], dtype=bool)
        return ImageCache(npy, ok, {int(k): v for k, v in info["errors"].items()})
    except (OSError, ValueError, KeyError):
        return None


def build_cache(paths: list[str], size: int, *, ben_graham: bool = False, workers: int = 2,
                progress: bool = True, root: Path | None = None, desc: str = "cache") -> ImageCache:
    """Return the cache for these images, building it first if needed (in parallel, with a bar)."""
    root = Path(root or cache_root())
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, size, ben_graham)
    npy, meta = root / f"{key}.npy", root / f"{key}.json"
    found = _load_complete(npy, meta, len(paths))
    if found:
        return found
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds it complete
        found = _load_complete(npy, meta, len(paths))
        if found:
            return found
        tmp = root / f"{key}.npy.tmp-{os.getpid()}"
        try:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
            del arr  # workers open it themselves
            errors = _fill(tmp, paths, size, ben_graham, workers, progress, desc)
            os.replace(tmp, npy)
        finally:
            tmp.unlink(missing_ok=True)
        ok = np.ones(len(paths), dtype=bool)
        ok[list(errors)] = False
        info = {"n": len(paths), "size": size, "ben_graham": ben_graham, "ok": ok.tolist(),
                "errors": {str(k): v for k, v in errors.items()}, "built": time.time()}
        tmp_meta = meta.with_name(meta.name + f".tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps(info))
        os.replace(tmp_meta, meta)
        return ImageCache(npy, ok, errors)


def _fill(tmp: Path, paths, size, ben_graham, workers, progress, desc) -> dict:
    from tqdm import tqdm
    jobs = list(enumerate(paths))
    errors = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False)
    if workers <= 0:
        _init_worker(str(tmp), size, ben_graham)
        results = map(_decode_into, jobs)
        for i, err in results:
            if err:
                errors[i] = err
            bar.update()
    else:
        with spawn_context() as ctx, ctx.Pool(workers, _init_worker, (str(tmp), size, ben_graham)) as pool:
            for i, err in pool.imap_unordered(_decode_into, jobs, chunksize=8):
                if err:
                    errors[i] = err
                bar.update()
    bar.close()
    _worker_state.clear()
    return errors
