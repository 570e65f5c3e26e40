"""The decode-once cache: every image decoded, cropped and resized once into a uint8 array file.

One ``.npy`` per (source files, working size, preprocessing): memory-mapped, so a 22 GB cache of
28,099 images at 512 px never has to fit in RAM. A sidecar ``.json`` (written last) marks it
complete and lists the images that could not be decoded. Building is guarded by a file lock, so two
runs that start together build it once; under torchrun the ranks that share the cache folder build
one share of the rows each. The file is allocated in full before any image is decoded, so a full
disk fails at once with the space needed, never later as a SIGBUS in a memory-mapped write.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..paths import cache_root
from ._spawn import spawn_context
from .preprocess import ImageError, load_and_preprocess

# Bump when preprocess() changes what it produces. 2: Ben Graham's normalisation now masks the
# boundary of the fundus circle; caches built before it (version 1) hold unmasked images and are invalid.
CACHE_VERSION = 2


class CacheError(OSError):
    """The cache could not be built (no space left, a worker died, a rank failed); one line."""


class CacheStopped(Exception):
    """A stop was asked for while the cache was being built; nothing was kept."""


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



# ----------------------------------------------------------------------------- decoding workers

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


# ----------------------------------------------------------------------------- building

def local_group() -> tuple[int, int]:
    """(rank, world) among the processes on this machine: torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE, else (0, 1)."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def node_barrier() -> Callable[[], None] | None:
    """A barrier over this machine's ranks under torchrun (a ``torch.distributed`` subgroup of
    LOCAL_WORLD_SIZE ranks), for :func:`build_cache`; None when not distributed.

    Every rank must call it, once (it creates the subgroups). A subgroup per machine rather than
    one over all ranks: machines that share one cache folder (a network file system) then take the
    folder's lock in turn without waiting on each other's barrier.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    local = local_group()[1]
    if local <= 1:
        return lambda: None
    if local >= dist.get_world_size():
        return dist.barrier
    group, _ = dist.new_subgroups(group_size=local)  # torchrun numbers ranks node by node
    return lambda: dist.barrier(group=group)


def build_cache(paths: list[str], size: int, *, ben_graham: bool = False, workers: int = 2,
                progress: bool = True, root: Path | None = None, desc: str = "cache", rank: int = 0,
                world: int = 1, barrier: Callable[[], None] | None = None,
                stop: threading.Event | None = None) -> ImageCache:
    """Return the cache for these images, building it first if needed (in parallel, with a bar).

    Args:
        workers: decoding processes for this rank (0: decode in this process); see
            ``retino.data._workers.resolve_workers(purpose="cache")``.
        rank, world: this process's place among the ``world`` processes that share ``root`` and
            build together (under torchrun :func:`local_group`; every rank of every machine when
            all share one folder). Each decodes a contiguous share of the rows into the one file;
            rank 0 allocates it first and completes it last. No two processes write the same row.
        barrier: waits for those processes (:func:`node_barrier`); required when ``world > 1``.
            Each process calls it exactly three times, whether the cache is built, found or fails.
        stop: when set, the build ends after the images in flight and raises :class:`CacheStopped`.

    Raises:
        CacheError: no space left in the cache folder (before any image is decoded), a decoding
            worker died, or another rank failed; every rank raises it.
    """
    root = Path(root or cache_root())
    if world > 1 and barrier is None:
        raise ValueError(f"build_cache: {world} processes build together, so a barrier is needed")
    if not 0 <= rank < world:
        raise ValueError(f"build_cache: rank {rank} is not in 0..{world - 1}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CacheError(f"cannot create the cache folder {root}: {e.strerror}") from None
    key = cache_key(paths, size, ben_graham)
    npy, meta = root / f"{key}.npy", root / f"{key}.json"
    if world == 1:
        found = _load_complete(npy, meta, len(paths))
        if found:
            return found
    wait = barrier or (lambda: None)
    tag = f"{key}.tmp-{_host()}"  # one build per machine and key at a time: rank 0 holds the lock
    tmp = root / f"{tag}.npy"
    own: list[BaseException] = []  # this rank's failure, raised after the last barrier

    def attempt(fn) -> None:
        if own or _failure(root, tag):
            return
        try:
            fn()
        except Exception as e:  # recorded for the other ranks, which must still reach every barrier
            own.append(e)
            if world > 1:
                _record_failure(root, tag, rank, e)

    found, lock = None, None
    try:
        if rank == 0:
            lock = open(root / f"{key}.lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds it complete
            found = _load_complete(npy, meta, len(paths))
            if found is None:
                for old in root.glob(f"{tag}.*"):  # a killed build's leftovers on this machine
                    old.unlink(missing_ok=True)
                attempt(lambda: _allocate(tmp, len(paths), size, root))
        wait()  # 1: rank 0 found the cache complete, or allocated its file
        if rank != 0:
            found = _load_complete(npy, meta, len(paths))
        if found is None:
            rows = np.array_split(np.arange(len(paths)), world)[rank]
            attempt(lambda: _build_share(tmp, paths, rows, size, ben_graham, workers, progress and rank == 0,
                                         desc, stop, root / f"{tag}.errors-{rank}.json"))
        wait()  # 2: every share is decoded
        if rank == 0 and found is None:
            attempt(lambda: _finish(tmp, npy, meta, root, tag, len(paths), size, ben_graham, world))
        wait()  # 3: the cache is complete, or some rank failed
        if own:
            raise own[0]
        message = _failure(root, tag) if found is None else None  # (a found cache: old failures are stale)
        if message:
            raise CacheStopped() if message == "stopped" else CacheError(message)
        found = found or _load_complete(npy, meta, len(paths))
        if found is None:
            raise CacheError(f"the cache {npy} is incomplete after its build")
        return found
    finally:
        if lock is not None:
            tmp.unlink(missing_ok=True)
            for part in root.glob(f"{tag}.errors-*"):
                part.unlink(missing_ok=True)
            lock.close()


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def _record_failure(root: Path, tag: str, rank: int, error: BaseException) -> None:
    """Leave this rank's failure where the other ranks look after the next barrier (best effort: on a
    full disk the empty file may be all there is)."""
    message = "stopped" if isinstance(error, CacheStopped) else (str(error).splitlines() or [type(error).__name__])[0]
    if not isinstance(error, (CacheError, CacheStopped)):
        message = f"rank {rank}: {type(error).__name__}: {message}"
    path = root / f"{tag}.failed-{rank}"
    try:
        with open(path, "w") as f:
            f.write(message)
    except OSError:
        pass


def _failure(root: Path, tag: str) -> str | None:
    for path in sorted(root.glob(f"{tag}.failed-*")):
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        return text or f"{path.name.rsplit('-', 1)[-1]} failed while building the cache in {root} (see its output)"
    return None


def _no_space(root: Path, needed: int) -> CacheError:
    free = shutil.disk_usage(root).free
    e = CacheError(f"no space left in {root}: {needed / 1e6:,.0f} MB needed, {free / 1e6:,.0f} MB free "
                   f"(point RETINO_CACHE at a larger disk, or train with --cache false)")
    e.errno = errno.ENOSPC
    return e


_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)


def _allocate(tmp: Path, n: int, size: int, root: Path) -> None:
    """Create the (n, size, size, 3) uint8 .npy file with every block reserved, or fail at once.

    A sparse file (what ``open_memmap`` makes) takes its blocks when the decoders first write to
    them; on a full disk that write is a SIGBUS that kills the worker (issue 15: the pool replaced
    them and the build hung). ``posix_fallocate`` reserves them now, or fails with ENOSPC.
    """
    needed = n * size * size * 3 + 128 + 64 * n + 4096  # the array, its header, the sidecar .json
    if needed > shutil.disk_usage(root).free:
        raise _no_space(root, needed)
    try:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        with open(tmp, "r+b") as f:
            length = os.fstat(f.fileno()).st_size
            try:
                os.posix_fallocate(f.fileno(), 0, length)
            except OSError as e:  # a file system that cannot reserve: the free-space check stands alone
                if e.errno in _SPACE_ERRORS or e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
    except OSError as e:
        if e.errno not in _SPACE_ERRORS:
            raise
        tmp.unlink(missing_ok=True)
        raise _no_space(root, needed) from None


def _build_share(tmp: Path, paths, rows, size, ben_graham, workers, progress, desc, stop, errors_path: Path) -> None:
    """Decode ``rows`` into the allocated file; write {row: error} for the undecodable ones to ``errors_path``."""
    errors = _fill(tmp, [(int(i), paths[i]) for i in rows], size, ben_graham, workers, progress, desc, stop)
    info = {"rows": [int(rows[0]), int(rows[-1]) + 1] if len(rows) else [0, 0], "host": socket.gethostname(),
            "pid": os.getpid(), "errors": {str(k): v for k, v in errors.items()}}
    try:
        errors_path.write_text(json.dumps(info))
    except OSError as e:
        if e.errno in _SPACE_ERRORS:
            raise _no_space(tmp.parent, len(json.dumps(info))) from None
        raise


def _finish(tmp: Path, npy: Path, meta: Path, root: Path, tag: str, n: int, size: int, ben_graham: bool,
            world: int) -> None:
    """Gather every rank's errors, move the array into place, then write the sidecar that marks it complete."""
    shards, errors = [], {}
    for r in range(world):
        part = json.loads((root / f"{tag}.errors-{r}.json").read_text())
        errors.update({int(k): v for k, v in part.pop("errors").items()})
        shards.append({"rank": r, **part})
    ok = np.ones(n, dtype=bool)
    ok[list(errors)] = False
    info = {"n": n, "size": size, "ben_graham": ben_graham, "ok": ok.tolist(),
            "errors": {str(k): v for k, v in sorted(errors.items())}, "built": time.time(), "shards": shards}
    tmp_meta = meta.with_name(meta.name + f".tmp-{os.getpid()}")
    try:
        os.replace(tmp, npy)
        tmp_meta.write_text(json.dumps(info))
        os.replace(tmp_meta, meta)
    except OSError as e:
        tmp_meta.unlink(missing_ok=True)
        if e.errno in _SPACE_ERRORS:
            raise _no_space(root, len(json.dumps(info))) from None
        raise


