"""Datasets, the epoch samplers and the loader; the batch's augmentation is :mod:`retino.data.augment`.

Workers only hand over uint8 arrays (from the cache, or decoded on the fly); :func:`to_input`
augments and normalises the batch where the model runs.

The cache is read a batch at a time (:class:`EpochBatchSampler` + ``CachedImages.__getitems__``):
one sorted fancy index on the memory map instead of one read and one Python call per image
(bench/feed.py). :func:`make_loader` puts the pieces together for a training or evaluation split.
"""
from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate, get_worker_info
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from ._workers import resolve_workers
from .feeder import CacheFeeder, pinned_empty
from .preprocess import ImageError, load_and_preprocess

log = logging.getLogger("retino.data")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's draws (sampling order, augmentation), the same on every resume."""
    return seed * 1_000_003 + epoch


class CachedImages(TorchDataset):
    """Rows of a cache array; the memmap is opened lazily in each worker (never pickled whole).

    ``dataset[i]`` is one row. ``dataset.__getitems__(positions)``, what a DataLoader calls for a
    batch, gives what ``batch_as`` says: ``"samples"``, a list of (row, label) as torch's default
    collate expects; ``"array"``, the batch read at once as ((B, S, S, 3) uint8, (B,) labels) for
    :func:`batch_collate`; ``"views"``, (a list of B row views into the memory map, labels), for
    the CPU path, where :func:`cpu_input` warps straight out of them. :func:`make_loader` sets it.
    """

    BATCH_AS = ("samples", "array", "views")

    def __init__(self, npy_path, indices, labels, *, batch_as: str = "samples"):
        if batch_as not in self.BATCH_AS:
            raise ValueError(f"Invalid batch_as {batch_as!r}. Choose one of: {', '.join(self.BATCH_AS)}.")
        self.npy_path, self.indices, self.labels = str(npy_path), np.asarray(indices), np.asarray(labels)
        self.batch_as = batch_as
        self._arr = None

    def __len__(self):
        return len(self.indices)

    def _array(self) -> np.ndarray:
        if self._arr is None:
            # copy-on-write, so the row can be handed to torch without a copy (nothing writes to it):
            # the collate's stack is then the only copy, 1.6-2x the images/s of copying each row first
            self._arr = np.load(self.npy_path, mmap_mode="c")
        return self._arr

    def __getitem__(self, i):
        return torch.from_numpy(self._array()[self.indices[i]]), int(self.labels[i])  # (H, W, 3) uint8

    def __getitems__(self, positions) -> tuple:
        """A batch, as ``batch_as`` says; images in the order of ``positions``.

        ``"array"``: one fancy index reads them all (an :class:`EpochBatchSampler` batch is sorted,
        so the memory map is read front to back), into shared memory when in a worker process, so
        handing the batch to the main process copies nothing more.
        """
        if self.batch_as == "samples":
            return [self[i] for i in positions]
        pos = np.asarray(positions, dtype=np.int64)
        rows = self.indices[pos]
        labels = torch.from_numpy(self.labels[pos].astype(np.int64))
        arr = self._array()
        if self.batch_as == "views":
            return [torch.from_numpy(arr[r]) for r in rows], labels
        out = _batch_tensor((len(rows), *arr.shape[1:]))
        # np.take, not torch: single-threaded and steady from a fresh mapping, where torch's
        # multi-threaded copy ran 1.3-20x slower here (page faults on one mapping from two threads).
        # mode="clip" writes straight into ``out`` (the default buffers a copy); the rows are valid.
        np.take(arr, rows, axis=0, out=out.numpy(), mode="clip")
        return out, labels

    def read_batch(self, positions, *, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, S, S, 3) uint8, (B,) int64) for ``positions``, read in this process by one
        ``index_select`` (multi-threaded, GIL released) into pinned memory when ``pin``: the
        :class:`~retino.data.feeder.CacheFeeder`'s read.
        """
        pos = np.asarray(positions, dtype=np.int64)
        src = torch.from_numpy(self._array())  # (N, S, S, 3), the memory map (copy-on-write: writable)
        out = pinned_empty((len(pos), *src.shape[1:]), pin)
        torch.index_select(src, 0, torch.from_numpy(self.indices[pos].astype(np.int64)), out=out)
        return out, torch.from_numpy(self.labels[pos].astype(np.int64))

    def __getstate__(self):
        return {**self.__dict__, "_arr": None}


def _batch_tensor(shape: tuple) -> torch.Tensor:
    """An uninitialised uint8 tensor, in shared memory inside a DataLoader worker (as default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=torch.uint8).new(storage).view(shape)


def batch_collate(batch):
    """The collate of ``CachedImages.__getitems__``: the batch is already one array."""
    return batch


class DecodedImages(TorchDataset):
    """Decode and preprocess per item (the uncached path; same output as the cache).

    Unreadable images are left out when the data set is made: every file's header and end marker
    are checked (``retino.data.validate.scan_image``, what ``retino stats`` does, ~0.1 ms a file) and
    the bad ones listed in ``skipped`` as (path, error), as the cache lists its own. An image that
    passes the check but fails to decode later is left out of its batch by :func:`decoded_collate`,
    with one warning line naming it. ``paths`` and ``labels`` hold the images kept.
    """

    def __init__(self, paths, labels, size: int, ben_graham: bool = False, *, scan: bool = True):
        paths, labels = list(paths), np.asarray(labels)
        self.skipped: list[tuple[str, str]] = []
        if scan and paths:
            from .validate import scan_image
            with ThreadPoolExecutor(8) as pool:  # I/O bound: threads overlap the header reads
                errors = [row["error"] for row in pool.map(scan_image, paths)]
            keep = [i for i, e in enumerate(errors) if e is None]
            self.skipped = [(paths[i], errors[i]) for i in range(len(paths)) if errors[i] is not None]
            paths, labels = [paths[i] for i in keep], labels[keep]
        self.paths, self.labels, self.size, self.bg = paths, labels, size, ben_graham

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """(image (H, W, 3) uint8, label), or an :class:`Unreadable` marker for a file that broke since."""
        try:
            arr = load_and_preprocess(self.paths[i], self.size, ben_graham_norm=self.bg)
        except ImageError as e:
            return Unreadable(self.paths[i], str(e), self.size)
        except Exception as e:  # passed the header scan but breaks the decoder (as in the cache build)
            name = os.path.basename(self.paths[i])
            return Unreadable(self.paths[i], f"{name}: cannot be decoded ({type(e).__name__}: {e})", self.size)
        return torch.from_numpy(arr), int(self.labels[i])


class Unreadable(tuple):
    """What :class:`DecodedImages` gives for an image that cannot be decoded: (path, error, size)."""

    def __new__(cls, path: str, error: str, size: int):
        return super().__new__(cls, (path, error, size))


_WARNED: set[str] = set()


def decoded_collate(samples):
    """``default_collate`` of the images that decoded; each one that did not is named once on stderr.

    A batch can come out smaller than asked for (empty, (0, S, S, 3), if none decoded).
    """
    good = [s for s in samples if not isinstance(s, Unreadable)]
    for path, error, _ in (s for s in samples if isinstance(s, Unreadable)):
        if path not in _WARNED:
            _WARNED.add(path)
            log.warning("left out %s", error.splitlines()[0] if error else path)
    if good:
        return default_collate(good)
    size = samples[0][2]
    return torch.empty((0, size, size, 3), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)


class EpochSampler(Sampler):
    """Indices for one epoch, drawn from (seed, epoch): shuffled or class-balanced, sharded by rank.

    ``start`` skips the first indices of this rank's share (resuming mid-epoch). ``pad`` (training)
    repeats the first indices so every rank gets the same number; without it (evaluation) every
    index is in exactly one rank's share.
    """

    def __init__(self, labels, *, balanced=False, shuffle=True, seed=0, rank=0, world=1, pad=True):
        self.labels = np.asarray(labels)
        self.balanced, self.shuffle, self.seed, self.rank, self.world = balanced, shuffle, seed, rank, world
        self.pad = pad
        self.epoch, self.start = 1, 0
        n = len(self.labels)
        self.per_rank = math.ceil(n / world) if pad else len(range(rank, n, world))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _all_indices(self) -> np.ndarray:
        n = len(self.labels)
        if not self.shuffle:
            return np.arange(n)
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        if self.balanced:  # each grade equally likely; rare images repeat within an epoch
            counts = np.bincount(self.labels, minlength=5).astype(float)
            w = 1.0 / counts[self.labels]
            return torch.multinomial(torch.as_tensor(w), n, replacement=True, generator=g).numpy()
        return torch.randperm(n, generator=g).numpy()

    def share(self) -> np.ndarray:
        """This rank's indices for the whole epoch (``start`` not applied)."""
        idx = self._all_indices()
        pad = self.per_rank * self.world - len(idx) if self.pad else 0
        if pad > 0:  # every rank takes the same number of steps
            idx = np.concatenate([idx, idx[:pad]])
        return idx[self.rank::self.world]

    def __iter__(self):
        return iter(self.share()[self.start:].tolist())

    def __len__(self):
        return self.per_rank - self.start