def _fill(tmp: Path, jobs: list[tuple[int, str]], size, ben_graham, workers, progress, desc, stop) -> dict:
    """Decode ``jobs`` (row, path) into the file: in this process (``workers`` 0) or a spawned pool.

    A ProcessPoolExecutor, not multiprocessing.Pool: when a worker dies (killed, out of memory) the
    executor fails at once (BrokenProcessPool), where a Pool starts a new worker and waits forever
    for the lost images.
    """
    from tqdm import tqdm
    errors = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, leave=False)

    def take(results) -> None:
        for i, err in results:
            if err:
                errors[i] = err
            bar.update()
            if stop is not None and stop.is_set():
                raise CacheStopped()

    try:
        if workers <= 0 or not jobs:
            _init_worker(str(tmp), size, ben_graham)
            take(map(_decode_into, jobs))
        else:
            with spawn_context() as ctx:
                pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                                           initargs=(str(tmp), size, ben_graham))
                try:
                    take(pool.map(_decode_into, jobs, chunksize=max(1, min(8, len(jobs) // (4 * workers)))))
                except BrokenProcessPool:
                    raise CacheError(f"a cache worker died while decoding into {tmp.parent} (out of memory, or "
                                     f"killed by a signal); {shutil.disk_usage(tmp.parent).free / 1e6:,.0f} MB "
                                     f"free there") from None
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
        _worker_state.clear()
    return errors