class EpochBatchSampler(Sampler):
    """:class:`EpochSampler`'s indices in whole batches: this rank's share cut into ``batch_size``
    runs, in the same order, each batch sorted (the memory map is then read front to back).

    ``merge_single`` (training) merges a last batch of one image into the one before, so that batch
    holds ``batch_size + 1`` (BatchNorm in train mode cannot take a batch of one; issue 15).
    ``set_epoch(epoch, start)``: ``start`` counts this rank's images already trained, a whole number
    of batches (``step * batch_size``), as for :class:`EpochSampler`. ``steps`` is a full epoch's
    number of batches; ``len()`` what is left of it after ``start``.
    """

    def __init__(self, labels, batch_size: int, *, balanced=False, shuffle=True, seed=0, rank=0, world=1,
                 pad=True, merge_single=False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = EpochSampler(labels, balanced=balanced, shuffle=shuffle, seed=seed, rank=rank, world=world,
                                    pad=pad)
        self.batch_size, self.merge_single = batch_size, merge_single
        self.per_rank = self.sampler.per_rank
        self.epoch, self.start = 1, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if start % self.batch_size:
            raise ValueError(f"start {start} is not a whole number of batches of {self.batch_size}")
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def _bounds(self) -> list[tuple[int, int]]:
        n, b = self.per_rank, self.batch_size
        bounds = [(lo, min(lo + b, n)) for lo in range(0, n, b)]
        if self.merge_single and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
            bounds[-2:] = [(bounds[-2][0], n)]
        return bounds

    @property
    def steps(self) -> int:
        return len(self._bounds())

    def __iter__(self):
        share = self.sampler.share()
        for lo, hi in self._bounds():
            if lo >= self.start:
                yield np.sort(share[lo:hi]).tolist()

    def __len__(self):
        return sum(lo >= self.start for lo, _ in self._bounds())


def make_loader(dataset, *, batch_size: int, train: bool, labels=None, balanced: bool = False, seed: int = 0,
                rank: int = 0, world: int = 1, device_type: str = "cpu", workers: int | str = "auto",
                drop_single: bool = True, pin_memory: bool | None = None):
    """The loader of a split: whole batches from an :class:`EpochBatchSampler`, this rank's share.

    Args:
        dataset: :class:`CachedImages` (read a batch at a time) or :class:`DecodedImages`.
        train: shuffled (``balanced``: class-balanced), padded to equal shares across ranks, a last
            batch of one merged into the one before (``drop_single``); else in order, each image in
            exactly one rank's share (sharded evaluation gathers them back).
        labels: the dataset's labels (default ``dataset.labels``).
        device_type: ``"cuda"`` pins the batches' memory (copy them with ``non_blocking=True``). On
            ``"cpu"`` the cache is read in this process, as row views (a row is a memory-mapped read,
            cheaper than handing it between processes, and workers would take cores from the model).
        workers: a number or ``"auto"``, see :func:`resolve_workers`. Feeding a GPU from the cache,
            0 (what "auto" gives) means a :class:`~retino.data.feeder.CacheFeeder`: a thread of this
            process reads batches ahead straight into pinned memory; a number > 0, DataLoader worker
            processes (slower there: retino/data/feeder.py).

    The result iterates like a DataLoader over (images, labels): images (B, S, S, 3) uint8 (on a CPU
    from the cache: a list of B row views, see :func:`cpu_input`), labels (B,) int64. Its
    ``batch_sampler``: ``set_epoch(epoch, start=step * batch_size)`` before each epoch, ``steps``
    batches in a full one.
    """
    labels = dataset.labels if labels is None else labels
    cached = isinstance(dataset, CachedImages)
    in_process = device_type == "cpu" and cached
    n_workers = 0 if in_process else resolve_workers(workers, purpose="loader", device_type=device_type,
                                                      cached=cached)
    pin = device_type == "cuda" if pin_memory is None else pin_memory
    sampler = EpochBatchSampler(labels, batch_size, balanced=train and balanced, shuffle=train, seed=seed,
                                rank=rank, world=world, pad=train, merge_single=train and drop_single)
    if cached and not in_process and n_workers == 0:
        return CacheFeeder(dataset, sampler, pin=pin)
    if cached:
        dataset = CachedImages(dataset.npy_path, dataset.indices, dataset.labels,
                               batch_as="views" if in_process else "array")
    collate = batch_collate if cached else decoded_collate if isinstance(dataset, DecodedImages) else None
    return DataLoader(dataset, batch_sampler=sampler, num_workers=n_workers, collate_fn=collate,
                      pin_memory=pin, persistent_workers=n_workers > 0, prefetch_factor=4 if n_workers > 0 else None)
